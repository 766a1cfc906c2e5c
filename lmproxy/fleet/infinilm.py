"""The InfiniLM-SVC registry as a source: ``--registry-url``, polled every
``--registry-sync-interval`` seconds.

The registry decides membership, never health: the router's own checks do. A
service that leaves the registry is kept for ``--service-removal-grace-period``
seconds, so a registry restart or a missed heartbeat there does not drop live
backends; a registry that cannot be read removes nothing (logged once, until it
answers again). An entry that is not a service is skipped, and logged once while
it stays wrong.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import msgspec

from lmproxy import decode
from lmproxy.backend import tls
from lmproxy.backend.probe import ProbeError, http_get
from lmproxy.config import Config, ConfigError, ServiceSpec, spec_from_entry, url_port
from lmproxy.fleet.sources import MAX_CAUSE_TEXT, Members, Polled
from lmproxy.telemetry.logs import masked_url

log = logging.getLogger("lmproxy")

# A registry entry skipped is logged once while it stays wrong: the causes of one
# poll are remembered for the next (at most this many), and at most this many
# new ones are logged per poll.
MAX_SKIPPED_CAUSES = 1000
MAX_SKIPPED_LOGGED = 10


class _RegistryListing(msgspec.Struct):
    services: list[dict[str, Any]]


def followed(config: Config) -> str | None:
    """The registry followed, as the InfiniLM routers list it (its password masked)."""
    url = config.registry_url
    return masked_url(url) if url else None


class RegistryPoll(Polled):
    """The services an InfiniLM-SVC registry lists, polled."""

    origin = "registry"
    what = "the registry"
    loop_name = "registry poll"

    def __init__(self, members: Members, config: Config) -> None:
        super().__init__(members, config)
        self._ok = True
        self._skipped: set[str] = set()  # causes of the last poll's skipped entries
        self._listed: set[str] = set()

    def wanted(self, config: Config) -> bool:
        return bool(config.registry_url)

    def interval(self, config: Config) -> float:
        return config.registry_sync_interval

    def unfollowed(self) -> None:
        self._listed = set()
        self.members.mark_gone(self.origin, set(), "came from a registry no longer followed")

    def found(self) -> set[str]:
        return set(self._listed)

    def status(self) -> dict[str, Any]:
        return {"registry_url": followed(self.config)}

    async def sync(self) -> None:
        """One poll of the registry: it decides membership, never health."""
        url = self.config.registry_url
        if not url:
            return
        entries = await self._listing(url)
        if entries is None:
            return
        listed: set[str] = set()
        for spec in self._services(entries):
            listed.add(spec.name)
            self.members.claim(spec, self.origin)
        self._listed = listed
        self.members.mark_gone(self.origin, listed, "left the registry")

    async def _listing(self, url: str) -> list[dict[str, Any]] | None:
        """The registry's entries; None (logged once) when it cannot be read."""
        parts = urlsplit(url)
        path = parts.path.rstrip("/") + "/services?healthy=true"
        # The registry is checked with the router-wide --backend-* TLS settings.
        context = (
            tls.client_context(*self.members.roster.backend_tls)
            if parts.scheme == "https"
            else None
        )
        try:
            status, body = await http_get(
                parts.hostname or "", url_port(parts), path, self.config.health_timeout, ssl=context
            )
            if status != 200:
                raise ProbeError(f"{path} answered {status}")
            listing = decode.json(body, into=_RegistryListing)
        except (ProbeError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            if self._ok:
                log.warning(
                    "registry %s unreachable or unreadable (%s); keeping its services",
                    masked_url(url),
                    exc or "timed out",
                )
            self._ok = False
            return None
        if not self._ok:
            log.info("registry %s is readable again", masked_url(url))
        self._ok = True
        return listing.services

    def _services(self, entries: list[dict[str, Any]]) -> list[ServiceSpec]:
        """The entries that are services; the others skipped, each cause logged once
        while it stays (at most MAX_SKIPPED_LOGGED new ones per poll)."""
        specs: list[ServiceSpec] = []
        causes: set[str] = set()  # why entries were skipped this time
        new = 0
        for index, entry in enumerate(entries):
            try:
                spec = spec_from_entry(entry)
            except ConfigError as exc:
                cause = str(exc)[:MAX_CAUSE_TEXT]
                if len(causes) < MAX_SKIPPED_CAUSES:
                    causes.add(cause)
                if cause not in self._skipped:
                    new += 1
                    if new <= MAX_SKIPPED_LOGGED:
                        log.warning("registry entry %d skipped: %s", index, cause)
                continue
            if spec is not None:
                specs.append(spec)
        if new > MAX_SKIPPED_LOGGED:
            log.warning("registry: %d more entries skipped", new - MAX_SKIPPED_LOGGED)
        self._skipped = causes  # logged again only if one returns after a poll without it
        return specs
