"""The router: wires configuration, registry, health checks, strategy and server together.

:meth:`Router.dispatch` is where a complete client request turns into either a
local answer (the router's own endpoints) or a :class:`~lmproxy.proxy.Journey`.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import signal
from urllib.parse import unquote

import strategies
from lmproxy import api
from lmproxy.config import Config, ConfigError
from lmproxy.errors import json_response, status_line
from lmproxy.health import HealthChecker
from lmproxy.metrics import CONTENT_TYPE, Metrics
from lmproxy.proxy import Journey
from lmproxy.registry import Registry
from lmproxy.request import MODEL_PATHS
from lmproxy.server import ClientConnection, ClientRequest
from lmproxy.system import raise_open_file_limit
from lmproxy.upstream import Pool

log = logging.getLogger("lmproxy")

LOCAL_METHODS = (b"GET", b"HEAD")
# Timeouts are enforced by a sweep this often: a quarter of the shortest timeout,
# within these bounds, so a timeout fires at most 25% late.
MIN_SWEEP_S = 0.05
MAX_SWEEP_S = 1.0
NOT_FOUND_HINT = (
    "the router serves /v1/... (OpenAI API), /chat/completions, /completions, "
    "/models, /health, /services, /stats and /metrics"
)


class Router:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.registry = Registry(max_errors=config.max_errors)
        self.strategy = strategies.load(config.strategy, config.strategy_options)
        # Models with a strategy of their own; every other model uses self.strategy.
        self.model_strategies = {
            model: strategies.load(
                settings.strategy or config.strategy,
                settings.strategy_options
                if settings.strategy or settings.strategy_options
                else config.strategy_options,
            )
            for model, settings in config.models.items()
        }
        self.checker = HealthChecker(self.registry, config.health_interval, config.health_timeout)
        self.metrics = Metrics(self.registry)
        # Request ids: a random prefix per process and a counter, cheaper than uuid4.
        self._id_prefix = os.urandom(4).hex().encode()
        self._ids = itertools.count(1)
        self.connections: set[ClientConnection] = set()
        self.server: asyncio.Server | None = None
        self.draining = False
        self.port = config.port
        self._sweeper: asyncio.TimerHandle | None = None
        self.sweep_interval_s = max(
            MIN_SWEEP_S,
            min(
                MAX_SWEEP_S,
                config.header_timeout / 4,
                config.keepalive_timeout / 4,
                config.request_timeout / 4,
            ),
        )
        self._api_keys = [k.encode() for k in config.api_keys]
        self.max_connections = config.max_connections or _auto_max_connections()
        for spec in config.services:
            service = self.registry.add(spec)
            service.pool = Pool(
                service.host,
                service.port,
                max_idle=config.pool_max_idle,
                idle_timeout_s=config.pool_idle_timeout,
                connect_timeout_s=config.connect_timeout,
            )

    async def start(self) -> None:
        try:
            self.server = await self.loop.create_server(
                lambda: ClientConnection(self),
                self.config.host,
                self.config.port,
                reuse_address=True,
                backlog=4096,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}"
            ) from None
        self.port = self.server.sockets[0].getsockname()[1]
        self.checker.start()
        self._sweeper = self.loop.call_later(self.sweep_interval_s, self._sweep)
        log.info(
            "lmproxy listening on http://%s:%d (strategy %s, %d services, "
            "at most %d client connections)",
            self.config.host,
            self.port,
            self.config.strategy,
            len(self.registry.services),
            self.max_connections,
        )
        if not self.registry.services:
            log.warning("no backend services configured: give --backend URL, --config or --demo")
        if self.config.binds_publicly and not self._api_keys:
            log.warning(
                "listening on %s with no API keys: anyone who can reach port %d can use "
                "every backend; set --api-key or LMPROXY_API_KEYS, or bind --host 127.0.0.1",
                self.config.host,
                self.port,
            )

    # --- per request -------------------------------------------------------------

    def dispatch(self, client: ClientConnection, request: ClientRequest) -> None:
        try:
            self._dispatch(client, request)
        except Exception:
            # A bug must cost one request, never the connection's order or the router.
            log.exception("internal error on %s %r", request.method.decode(), request.target)
            if client.current is request and not client.closing:
                client.respond_error(500, "internal router error; see the router's log")

    def _dispatch(self, client: ClientConnection, request: ClientRequest) -> None:
        path = request.path
        handler = api.ROUTES.get(path)
        if handler is None and path.startswith(b"/v1/models/"):
            model_id = unquote(path[len(b"/v1/models/") :].decode("utf-8", "replace"))
            handler = lambda router: api.model(router, model_id)  # noqa: E731
        if handler is not None or path == b"/metrics":
            if request.method not in LOCAL_METHODS:
                client.respond_error(405, f"{path.decode()} only answers GET")
                return
            if path not in api.OPEN_PATHS and not self._authorized(request):
                client.respond_error(401, _UNAUTHORIZED)
                return
            if handler is None:
                client.respond(self._metrics_response(request))
                return
            status, payload = handler(self)
            client.respond(
                json_response(
                    status, payload, request.keep_alive, head_only=request.method == b"HEAD"
                )
            )
            return
        if not path.startswith(b"/v1/") and path not in MODEL_PATHS:
            client.respond_error(
                404, f"no route for {request.method.decode()} {path.decode()}; {NOT_FOUND_HINT}"
            )
            return
        if not self._authorized(request):
            client.respond_error(401, _UNAUTHORIZED)
            return
        if self.draining:
            request.keep_alive = False
        Journey(self, client, request).start()

    def next_request_id(self) -> bytes:
        return b"%s-%d" % (self._id_prefix, next(self._ids))

    def strategy_for(self, model: str | None) -> strategies.Strategy:
        if self.model_strategies and model is not None:
            return self.model_strategies.get(model, self.strategy)
        return self.strategy

    def _metrics_response(self, request: ClientRequest) -> bytes:
        """/metrics in the Prometheus text format (not JSON, unlike the other endpoints)."""
        body = self.metrics.render()
        head = b"%sContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n" % (
            status_line(200),
            CONTENT_TYPE,
            len(body),
            b"" if request.keep_alive else b"Connection: close\r\n",
        )
        return head if request.method == b"HEAD" else head + body

    def _authorized(self, request: ClientRequest) -> bool:
        if not self._api_keys:
            return True
        value = request.header(b"authorization") or b""
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        # compare_digest against every key, no short cut: the time taken tells nothing
        # about which key, or how much of one, was guessed.
        matches = [hmac.compare_digest(token, key) for key in self._api_keys]
        return any(matches)

    def _sweep(self) -> None:
        """Enforce every connection's timeouts: one timer for the router, none per request."""
        now = self.loop.time()
        for conn in list(self.connections):
            if conn.deadline <= now:
                conn.on_deadline()
            exchange = conn.exchange
            if exchange is not None:
                exchange.check_timeout(now)
        self._sweeper = self.loop.call_later(self.sweep_interval_s, self._sweep)

    # --- shutdown ----------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), then close all."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            if conn.current is None:
                conn.close()
        deadline = self.loop.time() + self.config.shutdown_timeout
        busy = [c for c in self.connections if c.current is not None]
        if busy:
            log.info(
                "waiting up to %gs for %d requests in flight",
                self.config.shutdown_timeout,
                len(busy),
            )
        while self.loop.time() < deadline and any(c.current is not None for c in self.connections):
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.checker.stop()
        for service in self.registry.services.values():
            if service.pool is not None:
                service.pool.close()


def _auto_max_connections() -> int:
    # Each client connection may hold a backend connection too, and the router
    # needs a few descriptors of its own.
    return max(16, (raise_open_file_limit() - 256) // 2)


_UNAUTHORIZED = "missing or invalid API key: send 'Authorization: Bearer <key>'"


async def serve(config: Config) -> None:
    """Run the router until SIGTERM or SIGINT, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    demo_servers = []
    if config.demo:
        from lmproxy.mock import start_demo_backends

        demo_servers, specs = await start_demo_backends()
        config.services = [*config.services, *specs]
    router = Router(config)
    await router.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await router.shutdown()
    for server in demo_servers:
        server.close()
    log.info("stopped")
