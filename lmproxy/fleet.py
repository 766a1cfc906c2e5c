"""Who is in the fleet: the config, live registrations, an InfiniLM-SVC registry.

Three sources add services, and each manages only its own:

- ``config``: the config file and command line; a SIGHUP reload applies the
  new list (added, changed, removed).
- ``admin``: ``POST /services``, ``DELETE /services/{name}``,
  ``POST /services/{name}/heartbeat``; a registration with a TTL is removed
  when its heartbeats stop.
- ``registry``: ``--registry-url`` polled every ``--registry-sync-interval``
  seconds; a service that leaves the registry is kept for
  ``--service-removal-grace-period`` seconds, so a registry restart or a
  missed heartbeat there does not drop live backends.

A name belongs to the first source that claims it, in that order of rank: a
registration cannot take over a configured service, and the registry cannot
take over either. The router's own health checks stay the authority on health
for every source. In a multi-worker router the fleet runs in the supervisor,
and workers mirror its registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec

from lmproxy.api import service_entry
from lmproxy.config import Config, ConfigError, ServiceSpec, points_at, spec_from_entry
from lmproxy.health import HealthChecker
from lmproxy.logs import masked_url
from lmproxy.probe import ProbeError, http_get
from lmproxy.registry import Registry, Service

log = logging.getLogger("lmproxy")

Payload = tuple[int, Any]
RANK = {"config": 0, "admin": 1, "registry": 2}
TICK_S = 0.5  # how often TTLs and grace periods are checked


class _Registration(msgspec.Struct):
    ttl: float | None = None


class _RegistryListing(msgspec.Struct):
    services: list[dict[str, Any]]


def describe(service: Service) -> dict[str, Any]:
    """A service as the admin API answers: its /services entry and its health path."""
    return {**service_entry(service), "health_path": service.spec.health_path}


class Fleet:
    def __init__(self, registry: Registry, config: Config, instance_id: str = "") -> None:
        self.registry = registry
        self.config = config
        self.own_port = config.port  # the port bound, once the router listens
        self.checker = HealthChecker(
            registry, config.health_interval, config.health_timeout, instance_id
        )
        self._expires: dict[str, tuple[float, float]] = {}  # name -> (ttl, monotonic deadline)
        self._gone_since: dict[str, float] = {}  # registry services no longer listed
        self._tasks: list[asyncio.Task[None]] = []
        self._poller: asyncio.Task[None] | None = None
        self._registry_ok = True
        for spec in config.services:
            registry.add(spec, "config")

    def start(self) -> None:
        self.checker.start()
        self._tasks.append(asyncio.create_task(self._tick(), name="fleet:tick"))
        self._follow_registry()

    async def stop(self) -> None:
        if self._poller is not None:
            self._tasks.append(self._poller)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.checker.stop()

    def _follow_registry(self) -> None:
        """Poll the configured registry (or stop polling one no longer configured)."""
        if self.config.registry_url and self._poller is None:
            self._poller = asyncio.create_task(self._poll(), name="fleet:registry")
        elif not self.config.registry_url and self._poller is not None:
            self._poller.cancel()
            self._poller = None
            now = time.monotonic()
            for service in self.registry.services.values():
                if service.origin == "registry":
                    self._gone_since.setdefault(service.name, now)

    # --- changes ------------------------------------------------------------------

    def _put(self, spec: ServiceSpec, origin: str) -> tuple[Service, bool]:
        """Add or change a service; (service, whether it is new) and start probing it."""
        before = self.registry.services.get(spec.name)
        service = self.registry.update(spec, origin)
        created = service is not before
        if created:
            self.checker.watch(service)
        return service, created

    def _remove(self, name: str, why: str) -> Service | None:
        self.checker.unwatch(name)
        self._expires.pop(name, None)
        self._gone_since.pop(name, None)
        return self.registry.remove(name, why)

    def apply_config(self, config: Config) -> None:
        """A reloaded config: its services replace the configured ones."""
        self.config = config
        self.checker.interval_s = config.health_interval
        self.checker.timeout_s = config.health_timeout
        self.registry.max_errors = config.max_errors
        wanted = {spec.name: spec for spec in config.services}
        for service in list(self.registry.services.values()):
            if service.origin == "config" and service.name not in wanted:
                self._remove(service.name, "no longer in the config")
        for spec in wanted.values():
            current = self.registry.services.get(spec.name)
            if current is not None and current.origin != "config":
                # The config outranks a registration or the registry for the name.
                self._remove(spec.name, "now defined in the config")
            self._put(spec, "config")
        self._follow_registry()

    # --- the admin API ------------------------------------------------------------

    def admin(self, method: bytes, path: bytes, body: bytes) -> Payload:
        """``POST /services``, ``DELETE /services/{name}``, ``POST /services/{name}/heartbeat``."""
        if path == b"/services":
            if method != b"POST":
                return 405, {"error": "/services answers GET (list) and POST (register)"}
            return self.register(body)
        rest = unquote(path[len(b"/services/") :].decode("utf-8", "replace"))
        name, _, action = rest.partition("/")
        if action == "heartbeat":
            if method != b"POST":
                return 405, {"error": "heartbeats are POST /services/{name}/heartbeat"}
            return self.heartbeat(name)
        if action:
            return 404, {"error": f"no route for {path.decode('latin-1')}"}
        if method == b"DELETE":
            return self.deregister(name)
        if method == b"GET":
            service = self.registry.services.get(name)
            if service is None:
                return 404, {"error": f"no service named {name!r}"}
            return 200, describe(service)
        return 405, {"error": f"/services/{name} answers GET and DELETE"}

    def register(self, body: bytes) -> Payload:
        try:
            data = msgspec.json.decode(body)
            if not isinstance(data, dict):
                raise ConfigError("expected a JSON object")
            options = msgspec.convert(data, _Registration)
            spec = spec_from_entry(data)
        except (msgspec.DecodeError, msgspec.ValidationError, ConfigError) as exc:
            return 400, {"error": f"invalid registration: {exc}; expected {REGISTRATION_SHAPE}"}
        if spec is None:
            return 400, {"error": "only services of metadata.type 'openai-api' can be registered"}
        if points_at(spec, self.config.host, self.own_port):
            return 400, {
                "error": f"{spec.url} is this router's own address: requests would loop; "
                "register the backend's address"
            }
        ttl = options.ttl if options.ttl is not None else self.config.registration_ttl
        if ttl < 0:
            return 400, {"error": "ttl must be >= 0 seconds (0: no expiry)"}
        current = self.registry.services.get(spec.name)
        if current is not None and RANK[current.origin] < RANK["admin"]:
            return 409, {
                "error": f"service {spec.name!r} is defined in the config; change the config "
                "and reload (SIGHUP), or register under another name"
            }
        service, created = self._put(spec, "admin")
        self._gone_since.pop(spec.name, None)
        if ttl:
            self._expires[spec.name] = (ttl, time.monotonic() + ttl)
        else:
            self._expires.pop(spec.name, None)
        log.info("service %s registered (ttl %s)", spec.name, f"{ttl:g}s" if ttl else "none")
        return (201 if created else 200), {**describe(service), "ttl": ttl or None}

    def deregister(self, name: str) -> Payload:
        service = self._remove(name, "deregistered through the admin API")
        if service is None:
            return 404, {"error": f"no service named {name!r}"}
        return 200, {"removed": name}

    def heartbeat(self, name: str) -> Payload:
        service = self.registry.services.get(name)
        if service is None:
            return 404, {
                "error": f"no service named {name!r}; register it again with POST /services"
            }
        expiry = self._expires.get(name)
        if expiry is not None:
            self._expires[name] = (expiry[0], time.monotonic() + expiry[0])
        return 200, {"name": name, "healthy": service.healthy, "ttl": expiry[0] if expiry else None}

    # --- clocks -------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for name, (ttl, deadline) in list(self._expires.items()):
                if now >= deadline:
                    self._remove(name, f"no heartbeat for {ttl:g}s (its ttl)")
            grace = self.config.service_removal_grace_period
            for name, since in list(self._gone_since.items()):
                if now - since >= grace:
                    self._remove(name, f"gone from the registry for {grace:g}s")

    async def _poll(self) -> None:
        while True:
            try:
                await self.sync_registry()
            except Exception:  # a bug here must not end the polling
                log.exception("registry poll failed")
            await asyncio.sleep(self.config.registry_sync_interval)

    async def sync_registry(self) -> None:
        """One poll of the InfiniLM-SVC registry: it decides membership, never health."""
        url = self.config.registry_url
        if not url:
            return
        parts = urlsplit(url)
        path = parts.path.rstrip("/") + "/services?healthy=true"
        try:
            status, body = await http_get(
                parts.hostname or "", parts.port or 80, path, self.config.health_timeout
            )
            if status != 200:
                raise ProbeError(f"{path} answered {status}")
            listing = msgspec.json.decode(body, type=_RegistryListing)
        except (ProbeError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            if self._registry_ok:
                log.warning(
                    "registry %s unreachable or unreadable (%s); keeping its services",
                    masked_url(url),
                    exc or "timed out",
                )
            self._registry_ok = False
            return
        if not self._registry_ok:
            log.info("registry %s is readable again", masked_url(url))
        self._registry_ok = True
        listed: set[str] = set()
        for index, entry in enumerate(listing.services):
            try:
                spec = spec_from_entry(entry)
            except ConfigError as exc:
                log.warning("registry entry %d skipped: %s", index, exc)
                continue
            if spec is None:
                continue
            listed.add(spec.name)
            current = self.registry.services.get(spec.name)
            if current is not None and current.origin != "registry":
                continue  # the config or a registration owns the name
            self._gone_since.pop(spec.name, None)
            self._put(spec, "registry")
        now = time.monotonic()
        for service in self.registry.services.values():
            if (
                service.origin == "registry"
                and service.name not in listed
                and service.name not in self._gone_since
            ):
                self._gone_since[service.name] = now
                log.info(
                    "service %s left the registry; removed in %gs unless it returns",
                    service.name,
                    self.config.service_removal_grace_period,
                )


REGISTRATION_SHAPE = (
    '{"name": "...", "url": "http://host:port"} (or "host" and "port"), optional '
    '"models": [...] (or metadata.models), "weight", "health_path", "max_in_flight", "ttl"'
)
