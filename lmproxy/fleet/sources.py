"""Where services come from: the ``Source`` protocol, the membership every source
changes, and the first source, the config.

A source adds services and manages only its own, each marked with its
``origin``. The fleet (``fleet.py``) holds its sources in a list, in order of
rank: a name belongs to the first source that claims it. The config and the
admin API's registrations (``admin.py``) take names as they are told; a polled
source (the InfiniLM registry, ``infinilm.py``; DNS, ``discovery.py``;
Kubernetes, ``kube.py``) only ``claim``s a name no other source holds. A service
a polled source stops listing is kept for ``--service-removal-grace-period``
seconds (``mark_gone``) unless the source can say for certain that it left.

The polled sources run as ``repeat`` loops: whatever a step raises, it is logged
once and retried with backoff, so no exception ends a source.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from lmproxy.config import Config, ServiceSpec
from lmproxy.fleet.roster import Entry, Roster, Service, same_backend

if TYPE_CHECKING:
    from lmproxy.fleet.health import HealthChecker

log = logging.getLogger("lmproxy")

# After an unexpected failure, a loop waits its interval or a backoff, whichever is
# longer: it doubles per failure in a row within these bounds, which the Kubernetes
# watch's retries share, and a cause logged is cut to MAX_CAUSE_TEXT, as the watch's.
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
MAX_CAUSE_TEXT = 300


class Source(Protocol):
    """One way services join the fleet."""

    @property
    def origin(self) -> str:
        """What its services' ``origin`` says: config, admin, registry, dns, k8s."""

    @property
    def what(self) -> str:
        """Its name in messages: "the registry", "DNS"..."""

    def start(self) -> None:
        """Begin following what the config it was made with asks."""

    def apply(self, config: Config) -> None:
        """Follow a reloaded config: start, change or stop what it follows."""

    async def stop(self) -> None:
        """End its loops and watches; its services stay."""

    def found(self) -> set[str]:
        """The names of the services it lists now."""

    def status(self) -> dict[str, Any]:
        """Its fields in ``/stats`` (most sources have none)."""

    def forget(self, name: str) -> None:
        """The service or entry ``name`` left the fleet, whatever the reason."""


class Members:
    """The services of the fleet as its sources change them: every source adds and
    removes through these, so that rank, grace periods and health checks hold for
    all of them alike."""

    def __init__(self, roster: Roster, checker: HealthChecker, config: Config) -> None:
        self.roster = roster
        self.checker = checker
        self.config = config
        self._sources: Sequence[Source] = ()
        self._gone_since: dict[str, float] = {}  # polled services no longer listed

    def apply(self, config: Config) -> None:
        self.config = config

    def rank_by(self, sources: Sequence[Source]) -> None:
        """The fleet's sources, first the one whose names no other may take."""
        self._sources = sources

    def rank(self, origin: str) -> int:
        return next(i for i, s in enumerate(self._sources) if s.origin == origin)

    def put(self, spec: ServiceSpec, origin: str) -> tuple[Service, bool]:
        """Add or change a service; (service, whether it is new) and start probing it."""
        before = self.roster.services.get(spec.name)
        service = self.roster.update(spec, origin)
        created = service is not before
        if created:
            self.checker.watch(service)
        return service, created

    def claim(self, spec: ServiceSpec, origin: str) -> None:
        """A polled source lists ``spec``: add or refresh it, unless another source
        (the config, a registration, another polled source) holds the name."""
        current = self.roster.services.get(spec.name)
        if current is not None and current.origin != origin:
            return
        self._gone_since.pop(spec.name, None)
        self.put(spec, origin)

    def returned(self, name: str) -> None:
        """``name`` was given again: its grace period, if any, is over."""
        self._gone_since.pop(name, None)

    def remove(self, name: str, why: str) -> Service | Entry | None:
        """Take out the service, or the kept entry, of that name."""
        self.checker.unwatch(name)
        self._gone_since.pop(name, None)
        for source in self._sources:
            source.forget(name)
        return self.roster.remove(name, why) or self.roster.drop(name, why)

    def of(self, origin: str) -> set[str]:
        return {s.name for s in self.roster.services.values() if s.origin == origin}

    def mark_gone(self, origin: str, listed: set[str], what: str) -> None:
        """Start the grace period of ``origin``'s services that it no longer lists."""
        now = time.monotonic()
        for service in self.roster.services.values():
            if (
                service.origin == origin
                and service.name not in listed
                and service.name not in self._gone_since
            ):
                self._gone_since[service.name] = now
                log.info(
                    "service %s %s; removed in %gs unless it returns",
                    service.name,
                    what,
                    self.config.service_removal_grace_period,
                )

    async def end_graces(self) -> None:
        """Take out the services whose grace period is over."""
        now = time.monotonic()
        grace = self.config.service_removal_grace_period
        for name, since in list(self._gone_since.items()):
            if now - since >= grace:
                service = self.roster.services.get(name)
                self.remove(name, f"gone from {self._what(service)} for {grace:g}s")

    def _what(self, service: Service | None) -> str:
        origin = service.origin if service is not None else ""
        return next((s.what for s in self._sources if s.origin == origin), "its source")


class Loop:
    """A polled source's ``repeat`` loop, run while its config asks for it."""

    def __init__(
        self, step: Callable[[], Awaitable[None]], interval: Callable[[], float], what: str
    ) -> None:
        self._step = step
        self._interval = interval
        self.what = what
        self._task: asyncio.Task[None] | None = None

    def run(self, wanted: bool, name: str) -> bool:
        """Start or stop as ``wanted`` says; True when this stopped it."""
        if wanted and self._task is None:
            self._task = asyncio.create_task(
                repeat(self._step, self._interval, self.what), name=name
            )
        elif not wanted and self._task is not None:
            self._task.cancel()
            self._task = None
            return True
        return False

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class Polled:
    """A source that asks again and again (``sync``, in a ``repeat`` loop) while its
    config asks for it: ``wanted`` says whether it does, ``interval`` how often."""

    origin = ""
    what = ""
    loop_name = ""  # the loop's name in its messages

    def __init__(self, members: Members, config: Config) -> None:
        self.members = members
        self.config = config
        self._loop = Loop(self.sync, lambda: self.interval(self.config), self.loop_name)

    def wanted(self, config: Config) -> bool:
        raise NotImplementedError

    def interval(self, config: Config) -> float:
        raise NotImplementedError

    async def sync(self) -> None:
        raise NotImplementedError

    def unfollowed(self) -> None:
        """The config no longer asks for it: its services go, after their grace."""
        self.members.mark_gone(self.origin, set(), f"came from {self.what}, no longer followed")

    def start(self) -> None:
        self.apply(self.config)

    def apply(self, config: Config) -> None:
        self.config = config
        if self._loop.run(self.wanted(config), f"fleet:{self.origin}"):
            self.unfollowed()

    async def stop(self) -> None:
        await self._loop.stop()

    def status(self) -> dict[str, Any]:
        return {}

    def forget(self, name: str) -> None:
        pass


async def repeat(
    step: Callable[[], Awaitable[None]],
    interval: Callable[[], float],
    what: str,
    backoff_min_s: float = BACKOFF_MIN_S,
) -> None:
    """Run ``step``, then wait ``interval()`` seconds (asked each time: a reload may
    change it), until cancelled. A step's failure, whatever it is, does not end the
    loop: it is logged once with its traceback (again only when its cause changes),
    and the loop backs off, doubling up to BACKOFF_MAX_S, until a step succeeds."""
    failing = ""
    backoff = 0.0
    while True:
        try:
            await step()
        except Exception as exc:  # a bug here must not end the loop
            cause = f"{type(exc).__name__}: {exc}"[:MAX_CAUSE_TEXT]
            if cause != failing:
                log.error("%s failed (%s); retrying with backoff", what, cause, exc_info=exc)
                failing = cause
            backoff = min(max(backoff * 2, backoff_min_s), BACKOFF_MAX_S)
            await asyncio.sleep(max(interval(), backoff))
            continue
        if failing:
            log.info("%s works again", what)
            failing, backoff = "", 0.0
        await asyncio.sleep(interval())


class ConfigSource:
    """The config file and command line: a reload applies the new list (added,
    changed, removed), and outranks every other source for the names it gives."""

    origin = "config"
    what = "the config"

    def __init__(self, members: Members, config: Config) -> None:
        self.members = members
        for spec in config.services:
            members.roster.add(spec, self.origin)

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def found(self) -> set[str]:
        return self.members.of(self.origin)

    def status(self) -> dict[str, Any]:
        return {}

    def forget(self, name: str) -> None:
        pass

    def apply(self, config: Config) -> None:
        """A reloaded config: its services replace the configured ones."""
        members = self.members
        wanted = {spec.name: spec for spec in config.services}
        leaving = [
            s
            for s in members.roster.services.values()
            if s.origin == self.origin and s.name not in wanted
        ]
        for spec in wanted.values():
            self._take(spec, leaving)
        # Removed after the new names are in: a model moving to another name is served
        # throughout the reload.
        for service in leaving:
            members.remove(service.name, "no longer in the config")

    def _take(self, spec: ServiceSpec, leaving: list[Service]) -> None:
        """Add or change one configured service; one of ``leaving`` at the same backend
        is its old name (taken out of ``leaving``)."""
        members = self.members
        current = members.roster.services.get(spec.name)
        if current is not None and current.origin != self.origin:
            # The config outranks a registration or a polled source for the name.
            members.remove(spec.name, "now defined in the config")
        service, created = members.put(spec, self.origin)
        renamed = next((s for s in leaving if same_backend(s.spec, spec)), None)
        if created and renamed is not None:
            # A rename: the backend's health is known; a check cannot tell it sooner.
            leaving.remove(renamed)
            members.roster.inherit(service, renamed)
            members.remove(renamed.name, f"renamed to {spec.name}")
