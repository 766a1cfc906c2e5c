"""``--workers N``: a supervisor process that runs the fleet and N serving workers.

The supervisor serves no request itself. It owns what must exist once for the
whole router: the registry and its health checks (each service is probed once
per interval, not once per worker), the admin API's registrations, registry
polling and config reloads. Workers (``worker.py``) mirror its registry and
ask it to answer /stats, /metrics and the admin API; it gathers every worker's
figures for those on demand. A worker that dies is restarted (with a growing
delay if it keeps dying), and the counters it had reported are kept.

A worker that hangs is treated as one that dies, as gunicorn's arbiter does:
every worker heartbeats from its own loop, and one silent for
``--worker-timeout`` seconds (stopped, or its loop stuck) is killed with
SIGKILL, so its listening socket closes and the kernel stops handing it new
connections; its watcher then restarts it. Connections already in its accept
queue are lost with it, as with any worker that dies (each worker binds the
port with SO_REUSEPORT and has its own queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from lmproxy import api
from lmproxy.app import authority_limits, backend_tls, new_instance_id, with_under_way
from lmproxy.backend import tls
from lmproxy.config import Config, ConfigError
from lmproxy.errors import configure as configure_errors
from lmproxy.errors import encode_json
from lmproxy.fleet.breaker import CLOSED, WORSE
from lmproxy.fleet.membership import FIRST_CHECKS_MAX_S, Fleet
from lmproxy.fleet.roster import Roster
from lmproxy.keys.limits import Authority, keys_by_name
from lmproxy.startup import reread, start_demo, startup_warnings
from lmproxy.telemetry.metrics import CONTENT_TYPE, Metrics
from lmproxy.workers.control import Channel, ChannelClosed, Message

log = logging.getLogger("lmproxy")

START_TIMEOUT_S = 30.0
SNAPSHOT_TIMEOUT_S = 2.0
RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 10.0
STABLE_S = 10.0  # a worker that lived this long restarts without delay growth
SILENCE_CHECK_S = 1.0  # at most; four checks per --worker-timeout when that is shorter


class _Worker:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.process: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.ready: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.started_at = time.monotonic()
        self.in_flight: dict[str, int] = {}
        self.sent_others: dict[str, int] = {}
        self.snapshot: dict[str, Any] | None = None  # the last one received
        self.restart_delay_s = RESTART_DELAY_S
        self.heard_at = self.started_at  # monotonic time of its last message
        self.killed = False  # for its silence: killed once, then its watcher restarts it


class Supervisor:
    def __init__(self, config: Config, reload: Callable[[], Config] | None) -> None:
        configure_errors(config.compat, config.error_format)  # its admin API's answers
        self.config = config
        self.requested_port = config.port  # config.port becomes the one bound (port 0)
        self.reload = reload
        self.loop = asyncio.get_running_loop()
        self.roster = Roster(max_errors=config.max_errors)
        self.roster.configure_breakers(*config.breaker_settings)
        self.roster.backend_tls = backend_tls(config)
        # Checked here once, before any worker starts: a certificate or CA file that
        # cannot be read stops the start with its name, not each worker in turn.
        self.https = tls.server_context(config) is not None
        for spec in config.services:
            self.roster.tls_context(spec)
        self.instance_id = new_instance_id()  # the workers' shared Via name
        self.fleet = Fleet(self.roster, config, self.instance_id)
        # [[keys]] limits for the whole router: every worker asks (limits.py).
        self.limits = authority_limits(config, self.instance_id)
        self.authority = Authority(self.limits, keys_by_name(config))
        self.workers: dict[int, _Worker] = {}
        self.stopping = False
        self.serving = False  # every worker started once
        self.queue_length = 0
        # Figures of workers that exited: counters never go back.
        self.retired = Metrics(self.roster, lambda: 0)
        self.retired_counts: dict[str, list[int]] = {}
        self._state_pending = False
        self._in_flight_pending = False
        self._watchers: set[asyncio.Task[None]] = set()
        self.demo_specs: list[Any] = []
        self.roster.listeners.append(self._state_changed)

    # --- life ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        reservation = self._reserve_port()
        self.fleet.own_port = self.config.port
        self.fleet.start()
        # Workers start with the health the first checks found, not every service down.
        await self.fleet.first_checks(min(self.config.health_timeout, FIRST_CHECKS_MAX_S))
        try:
            await asyncio.gather(
                *(
                    self._start_worker(self.workers.setdefault(slot, _Worker(slot)))
                    for slot in range(self.config.workers)
                )
            )
        finally:
            reservation.close()
        self.serving = True
        silence = asyncio.create_task(self._watch_silence())
        self._watchers.add(silence)
        silence.add_done_callback(self._watchers.discard)
        log.info(
            "lmproxy listening on %s://%s:%d (%d workers, strategy %s, %d services)",
            "https" if self.https else "http",
            self.config.host,
            self.config.port,
            self.config.workers,
            self.config.strategy,
            len(self.roster.services),
        )
        startup_warnings(self.config, len(self.roster.services), self.config.port)
        await stop.wait()
        log.info("shutting down")
        await self.shutdown()

    def _reserve_port(self) -> socket.socket:
        """Bind the port once here: a clear error if it is taken, and port 0 resolved
        to one port that every worker then shares (a bound, unlistening socket
        receives no connections)."""
        host, port = self.config.host, self.config.port
        if not hasattr(socket, "SO_REUSEPORT"):
            raise ConfigError("--workers needs SO_REUSEPORT (Linux, macOS, BSD); use --workers 1")
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.config.port = sock.getsockname()[1]
        return sock

    async def _start_worker(self, worker: _Worker) -> None:
        mine, theirs = socket.socketpair()
        worker.ready = self.loop.create_future()
        worker.started_at = worker.heard_at = time.monotonic()
        worker.killed = False
        worker.in_flight = {}
        worker.sent_others = {}
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "lmproxy.workers.worker",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=mine)
        channel = worker.channel = Channel(reader, writer, lambda m: self._handle(worker, m))
        channel.send(
            {
                "op": "start",
                "slot": worker.slot,
                "workers": self.config.workers,
                "instance": self.instance_id,
                "config": msgspec.to_builtins(self.config),
                "state": self.roster.state(),
            }
        )
        reading = asyncio.create_task(channel.run())
        watcher = asyncio.create_task(self._watch(worker, reading))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        exited = asyncio.ensure_future(worker.process.wait())
        try:
            waits: set[asyncio.Future[Any]] = {worker.ready, exited}
            await asyncio.wait(waits, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if not worker.ready.done():
            if worker.process.returncode is None:  # hung in start-up: its watcher restarts it
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
            raise ConfigError(
                f"worker {worker.slot} did not start (exit code {worker.process.returncode}); "
                "see its error above"
            )

    async def _watch(self, worker: _Worker, reading: asyncio.Task[None]) -> None:
        """Wait for the worker to exit; restart it unless the router is stopping."""
        assert worker.process is not None
        code = await worker.process.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reading, 1.0)  # its last figures
        self._retire(worker)
        if self.stopping or not self.serving:
            return  # at start-up, run() reports a worker that cannot start
        lived = time.monotonic() - worker.started_at
        if lived >= STABLE_S:
            delay = RESTART_DELAY_S
        else:  # dying soon after each start: back off
            delay = min(worker.restart_delay_s * 2, MAX_RESTART_DELAY_S)
        worker.restart_delay_s = delay
        log.error(
            "worker %d (pid %d) exited with code %s after %.1fs; restarting in %.1fs",
            worker.slot,
            worker.process.pid,
            code,
            lived,
            delay,
        )
        while True:
            await asyncio.sleep(delay)
            if self.stopping:
                return
            try:
                await self._start_worker(worker)
                return
            except ConfigError as exc:
                # It started and exited or hung: its own watcher tries again, later.
                log.error("worker %d failed to restart: %s", worker.slot, exc)
                return
            except OSError as exc:  # not even started (no memory, no processes left)
                delay = min(delay * 2, MAX_RESTART_DELAY_S)
                log.error("cannot start worker %d: %s; retrying in %.1fs", worker.slot, exc, delay)

    async def _watch_silence(self) -> None:
        """Kill a serving worker that sent nothing for --worker-timeout; its watcher
        restarts it (and ends its key grants), as for a worker that died."""
        checked_at = time.monotonic()
        while True:
            timeout_s = self.config.worker_timeout  # a reload may change it
            await asyncio.sleep(min(SILENCE_CHECK_S, timeout_s / 4) if timeout_s else 1.0)
            now = time.monotonic()
            if timeout_s and now - checked_at > timeout_s:
                # The supervisor itself did not run (stopped, the host asleep): the
                # workers' heartbeats wait unread in the channels, which is no silence.
                for worker in self.workers.values():
                    worker.heard_at = now
            checked_at = now
            if not timeout_s or self.stopping:
                continue
            for worker in self.workers.values():
                silent_s = now - worker.heard_at
                if silent_s > timeout_s and self._serving(worker) and not worker.killed:
                    self._kill_silent(worker, silent_s)

    def _serving(self, worker: _Worker) -> bool:
        """Started (a worker hung in start-up is START_TIMEOUT_S's) and not exited."""
        process = worker.process
        return process is not None and process.returncode is None and worker.ready.done()

    def _kill_silent(self, worker: _Worker, silent_s: float) -> None:
        assert worker.process is not None
        worker.killed = True
        log.warning(
            "worker %d (pid %d) sent no heartbeat for %.1fs (--worker-timeout %g): "
            "stopped or stuck; killing it",
            worker.slot,
            worker.process.pid,
            silent_s,
            self.config.worker_timeout,
        )
        with contextlib.suppress(ProcessLookupError):
            worker.process.kill()

    def _retire(self, worker: _Worker) -> None:
        """Keep the counters of a worker that exited; forget its load."""
        snapshot = worker.snapshot
        worker.snapshot = None
        worker.in_flight = {}
        self._in_flight_changed()
        if worker.channel is not None:
            self.authority.forget(worker.channel)
        if snapshot is None:
            return
        self.retired.absorb(snapshot["metrics"])
        for name, figures in snapshot["services"].items():
            counts = self.retired_counts.setdefault(name, [0, 0])
            counts[0] += figures["request_count"]
            counts[1] += figures["error_count"]

    async def shutdown(self) -> None:
        self.stopping = True
        processes = [w.process for w in self.workers.values() if w.process is not None]
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        waiting = [asyncio.ensure_future(p.wait()) for p in processes]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=self.config.shutdown_timeout + 5)
            for process in processes:
                if process.returncode is None:
                    log.warning("worker pid %d did not stop; killing it", process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            if late:
                await asyncio.wait(late, timeout=5)
        for watcher in list(self._watchers):
            watcher.cancel()
        await self.limits.aclose()
        await self.fleet.stop()

    def hangup(self) -> None:
        config = reread(self.reload, self.demo_specs)
        if config is None:
            return
        requested = {"host": self.config.host, "port": self.requested_port}
        requested["workers"] = self.config.workers
        for name, value in requested.items():
            if getattr(config, name) != value:
                log.warning("reload: %s changed; it takes effect after a restart", name)
        config.host, config.port, config.workers = (
            self.config.host,
            self.config.port,
            self.config.workers,
        )
        if config.worker_timeout != self.config.worker_timeout:
            # The workers heartbeat at the old pace until they get the new config.
            for worker in self.workers.values():
                worker.heard_at = time.monotonic()
        self.config = config
        self.roster.max_errors = config.max_errors
        self.roster.configure_breakers(*config.breaker_settings)
        self.roster.backend_tls = backend_tls(config)
        self.fleet.apply_config(config)
        self.authority.keys = keys_by_name(config)
        self.limits.forget_others(set(self.authority.keys))
        self._flush_state()
        message = {"op": "config", "config": msgspec.to_builtins(config)}
        for worker in self._live():
            worker.channel.send(message)  # type: ignore[union-attr]
        log.info("reloaded: %d services, strategy %s", len(config.services), config.strategy)

    # --- from the workers ---------------------------------------------------------------

    def _handle(self, worker: _Worker, message: Message) -> None:
        worker.heard_at = time.monotonic()  # any message shows its loop runs
        op = message["op"]
        if op == "alive":
            return
        if op == "ready":
            if not worker.ready.done():
                worker.ready.set_result(message)
            log.info("worker %d serving (pid %d)", worker.slot, message["pid"])
        elif op == "inflight":
            worker.in_flight = message["counts"]
            self._in_flight_changed()
        elif op == "limit":
            assert worker.channel is not None
            self.authority.ask(worker.channel, message)
        elif op == "limit_end":
            assert worker.channel is not None
            self.authority.end(worker.channel, message)
        elif op == "eject":
            self.roster.eject(message["name"], message["reason"])
        elif op == "learnt":
            # What one worker's strategies learnt goes to the others, as it came.
            for other in self._live():
                if other is not worker:
                    other.channel.send(message)  # type: ignore[union-attr]
        elif op == "final":
            worker.snapshot = message["snapshot"]
        elif op == "http":
            path = message["path"]
            listing = path == b"/services" and message["method"] in (b"GET", b"HEAD")
            if listing or path in (b"/stats", b"/metrics"):
                # /services has the counts too, as the InfiniLM routers' does: gathered.
                task = asyncio.create_task(self._answer_figures(worker, message))
                self._watchers.add(task)
                task.add_done_callback(self._watchers.discard)
            else:
                status, payload = self.fleet.admin(message["method"], path, message["body"])
                self._flush_state()  # the asking worker sees the change before the answer
                self._reply(worker, message, status, b"application/json", encode_json(payload))

    def _reply(
        self, worker: _Worker, request: Message, status: int, content_type: bytes, body: bytes
    ) -> None:
        if worker.channel is not None:
            worker.channel.reply(
                request, {"status": status, "content_type": content_type, "body": body}
            )

    async def _answer_figures(self, worker: _Worker, request: Message) -> None:
        await self._gather()
        if request["path"] in (b"/stats", b"/services"):
            answer = api.stats if request["path"] == b"/stats" else api.services
            status, payload = answer(self)  # type: ignore[arg-type]
            self._reply(worker, request, status, b"application/json", encode_json(payload))
        else:
            self._reply(worker, request, 200, CONTENT_TYPE, self._summed_metrics().render())

    def _summed_metrics(self) -> Metrics:
        """Every worker's figures, those of workers that exited included."""
        metrics = Metrics(self.roster, lambda: self.queue_length)
        metrics.absorb(self.retired.state())
        for live in self.workers.values():
            if live.snapshot is not None:
                metrics.absorb(live.snapshot["metrics"])
        return metrics

    def pd_counts(self) -> dict[str, dict[str, int]]:
        return self._summed_metrics().pd_counts()

    def key_counts(self) -> dict[str, dict[str, Any]]:
        return with_under_way(self._summed_metrics().key_counts(), self.config, self.limits)

    def connection_figures(self) -> dict[str, Any]:
        """Every live worker's, summed: each worker admits its own (accept.Gate), limits
        and a source's share included, so the sums are the whole router's."""
        return sum_figures(
            [w.snapshot["connections"] for w in self._live() if w.snapshot is not None]
        )

    async def _gather(self) -> None:
        """Fresh figures from every live worker, summed into the registry's services."""

        async def ask(worker: _Worker) -> None:
            assert worker.channel is not None
            with contextlib.suppress(ChannelClosed, TimeoutError):
                reply = await worker.channel.ask({"op": "snapshot"}, SNAPSHOT_TIMEOUT_S)
                worker.snapshot = reply["snapshot"]

        await asyncio.gather(*(ask(w) for w in self._live()))
        snapshots = [w.snapshot for w in self.workers.values() if w.snapshot is not None]
        self.queue_length = sum(s["queue_length"] for s in snapshots)
        for service in self.roster.services.values():
            requests, errors = self.retired_counts.get(service.name, (0, 0))
            latencies: list[float] = []
            under_way = 0
            worker_error = ""
            # Each worker has its breakers: the service shows the worst (open, then
            # half-open), and the openings of them all.
            circuit, opened = CLOSED, 0
            for snapshot in snapshots:
                figures = snapshot["services"].get(service.name)
                if figures is None:
                    continue
                requests += figures["request_count"]
                errors += figures["error_count"]
                latencies += figures["latencies"]
                under_way += figures["in_flight"]
                worker_error = worker_error or figures["last_error"]
                state, count = figures.get("circuit", (CLOSED, 0))
                opened += count
                if WORSE[state] > WORSE[circuit]:
                    circuit = state
            service.breaker.mirror(circuit, opened)
            service.request_count = requests
            service.error_count = errors
            service.latencies = deque(latencies)
            service.in_flight = under_way
            if not service.last_error:
                service.last_error = worker_error

    # --- to the workers -------------------------------------------------------------------

    def _live(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.channel is not None and not w.channel.closed]

    def _state_changed(self) -> None:
        if not self._state_pending:
            self._state_pending = True
            self.loop.call_soon(self._flush_state)

    def _flush_state(self) -> None:
        if not self._state_pending:
            return
        self._state_pending = False
        message = {"op": "state", "state": self.roster.state()}
        for worker in self._live():
            worker.channel.send(message)  # type: ignore[union-attr]

    def _in_flight_changed(self) -> None:
        if not self._in_flight_pending:
            self._in_flight_pending = True
            self.loop.call_soon(self._send_in_flight)

    def _send_in_flight(self) -> None:
        """Tell each worker what the other workers have under way, per service."""
        self._in_flight_pending = False
        totals: dict[str, int] = {}
        for worker in self.workers.values():
            for name, count in worker.in_flight.items():
                totals[name] = totals.get(name, 0) + count
        for service in self.roster.services.values():
            service.in_flight = totals.get(service.name, 0)
        for worker in self._live():
            others = {n: t - worker.in_flight.get(n, 0) for n, t in totals.items()}
            if others != worker.sent_others:
                worker.sent_others = others
                worker.channel.send({"op": "others", "counts": others})  # type: ignore[union-attr]


async def supervise(config: Config, reload: Callable[[], Config] | None = None) -> None:
    """Run ``config.workers`` workers until SIGTERM or SIGINT; SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    demo_servers, demo_specs = await start_demo(config)
    supervisor = Supervisor(config, reload)
    supervisor.demo_specs = demo_specs
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, supervisor.hangup)
    try:
        await supervisor.run(stop)
    except BaseException:
        supervisor.stopping = True
        for worker in supervisor.workers.values():
            if worker.process is not None and worker.process.returncode is None:
                worker.process.kill()
        raise
    finally:
        for server in demo_servers:
            server.close()
    log.info("stopped (pid %d)", os.getpid())


def sum_figures(figures: list[dict[str, Any]]) -> dict[str, Any]:
    """Nested dicts of counts, summed key by key."""
    total: dict[str, Any] = {}
    for one in figures:
        for name, value in one.items():
            if isinstance(value, dict):
                total[name] = sum_figures([total.get(name, {}), value])
            else:
                total[name] = total.get(name, 0) + value
    return total
