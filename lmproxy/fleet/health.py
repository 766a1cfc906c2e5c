"""Active health checks and model discovery, one loop per service.

Each check asks the service's own health path (never a supervisor port, the
InfiniLM router's mistake: a hung engine must fail its check), then, unless the
models were configured, its model list: ``/v1/models``, falling back to
``/models``. Both together must finish within ``health_timeout``. A model list
is decoded bounded in size (the probe's 4 MiB) and in depth (``decode.json``),
so a hostile listing fails the check with a reason, never the loop.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec

from lmproxy import decode
from lmproxy.backend.probe import ProbeError, probe
from lmproxy.fleet.roster import Roster, Service

log = logging.getLogger("lmproxy")

# A service whose models were never learnt is retried this often at most, so a
# backend started after the router becomes routable within seconds, not a full
# health interval.
DISCOVERY_RETRY_S = 2.0


class _Model(msgspec.Struct):
    id: str
    created: int | None = None
    owned_by: str | None = None


class _ModelList(msgspec.Struct):
    data: list[_Model]


class HealthChecker:
    def __init__(self, roster: Roster, interval_s: float, timeout_s: float, via: str = "") -> None:
        self.roster = roster
        self.via = via  # the router's Via name: a service that is the router fails with 508
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._unexpected: dict[str, str] = {}  # service -> the unexpected failure last logged

    def start(self) -> None:
        for service in self.roster.services.values():
            self.watch(service)

    def watch(self, service: Service) -> None:
        """Probe ``service`` now and every interval (replacing a loop of the same name)."""
        self.unwatch(service.name)
        self._tasks[service.name] = asyncio.create_task(
            self._loop(service), name=f"health:{service.name}"
        )

    def unwatch(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        self._unexpected.pop(name, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    async def _loop(self, service: Service) -> None:
        while True:
            await self.check(service)
            delay = self.interval_s
            if not service.models_known:
                delay = min(delay, DISCOVERY_RETRY_S)
            await asyncio.sleep(delay)

    async def check(self, service: Service) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                models = await self._probe(service)
        except TimeoutError:
            self.roster.probe_failed(service, f"health check timed out after {self.timeout_s}s")
        except ProbeError as exc:
            self.roster.probe_failed(service, f"health check failed: {exc}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Whatever went wrong, the service shows it; the loop goes on. The traceback
            # is logged once per cause, not at every check.
            reason = f"{type(exc).__name__}: {exc}"
            if self._unexpected.get(service.name) != reason:
                self._unexpected[service.name] = reason
                log.exception("health check of %s failed unexpectedly", service.name)
            self.roster.probe_failed(service, f"health check failed: {reason}")
        else:
            self._unexpected.pop(service.name, None)
            self.roster.probe_passed(service, models)

    async def _probe(self, service: Service) -> list[tuple[str, int | None, str | None]] | None:
        # Messages name the path asked, prefix included: the one to try by hand.
        prefix = service.path_prefix.decode()
        health_path = prefix + service.health_path
        status, _ = await probe(service, health_path, self.timeout_s, self.via)
        if status == 508:
            raise ProbeError(
                f"{health_path} answered 508 Loop Detected: {service.url} leads back "
                "to this router; give the backend's own address"
            )
        if not 200 <= status < 300:
            raise ProbeError(f"{health_path} answered {status}")
        if service.models_configured:
            return None
        for path in (prefix + "/v1/models", prefix + "/models"):
            status, body = await probe(service, path, self.timeout_s, self.via)
            if status == 404:
                continue
            if status != 200:
                raise ProbeError(f"{path} answered {status}")
            try:
                listing = decode.json(body, into=_ModelList)
            except msgspec.DecodeError as exc:
                raise ProbeError(f"{path} is not an OpenAI model list: {exc}") from None
            return [(m.id, m.created, m.owned_by) for m in listing.data]
        raise ProbeError(
            f"neither {prefix}/v1/models nor {prefix}/models exists; configure the models instead"
        )
