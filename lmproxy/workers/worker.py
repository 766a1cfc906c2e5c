"""One worker of ``--workers N``: a full serving Router whose fleet is the supervisor's.

Started by the supervisor as ``python -m lmproxy.workers.worker FD`` with one end of a
socketpair. The worker binds the router's port itself with SO_REUSEPORT, so
the kernel spreads new connections over the workers; a connection and its
requests stay in the worker that accepted it.

What it shares, and how fresh it is:

- membership and health: the supervisor sends its whole registry whenever it
  changes (a probe, a registration, a reload); a worker's passive ejection goes
  up at once and comes back to the others with the next state;
- in-flight counts: each worker reports its own every ``INFLIGHT_SYNC_S`` when
  they changed, and gets the other workers' sum back, so the load-aware
  strategies see the whole router's load at most ~0.1 s old plus their own
  exactly;
- ``max_in_flight``: each worker admits its share (the limit divided by the
  workers, rounded up);
- /stats and /metrics: gathered from every worker by the supervisor when asked.

A worker heartbeats (``alive``) from a timer in its own loop, so a worker that is
stopped or whose loop is stuck falls silent, and the supervisor replaces it after
``--worker-timeout``. A worker whose supervisor is gone sees its channel close and
exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

import msgspec

from lmproxy.config import Config
from lmproxy.errors import Fault, error_response, http_response
from lmproxy.telemetry import logs
from lmproxy.workers.control import Channel, ChannelClosed, Message
from strategies import SharesState

if TYPE_CHECKING:
    from lmproxy.app import Router
    from lmproxy.client.connection import ClientConnection, ClientRequest

log = logging.getLogger("lmproxy")

INFLIGHT_SYNC_S = 0.1
HEARTBEAT_S = 1.0  # at most; four per --worker-timeout when that is shorter
ASK_TIMEOUT_S = 10.0


_ALIVE: Message = {"op": "alive"}


class SupervisorLink:
    """The worker's side of the channel."""

    # Answered by the supervisor: with every worker's figures, or (/services) with
    # the entries it keeps but never routes to, which workers do not mirror.
    WHOLE_ROUTER = frozenset({b"/stats", b"/metrics", b"/services"})

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.slot = 0
        self.workers = 1
        self.instance_id = ""  # the router's Via name, the same in every worker
        self.channel = Channel(reader, writer, self.handle)
        self.router: Router | None = None
        self.started: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.stop = asyncio.Event()
        self._others: dict[str, int] = {}
        self._reported: dict[str, int] = {}
        self._share_failed: set[str] = set()  # strategies whose share() raised (logged once)
        self._early: list[Message] = []  # arrived before the router existed

    # --- from the supervisor ---------------------------------------------------------

    def handle(self, message: Message) -> None:
        op = message["op"]
        router = self.router
        if op == "start":
            self.started.set_result(message)
        elif router is None:
            self._early.append(message)
        elif op == "state":
            router.roster.sync(message["state"])
            self._apply_others()
        elif op == "others":
            self._others = message["counts"]
            self._apply_others()
        elif op == "config":
            config = msgspec.convert(message["config"], Config)
            router.apply(config)
            self._share_learning()  # a changed strategy is a new object
        elif op == "snapshot":
            self.channel.reply(message, {"snapshot": self.snapshot()})
        elif op == "learnt":
            self._absorb(message["updates"])

    def attach(self, router: Router, state: dict[str, Any]) -> None:
        """Start mirroring into ``router``, from the state sent with ``start``."""
        self.router = router
        router.roster.on_eject = self.ejected
        router.roster.note = log.debug  # the supervisor logs membership once
        router.roster.sync(state)
        self._share_learning()
        for message in self._early:
            self.handle(message)
        self._early.clear()

    def _share_learning(self) -> None:
        """From the first request on, the strategies keep what they learn for the others."""
        for _, strategy in self._sharing():
            strategy.sharing = True

    def _apply_others(self) -> None:
        assert self.router is not None
        others = self._others
        for service in self.router.roster.services.values():
            service.in_flight = service.local_in_flight + others.get(service.name, 0)

    # --- to the supervisor ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        router = self.router
        assert router is not None
        return {
            "services": {
                s.name: {
                    "request_count": s.request_count,
                    "error_count": s.error_count,
                    "latencies": list(s.latencies),
                    "in_flight": s.local_in_flight,
                    "last_error": s.last_error,
                    "circuit": (s.breaker.state, s.breaker.opened_total),
                }
                for s in router.roster.services.values()
            },
            "metrics": router.metrics.state(),
            "queue_length": len(router.admission),
            "connections": router.gate.figures(),
        }

    def ejected(self, service: Any, reason: str) -> None:
        self.channel.send({"op": "eject", "name": service.name, "reason": reason})

    async def report_in_flight(self) -> None:
        """Every INFLIGHT_SYNC_S: this worker's in-flight counts, when they changed, and
        what its strategies learnt, for the other workers."""
        while True:
            await asyncio.sleep(INFLIGHT_SYNC_S)
            assert self.router is not None
            counts = {s.name: s.local_in_flight for s in self.router.roster.services.values()}
            if counts != self._reported:
                self._reported = counts
                self.channel.send({"op": "inflight", "counts": counts})
            learnt = {}
            for name, strategy in self._sharing():
                try:
                    updates = strategy.share()
                except Exception:  # a plugin's bug must not end the sharing of the others
                    if name not in self._share_failed:
                        self._share_failed.add(name)
                        log.exception("strategy of model %r failed sharing its state", name)
                    continue
                if updates:
                    learnt[name] = updates
            if learnt:
                self.channel.send({"op": "learnt", "updates": learnt})
                log.debug("shared updates for strategies %s with the other workers", list(learnt))

    async def heartbeat(self) -> None:
        """Tell the supervisor this worker's loop runs: a timer here, not a thread, so
        a blocked loop or a stopped process stops it."""
        while True:
            assert self.router is not None
            timeout_s = self.router.config.worker_timeout
            await asyncio.sleep(min(HEARTBEAT_S, timeout_s / 4) if timeout_s else HEARTBEAT_S)
            self.channel.send(_ALIVE)

    def _sharing(self) -> list[tuple[str, SharesState]]:
        """The router's strategies that share state, by model ("" for the default one)."""
        router = self.router
        assert router is not None
        pairs = [("", router.strategy), *router.model_strategies.items()]
        return [(name, s) for name, s in pairs if isinstance(s, SharesState)]

    def _absorb(self, learnt: dict[str, list[Any]]) -> None:
        strategies = dict(self._sharing())
        for name, updates in learnt.items():
            strategy = strategies.get(name)
            if strategy is not None:
                strategy.absorb(updates)
                log.debug("absorbed %d updates for strategy %r from a worker", len(updates), name)

    async def answer(self, client: ClientConnection, request: ClientRequest) -> None:
        """Have the supervisor answer a request for the whole router (figures, admin API)."""
        try:
            reply = await self.channel.ask(
                {
                    "op": "http",
                    "method": request.method,
                    "path": request.path,
                    "body": request.body,
                },
                ASK_TIMEOUT_S,
            )
        except (ChannelClosed, TimeoutError):
            client.respond(
                error_response(
                    Fault.SUPERVISOR_SILENT,
                    "the router's supervisor did not answer; retry shortly",
                    False,
                )
            )
            return
        client.respond(
            http_response(
                reply["status"],
                reply["content_type"],
                reply["body"],
                request.keep_alive,
                head_only=request.method == b"HEAD",
            )
        )


async def run(fd: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    link = SupervisorLink(reader, writer)
    reading = asyncio.create_task(link.channel.run())
    reading.add_done_callback(lambda _: link.stop.set())  # the supervisor is gone
    waits: set[asyncio.Future[Any]] = {link.started, reading}
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if not link.started.done():
        return
    start = link.started.result()
    link.slot, link.workers = start["slot"], start["workers"]
    link.instance_id = start["instance"]
    config = msgspec.convert(start["config"], Config)
    logs.configure(
        config.log_level, f"%(asctime)s %(levelname)s %(name)s[w{link.slot}]: %(message)s"
    )
    from lmproxy.app import Router

    router = Router(config, link)
    link.attach(router, start["state"])
    await router.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, link.stop.set)
    # The supervisor reloads; a terminal's hang-up reaches the workers too.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    reporting = asyncio.create_task(link.report_in_flight())
    beating = asyncio.create_task(link.heartbeat())
    link.channel.send({"op": "ready", "pid": os.getpid(), "port": router.port})
    await link.stop.wait()
    await router.shutdown()  # heartbeats go on: a long drain is not a hang
    reporting.cancel()
    beating.cancel()
    # Last figures, so the supervisor keeps this worker's counters.
    link.channel.send({"op": "final", "snapshot": link.snapshot()})
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.drain(), 1.0)
    reading.cancel()


def main() -> int:
    fd = int(sys.argv[1])
    uvloop: ModuleType | None
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None:
        uvloop.run(run(fd))
    else:
        asyncio.run(run(fd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
