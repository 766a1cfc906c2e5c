"""Who is in the fleet: the config, registrations, an InfiniLM-SVC registry, DNS, pods.

Each source is a ``sources.Source`` and manages only its own services; the fleet
holds them in a list, in order of rank:

- ``config`` (``sources.ConfigSource``): the config file and command line; a
  SIGHUP reload applies the new list (added, changed, removed).
- ``admin`` (``admin.AdminSource``): ``POST /services``, ``DELETE
  /services/{name}``, ``POST /services/{name}/heartbeat`` and the Rust routers'
  worker API; a registration with a TTL is removed when its heartbeats stop.
- ``registry`` (``infinilm.RegistryPoll``): ``--registry-url`` polled every
  ``--registry-sync-interval`` seconds; a service that leaves the registry is
  kept for ``--service-removal-grace-period`` seconds, so a registry restart or a
  missed heartbeat there does not drop live backends.
- ``dns`` (``discovery.DnsDiscovery``): the ``--discover`` names, resolved every
  ``--discover-interval`` seconds; an address that leaves is kept for the same
  grace period, and a failed lookup removes nothing.
- ``k8s`` (``kube.PodDiscovery``): the pods ``--k8s-selector`` picks, listed then
  watched; a pod that stops being Ready, starts terminating or is deleted leaves
  at once (the API server says so for certain), and a lost watch removes nothing.

The polled sources, the clock of TTLs and the one of grace periods run as
``sources.repeat`` loops: whatever a step raises, it is logged once and retried
with backoff, so no exception ends a source (``kube.PodWatcher.run`` does the
same for the watch).

A name belongs to the first source that claims it, in that order of rank: a
registration cannot take over a configured service, and a polled source cannot
take over a name another source holds (``sources.Members``). The router's own
health checks stay the authority on health for every source. In a multi-worker
router the fleet runs in the supervisor, and workers mirror its registry.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from lmproxy.config import Config
from lmproxy.fleet.admin import AdminSource, Payload
from lmproxy.fleet.dns import DnsDiscovery
from lmproxy.fleet.health import HealthChecker
from lmproxy.fleet.infinilm import RegistryPoll
from lmproxy.fleet.kube import PodDiscovery
from lmproxy.fleet.load import LoadScraper
from lmproxy.fleet.roster import Roster
from lmproxy.fleet.sources import ConfigSource, Loop, Members, Source

TICK_S = 0.5  # how often grace periods are checked
FIRST_CHECK_POLL_S = 0.01
# Start-up waits at most this long (or --health-timeout, if shorter) for first checks.
FIRST_CHECKS_MAX_S = 5.0


class Fleet:
    def __init__(self, roster: Roster, config: Config, instance_id: str = "") -> None:
        self.roster = roster
        self.config = config
        self.own_port = config.port  # the port bound, once the router listens
        self.checker = HealthChecker(
            roster, config.health_interval, config.health_timeout, instance_id
        )
        self.load = LoadScraper(roster, config.load_interval, config.health_timeout, instance_id)
        self.members = Members(roster, self.checker, config)
        self.registrations = AdminSource(self.members, config, lambda: self.own_port)
        # In order of rank: a name belongs to the first source that claims it.
        self.sources: list[Source] = [
            ConfigSource(self.members, config),
            self.registrations,
            RegistryPoll(self.members, config),
            DnsDiscovery(self.members, config),
            PodDiscovery(self.members, config),
        ]
        self.members.rank_by(self.sources)
        self._graces = Loop(self.members.end_graces, lambda: TICK_S, "ending grace periods")

    def start(self) -> None:
        self.checker.start()
        self.load.start()
        self._graces.run(True, "fleet:graces")
        for source in self.sources:
            source.start()

    async def first_checks(self, limit_s: float) -> None:
        """Wait, at most ``limit_s``, until every service known at start-up has had its
        first health check: a router that serves before then answers its first clients
        503 for services that are up (sglang-router waits for its workers too). A refused
        connection fails at once; only a backend that hangs makes this wait its limit."""
        deadline = time.monotonic() + limit_s
        services = list(self.roster.services.values())
        while any(s.last_check is None for s in services) and time.monotonic() < deadline:
            await asyncio.sleep(FIRST_CHECK_POLL_S)

    async def stop(self) -> None:
        await asyncio.gather(self._graces.stop(), *(source.stop() for source in self.sources))
        await self.checker.stop()
        await self.load.stop()

    def apply_config(self, config: Config) -> None:
        """A reloaded config: new settings, then each source follows it, in rank
        order (the config's services first)."""
        self.config = config
        self.checker.interval_s = config.health_interval
        self.checker.timeout_s = config.health_timeout
        self.load.interval_s = config.load_interval
        self.load.timeout_s = config.health_timeout
        self.roster.max_errors = config.max_errors
        self.members.apply(config)
        for source in self.sources:
            source.apply(config)

    def status(self) -> dict[str, Any]:
        """What the sources say of themselves in ``/stats``."""
        found: dict[str, Any] = {}
        for source in self.sources:
            found.update(source.status())
        return found

    def admin(self, method: bytes, path: bytes, body: bytes) -> Payload:
        """The admin API and the Rust routers' worker API (``admin.py``)."""
        return self.registrations.admin(method, path, body)
