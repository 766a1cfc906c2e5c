"""The router: wires configuration, registry, health checks, strategy and server together.

:meth:`Router.dispatch` is where a complete client request turns into either a
local answer (the router's own endpoints) or a :class:`~lmproxy.journey.journey.Journey`.
The route table names the router's own paths and the OpenAI API's; a path in
neither is forwarded too (SGLang's /generate, vLLM's /tokenize...), looked up
only after the table missed, so the table's paths pay nothing for it.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import ipaddress
import itertools
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple, Protocol
from urllib.parse import parse_qs, unquote

import strategies
from lmproxy import api, errors
from lmproxy.backend import tls
from lmproxy.backend.upstream import Pool
from lmproxy.client.accept import Gate, Handshake, connection_limit, tls_protocol_for
from lmproxy.client.connection import ClientConnection, ClientRequest
from lmproxy.client.request import MODEL_PATHS
from lmproxy.config import Config, ConfigError
from lmproxy.errors import Fault, encode_json, http_response, json_response
from lmproxy.fleet.membership import FIRST_CHECKS_MAX_S, Fleet
from lmproxy.fleet.roster import Roster, Service, share
from lmproxy.journey.admission import AdmissionQueue
from lmproxy.journey.journey import Journey, log_crash
from lmproxy.keys.limits import Key, Limits, LocalLimits, RemoteLimits
from lmproxy.system import raise_open_file_limit
from lmproxy.telemetry import tracing
from lmproxy.telemetry.logs import printable
from lmproxy.telemetry.metrics import CONTENT_TYPE, Metrics
from lmproxy.workers.control import Channel

log = logging.getLogger("lmproxy")

# Timeouts are enforced by a sweep this often: a quarter of the shortest timeout,
# within these bounds, so a timeout fires at most 25% late.
MIN_SWEEP_S = 0.05
MAX_SWEEP_S = 1.0
# While some client's reading is paused, its socket is asked this often whether the
# client hung up (the event loop does not watch a paused socket).
HANGUP_POLL_S = 0.05
NOT_FOUND_HINT = (
    "the router takes origin-form paths (/v1/chat/completions, /health...): it forwards "
    "every path but its own to the services, and is not a forward proxy"
)


class Link(Protocol):
    """A worker's line to its supervisor (``worker.SupervisorLink``), as the router uses it."""

    WHOLE_ROUTER: frozenset[bytes]  # paths the supervisor answers for the whole router

    @property
    def instance_id(self) -> str: ...

    @property
    def workers(self) -> int: ...

    @property
    def channel(self) -> Channel: ...

    async def answer(self, client: ClientConnection, request: ClientRequest) -> None: ...


class Answering:
    """What answers a request for the whole router, in a task (the supervisor's figures,
    or its admin API, with --workers): the client connection's handle on it, so that a
    hang-up cancels it."""

    __slots__ = ("client", "task")

    def __init__(self, client: ClientConnection, answer: Coroutine[Any, Any, None]) -> None:
        self.client = client
        client.underway = self
        self.task = client.loop.create_task(self._run(answer))

    async def _run(self, answer: Coroutine[Any, Any, None]) -> None:
        try:
            await answer
        finally:
            if self.client.underway is self:
                self.client.underway = None

    def cancel(self) -> None:
        self.task.cancel()

    def pause(self) -> None:
        pass  # an answer of the router's own is small

    def resume(self) -> None:
        pass

    def check_timeout(self, now: float) -> None:
        pass  # the supervisor's answer has its own deadline (worker.ASK_TIMEOUT_S)


class Access(enum.Enum):
    OPEN = "open"  # probes: no secret needed
    API = "api"  # an API key, when --api-key is set
    ADMIN = "admin"  # the admin token; with none set, loopback clients only


class Endpoint(NamedTuple):
    access: Access
    handle: Callable[[ClientConnection, ClientRequest], None]


Route = dict[bytes, Endpoint]  # method -> endpoint; ANY_METHOD matches the rest
ANY_METHOD = b"*"


class Router:
    """One serving process: the whole router, or one of ``--workers`` N.

    A worker has no fleet of its own: ``link`` mirrors the supervisor's registry
    into it and carries what must be answered for the whole router (/stats,
    /metrics, the admin API) to the supervisor.
    """

    def __init__(self, config: Config, link: Link | None = None) -> None:
        # First: some error answers are built once, here and in the gate.
        errors.configure(config.compat, config.error_format)
        self.config = config
        self.loop = asyncio.get_running_loop()
        self.link = link
        # Names this router in the Via header of what it forwards; the workers of one
        # router share the supervisor's, so a loop through any of them is seen at once.
        self.instance_id = link.instance_id if link is not None else new_instance_id()
        self.via_token = self.instance_id.encode()
        self.via_line = b"Via: 1.1 %s\r\n" % self.via_token
        self.roster = Roster(max_errors=config.max_errors, make_pool=self._make_pool)
        self.roster.configure_breakers(*config.breaker_settings)
        self.roster.backend_tls = backend_tls(config)
        # Before any service is added: a CA or certificate file that cannot be read
        # stops the start here, with its name.
        self.ssl = tls.server_context(config)
        for spec in config.services:
            self.roster.tls_context(spec)
        if link is not None:
            self.roster.limit_share = link.workers
        self.strategy, self.model_strategies = load_strategies(config)
        self.policies = _has_policies(config)
        self.model_policies = _has_model_policies(config)
        tracing.reset()  # this process's own trace ids (a worker is a process of its own)
        # --otlp-endpoint: one span per proxied request (tracing.py); None: trace context only.
        self.tracer = (
            tracing.Exporter(config.otlp_endpoint, config.otel_sample_ratio)
            if config.otlp_endpoint
            else None
        )
        # Disaggregated models (journey/pair.py): each side's strategy.
        self.prefill_strategy = strategies.load(config.prefill_strategy, {})
        self.decode_strategy = strategies.load(config.decode_strategy, {})
        self.fleet = Fleet(self.roster, config, self.instance_id) if link is None else None
        self.admission = AdmissionQueue(
            self.roster, config.queue_timeout, config.max_queue, self._router_limit(config)
        )
        self.roster.set_router_limit(self.admission.max_concurrent)
        self.metrics = Metrics(self.roster, lambda: len(self.admission))
        # Request ids: a random prefix per process and a counter, cheaper than uuid4.
        self._id_prefix = os.urandom(4).hex().encode()
        self._ids = itertools.count(1)
        self.connections: set[ClientConnection] = set()
        self.handshakes: set[Handshake] = set()  # TLS connections still in their handshake
        self.paused: set[ClientConnection] = set()  # reading paused: polled for hang-ups
        self._hangup_poll: asyncio.TimerHandle | None = None
        self.server: asyncio.Server | None = None
        self.metrics_server: asyncio.Server | None = None  # --prometheus-port
        self.draining = False
        self.port = config.port
        self._sweeper: asyncio.TimerHandle | None = None
        self.sweep_interval_s = max(
            MIN_SWEEP_S,
            min(
                MAX_SWEEP_S,
                config.header_timeout / 4,
                config.body_timeout / 4,
                config.send_timeout / 4,
                config.keepalive_timeout / 4,
                config.request_timeout / 4,
                config.queue_timeout / 4 or MAX_SWEEP_S,
            ),
        )
        self._keys = key_table(config)
        # [[keys]] limits: kept by the supervisor with --workers, else here (or in Redis).
        self.limits: Limits = (
            RemoteLimits(link.channel)
            if link is not None
            else authority_limits(config, self.instance_id)
        )
        self._admin_token = config.admin_token.encode() if config.admin_token else None
        self.gate = Gate(
            connection_limit(config.max_connections, raise_open_file_limit()),
            config.max_connections_per_ip,
            config.max_handshakes,
        )
        self.handshake_timeout = config.handshake_timeout
        self.tls_protocol = tls_protocol_for(self.loop)
        self._routes = self._route_table()
        self._prefixes = self._prefix_table()
        self._forwarded: Route = {ANY_METHOD: Endpoint(Access.API, self._proxy)}

    def _router_limit(self, config: Config) -> int:
        """This process's share of --max-concurrent-requests (the workers split it)."""
        workers = self.link.workers if self.link is not None else 1
        return share(config.max_concurrent_requests, workers)

    def _make_pool(self, service: Service) -> Pool:
        config = self.config
        return Pool(
            service.host,
            service.port,
            max_idle=config.pool_max_idle,
            idle_timeout_s=config.pool_idle_timeout,
            connect_timeout_s=config.connect_timeout,
            ssl=service.ssl,
            server_name=service.server_name,
        )

    def tls_client(self, source: str) -> ClientConnection:
        """The HTTP side of a TLS connection, admitted at its accept (accept.Handshake)."""
        return ClientConnection(self, source)

    async def start(self) -> None:
        # Over TLS the listener is a plain one too: a Handshake drives the handshake, so
        # that the connection counts from its accept, not from its handshake's end.
        factory: Callable[[], asyncio.Protocol] = (
            (lambda: ClientConnection(self)) if self.ssl is None else (lambda: Handshake(self))
        )
        try:
            self.server = await self.loop.create_server(
                factory,
                self.config.host,
                self.config.port,
                reuse_address=True,
                # Workers share the port: the kernel spreads connections among them.
                reuse_port=self.link is not None,
                backlog=4096,
                # Bound (its port is known, so a backend at it is seen as a loop) but
                # accepting only once the first health checks are done.
                start_serving=False,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror or exc}"
            ) from None
        self.port = self.server.sockets[0].getsockname()[1]
        if self.config.prometheus_port and self.link is None:
            await self._serve_metrics()
        if self.fleet is not None:
            self.fleet.own_port = self.port
            self.fleet.start()
            await self.fleet.first_checks(min(self.config.health_timeout, FIRST_CHECKS_MAX_S))
        await self.server.start_serving()
        self._sweeper = self.loop.call_later(self.sweep_interval_s, self._sweep)
        if self.link is not None:
            return  # the supervisor reports the router as a whole
        gate = self.gate
        log.info(
            "lmproxy listening on %s://%s:%d (strategy %s, %d services, "
            "at most %d client connections, %d per address%s)",
            "https" if self.ssl is not None else "http",
            self.config.host,
            self.port,
            self.config.strategy,
            len(self.roster.services),
            gate.limit,
            gate.per_source,
            f", {gate.handshake_limit} in TLS handshakes" if self.ssl is not None else "",
        )

    async def _serve_metrics(self) -> None:
        """sglang-router's --prometheus-port: a listener of its own that answers /metrics
        (and 404 to the rest), with the router's connection handling and limits. With
        --workers the supervisor opens it."""
        host = self.config.prometheus_host or self.config.host
        port = self.config.prometheus_port
        try:
            self.metrics_server = await self.loop.create_server(
                lambda: ClientConnection(MetricsOnly(self)),
                host,
                port,
                reuse_address=True,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} (--prometheus-port): {exc.strerror or exc}"
            ) from None
        log.info("serving /metrics on http://%s:%d (--prometheus-port)", host, port)

    # --- per request -------------------------------------------------------------

    def dispatch(self, client: ClientConnection, request: ClientRequest) -> None:
        try:
            self._dispatch(client, request)
        except Exception as exc:
            # A bug must cost one request, never the connection's order or the router.
            log_crash(
                exc, f"internal error on {printable(request.method)} {printable(request.path)}"
            )
            if client.current is request and not client.closing:
                client.respond_error(Fault.INTERNAL, "internal router error; see the router's log")

    def _dispatch(self, client: ClientConnection, request: ClientRequest) -> None:
        if request.looped:
            # Our own Via came back: a service (or a chain of routers) leads here.
            client.respond_error(Fault.LOOP_DETECTED, LOOP_MESSAGE)
            return
        path = request.path
        route = self._routes.get(path) or self._prefix_route(path)
        if route is None:
            route = self._unrouted(client, request)
            if route is None:
                return
        endpoint = route.get(request.method) or route.get(ANY_METHOD)
        if endpoint is None:
            self._not_allowed(client, request, route)
            return
        access = endpoint.access
        # Checked inline for the common case, an open API (no keys): no call on the hot path.
        if (access is Access.ADMIN or (access is Access.API and self._keys)) and not (
            self._admits(client, request, endpoint)
        ):
            return
        endpoint.handle(client, request)

    def _unrouted(self, client: ClientConnection, request: ClientRequest) -> Route | None:
        """The route of a path that is not the router's own, or None once answered."""
        if request.method == b"CONNECT":
            client.respond_error(
                Fault.METHOD_NOT_ALLOWED,
                "CONNECT is not served: lmproxy is not a forward proxy",
            )
            return None
        if not request.path.startswith(b"/"):  # an absolute URL or "*": for a forward proxy
            client.respond_error(
                Fault.NOT_FOUND,
                f"no route for {printable(request.method)} {printable(request.path)}; "
                f"{NOT_FOUND_HINT}",
            )
            return None
        # Not the router's own: the backends' (SGLang's /generate, vLLM's /tokenize,
        # /version...), forwarded as the InfiniLM routers forward every path.
        return self._forwarded

    def _not_allowed(self, client: ClientConnection, request: ClientRequest, route: Route) -> None:
        allowed = ", ".join(m.decode() for m in route)
        client.respond_error(
            Fault.METHOD_NOT_ALLOWED,
            f"{printable(request.path)} answers {allowed}, not {printable(request.method)}",
            b"Allow: %s\r\n" % allowed.encode(),
        )

    # --- the route table: path -> method -> (who may, what answers) ---------------------

    def _route_table(self) -> dict[bytes, Route]:
        def local(handler: Callable[[Router], api.Payload], access: Access = Access.API) -> Route:
            endpoint = Endpoint(access, lambda c, r: self._answer(c, r, handler))
            return {b"GET": endpoint, b"HEAD": endpoint}

        proxied = {b"POST": Endpoint(Access.API, self._proxy)}
        read = Endpoint(Access.API, self._fleet)
        models = Endpoint(Access.API, self._models)
        metrics = Endpoint(Access.API, self._metrics)
        return {
            b"/health": local(api.health, Access.OPEN),
            b"/status": local(api.health, Access.OPEN),  # the InfiniLM routers' alias
            b"/readiness": local(api.readiness, Access.OPEN),
            b"/liveness": local(api.liveness, Access.OPEN),
            b"/models": {b"GET": models, b"HEAD": models},
            b"/v1/models": {b"GET": models, b"HEAD": models},
            b"/stats": local(api.stats),
            b"/metrics": {b"GET": metrics, b"HEAD": metrics},
            b"/services": {**local(api.services), b"POST": Endpoint(Access.ADMIN, self._fleet)},
            # The Rust routers' worker API (admin.AdminSource.workers): reading it is as open as
            # /services; changing it is the admin's.
            b"/workers": {
                b"GET": read,
                b"HEAD": read,
                b"POST": Endpoint(Access.ADMIN, self._fleet),
            },
            b"/list_workers": {b"GET": read, b"HEAD": read},
            b"/add_worker": {b"POST": Endpoint(Access.ADMIN, self._worker_by_query)},
            b"/remove_worker": {b"POST": Endpoint(Access.ADMIN, self._worker_by_query)},
            **dict.fromkeys(MODEL_PATHS, proxied),
        }

    def _prefix_table(self) -> list[tuple[bytes, Route]]:
        """Routes by path prefix, for the paths the table does not name; first match wins."""
        model = Endpoint(Access.API, self._model)
        # Reading a service is as open as the /services list; changing one is the admin's.
        read = Endpoint(Access.API, self._fleet)
        return [
            (b"/v1/models/", {b"GET": model, b"HEAD": model}),
            (
                b"/services/",
                {b"GET": read, b"HEAD": read, ANY_METHOD: Endpoint(Access.ADMIN, self._fleet)},
            ),
            (
                b"/workers/",
                {b"GET": read, b"HEAD": read, b"DELETE": Endpoint(Access.ADMIN, self._fleet)},
            ),
            (b"/v1/", {ANY_METHOD: Endpoint(Access.API, self._proxy)}),
        ]

    def _prefix_route(self, path: bytes) -> Route | None:
        for prefix, route in self._prefixes:
            if path.startswith(prefix):
                return route
        return None

    def _admits(self, client: ClientConnection, request: ClientRequest, endpoint: Endpoint) -> bool:
        """API keys for the API (when set); for the admin API's changes, the admin token,
        or with none set, a loopback client. Answers the refusal itself."""
        if endpoint.access is Access.API:
            if self._authenticate(request):
                return True
            client.respond_error(Fault.UNAUTHORIZED, _UNAUTHORIZED)
        elif self._admin_token is not None:
            if _bearer_matches(request, [self._admin_token]):
                return True
            client.respond_error(Fault.UNAUTHORIZED, _ADMIN_UNAUTHORIZED)
        elif _is_loopback(client):
            return True
        else:
            client.respond_error(Fault.FORBIDDEN, _ADMIN_FORBIDDEN)
        return False

    # --- what answers ------------------------------------------------------------------

    def _answer(
        self,
        client: ClientConnection,
        request: ClientRequest,
        handler: Callable[[Router], api.Payload],
    ) -> None:
        if self.link is not None and request.path in self.link.WHOLE_ROUTER:
            # The whole router's: every worker's figures, or what the supervisor keeps.
            Answering(client, self.link.answer(client, request))
            return
        status, payload = handler(self)
        client.respond(
            json_response(status, payload, request.keep_alive, head_only=request.method == b"HEAD")
        )

    def _models(self, client: ClientConnection, request: ClientRequest) -> None:
        """The models list; a [[keys]] key with models sees only those."""
        allowed = request.key.models if request.key is not None else frozenset()
        self._answer(client, request, lambda router: api.models(router, allowed))

    def _model(self, client: ClientConnection, request: ClientRequest) -> None:
        model_id = unquote(request.path[len(b"/v1/models/") :].decode("utf-8", "replace"))
        allowed = request.key.models if request.key is not None else frozenset()
        self._answer(client, request, lambda router: api.model(router, model_id, allowed))

    def _metrics(self, client: ClientConnection, request: ClientRequest) -> None:
        if self.link is not None:
            Answering(client, self.link.answer(client, request))
            return
        client.respond(
            http_response(
                200,
                CONTENT_TYPE,
                self.metrics.render(),
                request.keep_alive,
                head_only=request.method == b"HEAD",
            )
        )

    def _fleet(self, client: ClientConnection, request: ClientRequest) -> None:
        """The admin API: answered by the fleet (the supervisor's, with --workers)."""
        if self.link is not None:
            Answering(client, self.link.answer(client, request))
            return
        assert self.fleet is not None
        status, payload = self.fleet.admin(request.method, request.path, request.body)
        client.respond(json_response(status, payload, request.keep_alive))

    def _worker_by_query(self, client: ClientConnection, request: ClientRequest) -> None:
        """``POST /add_worker?url=U`` and ``/remove_worker?url=U`` (the Rust routers' older
        worker API): the query's URL becomes the body the fleet reads, so that with
        --workers it reaches the supervisor as any admin request does."""
        query = request.target.partition(b"?")[2].decode("utf-8", "replace")
        urls = parse_qs(query).get("url")
        request.body = encode_json({"url": urls[0]}) if urls else request.body
        self._fleet(client, request)

    def _proxy(self, client: ClientConnection, request: ClientRequest) -> None:
        path = request.path
        if (b"/." in path or b"%" in path) and _has_dot_segment(path):
            # A backend that resolves them would serve another path than the one routed
            # (what the /v1/ gate keeps out, or, forwarded, one of the router's own).
            client.respond_error(
                Fault.BAD_REQUEST,
                "the path has a '.' or '..' segment (or an encoded one); send it resolved",
            )
            return
        if self.draining:
            request.keep_alive = False
        Journey(self, client, request).start()

    @property
    def queue_length(self) -> int:
        return len(self.admission)

    def apply(self, config: Config) -> None:
        """A reloaded config: new strategy and settings; services through the fleet.

        Requests under way keep the strategy they started with; an unchanged
        strategy is kept with what it has learnt. Listening address, workers and
        connection-pool settings need a restart.
        """
        old = self.config
        for name in RESTART_ONLY:
            if getattr(old, name) != getattr(config, name):
                log.warning("reload: %s changed; it takes effect after a restart", name)
        if (old.strategy, old.strategy_options, old.models) != (
            config.strategy,
            config.strategy_options,
            config.models,
        ):
            # Only then: a strategy's learnt state (prefix trees, latencies) is kept.
            self.strategy, self.model_strategies = load_strategies(config)
        if (old.prefill_strategy, old.decode_strategy) != (
            config.prefill_strategy,
            config.decode_strategy,
        ):
            self.prefill_strategy = strategies.load(config.prefill_strategy, {})
            self.decode_strategy = strategies.load(config.decode_strategy, {})
        if (old.ssl_certfile is None) != (config.ssl_certfile is None):
            log.warning("reload: serving HTTPS or not changed; it takes effect after a restart")
        elif self.ssl is not None and config.ssl_certfile:
            try:  # a renewed certificate: new handshakes get it, open connections keep theirs
                tls.load_server_certificate(self.ssl, config)
            except ConfigError as exc:
                log.error("reload: keeping the certificate in use: %s", exc)
        self.roster.backend_tls = backend_tls(config)
        self.config = config
        self.policies = _has_policies(config)
        self.model_policies = _has_model_policies(config)
        self.roster.max_errors = config.max_errors
        self.roster.configure_breakers(*config.breaker_settings)
        self.admission.timeout_s = config.queue_timeout
        self.admission.max_queue = config.max_queue
        self.admission.max_concurrent = self._router_limit(config)
        self.roster.set_router_limit(self.admission.max_concurrent)
        self._keys = key_table(config)
        self.limits.forget_others({spec.name for spec in config.keys})
        self._admin_token = config.admin_token.encode() if config.admin_token else None
        if self.fleet is not None:
            self.fleet.apply_config(config)

    def next_request_id(self) -> bytes:
        return b"%s-%d" % (self._id_prefix, next(self._ids))

    def pd_counts(self) -> dict[str, dict[str, int]]:
        return self.metrics.pd_counts()

    def key_counts(self) -> dict[str, dict[str, Any]]:
        return with_under_way(self.metrics.key_counts(), self.config, self.limits)

    def connection_figures(self) -> dict[str, Any]:
        return self.gate.figures()

    def pd_mode(self, model: str) -> str:
        settings = self.config.models.get(model)
        return (settings.pd_mode if settings else None) or self.config.pd_mode

    def strategy_for(self, model: str | None) -> strategies.Strategy:
        if self.model_strategies and model is not None:
            return self.model_strategies.get(model, self.strategy)
        return self.strategy

    def _authenticate(self, request: ClientRequest) -> bool:
        """Whether the request carries a key; a [[keys]] key goes with it (``request.key``)."""
        token = _bearer_token(request)
        if token is None:
            return False
        digest = hashlib.sha256(token).digest()
        if digest not in self._keys:
            return False
        request.key = self._keys[digest]
        return True

    def watch_paused(self, client: ClientConnection) -> None:
        """Poll a client whose reading is paused for a hang-up, until it reads again."""
        self.paused.add(client)
        if self._hangup_poll is None:
            self._hangup_poll = self.loop.call_later(HANGUP_POLL_S, self._poll_paused)

    def _poll_paused(self) -> None:
        self._hangup_poll = None
        for client in list(self.paused):
            if client.peer_gone():
                self.paused.discard(client)
                client.abort()
        if self.paused:
            self._hangup_poll = self.loop.call_later(HANGUP_POLL_S, self._poll_paused)

    def _sweep(self) -> None:
        """Enforce every connection's timeouts: one timer for the router, none per request."""
        now = self.loop.time()
        send_timeout = self.config.send_timeout
        try:
            for conn in list(self.connections):
                try:
                    self._sweep_one(conn, now, send_timeout)
                except Exception as exc:  # a bug: it costs that connection, not every deadline
                    log_crash(exc, "the sweep failed on a client connection, which is closed")
                    conn.abort()
            if self.admission.waiting:
                self.admission.expire(now)
            if self.roster.open_circuits:
                self.roster.recover_circuits()
        finally:
            self._sweeper = self.loop.call_later(self.sweep_interval_s, self._sweep)

    def _sweep_one(self, conn: ClientConnection, now: float, send_timeout: float) -> None:
        if conn.deadline <= now:
            conn.on_deadline()
        flow = conn.flow
        if flow.write_paused and now - flow.write_paused_at >= send_timeout:
            # The client has read nothing of its answers for that long: it holds a
            # connection (and maybe a backend's) for nothing.
            log.info("closing a client that read nothing for %gs (--send-timeout)", send_timeout)
            conn.abort()
            return
        underway = conn.underway
        if underway is not None:
            underway.check_timeout(now)

    # --- shutdown ----------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), then close all."""
        self.draining = True
        if self.server is not None:
            self.server.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        await self._finish_in_flight()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for handshake in list(self.handshakes):
            handshake.abort()
        await self._stop_parts()

    async def _finish_in_flight(self) -> None:
        """Close the idle connections, and wait (up to --shutdown-timeout) for the
        requests in flight on the others to end."""
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

    async def _stop_parts(self) -> None:
        """Stop what runs beside the connections: tracing, limits, timers, discovery,
        and the backend pools."""
        if self.tracer is not None:
            self.tracer.shutdown()  # what is still queued is exported
        await self.limits.aclose()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._hangup_poll is not None:
            self._hangup_poll.cancel()
        if self.fleet is not None:
            await self.fleet.stop()
        for service in self.roster.services.values():
            if service.pool is not None:
                service.pool.close()


class MetricsOnly:
    """The router as the --prometheus-port listener's connections see it: the same
    connections, limits and sweep, and a dispatch that answers /metrics alone."""

    def __init__(self, router: Router) -> None:
        self.router = router

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.router.loop

    @property
    def config(self) -> Config:
        return self.router.config

    @property
    def connections(self) -> set[ClientConnection]:
        return self.router.connections

    @property
    def paused(self) -> set[ClientConnection]:
        return self.router.paused

    @property
    def gate(self) -> Gate:
        return self.router.gate

    @property
    def via_token(self) -> bytes:
        return self.router.via_token

    @property
    def draining(self) -> bool:
        return self.router.draining

    def dispatch(self, client: ClientConnection, request: ClientRequest) -> None:
        if request.path == b"/metrics" and request.method in (b"GET", b"HEAD"):
            self.router.dispatch(client, request)
        else:
            client.respond_error(
                Fault.NOT_FOUND,
                "this port (--prometheus-port) serves GET /metrics only; the API is on --port",
            )

    def watch_paused(self, client: ClientConnection) -> None:
        self.router.watch_paused(client)


def new_instance_id() -> str:
    """This router's name in Via headers: random, so two routers never share one."""
    return "lmproxy-" + os.urandom(6).hex()


def _has_dot_segment(path: bytes) -> bool:
    """Whether ``path`` has a ``.`` or ``..`` segment, also percent-encoded."""
    decoded = unquote(path.decode("latin-1")) if b"%" in path else path.decode("latin-1")
    return any(segment in (".", "..") for segment in decoded.split("/"))


def _has_policies(config: Config) -> bool:
    """Whether a request may meet a policy: an alias, fallbacks, or a [[keys]] key."""
    return bool(config.keys) or _has_model_policies(config)


def _has_model_policies(config: Config) -> bool:
    return bool(config.aliases) or any(m.fallbacks for m in config.models.values())


def key_table(config: Config) -> dict[bytes, Key | None]:
    """Every key the API takes, by its SHA-256: [[keys]] entries, and the unnamed ones of
    --api-key and LMPROXY_API_KEYS (None: no name, no limits). Empty: the API is open."""
    table: dict[bytes, Key | None] = {
        hashlib.sha256(k.encode()).digest(): None for k in config.api_keys
    }
    for spec in config.keys:
        table[spec.digest] = Key(spec)
    return table


def with_under_way(
    counts: dict[str, dict[str, Any]], config: Config, limits: Limits
) -> dict[str, dict[str, Any]]:
    """/stats' keys: every configured key's figures, with its requests under way."""
    for spec in config.keys:
        figures = counts.setdefault(
            spec.name,
            {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "rejected": {}},
        )
        figures["in_flight"] = limits.under_way(spec.name)
    return counts


def authority_limits(config: Config, replica: str) -> Limits:
    """The process that keeps the limits: in Redis with --redis-url, else its own."""
    if config.redis_url:  # even with no limit yet: a reload may set some
        from lmproxy.keys.redis_limits import RedisLimits

        return RedisLimits(config.redis_url, config.redis_prefix, replica)
    return LocalLimits()


def load_strategies(
    config: Config,
) -> tuple[strategies.Strategy, dict[str, strategies.Strategy]]:
    """The router's strategy, and the models' own (every other model uses the first)."""
    default = strategies.load(config.strategy, config.strategy_options)
    per_model = {
        model: strategies.load(
            settings.strategy or config.strategy,
            settings.strategy_options
            if settings.strategy or settings.strategy_options
            else config.strategy_options,
        )
        for model, settings in config.models.items()
    }
    return default, per_model


def _bearer_token(request: ClientRequest) -> bytes | None:
    value = request.header(b"authorization") or b""
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip()


def _bearer_matches(request: ClientRequest, secrets: list[bytes]) -> bool:
    token = _bearer_token(request)
    # compare_digest, no short cut: the time taken tells nothing about how much of the
    # secret was guessed. (API keys are looked up by their SHA-256, which tells as little.)
    return token is not None and any([hmac.compare_digest(token, s) for s in secrets])


def _is_loopback(client: ClientConnection) -> bool:
    transport = client.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def backend_tls(config: Config) -> tuple[str | None, str | None, str | None, bool]:
    """What an https:// service that sets none of its own TLS settings uses."""
    return (
        config.backend_ca_certs,
        config.backend_certfile,
        config.backend_keyfile,
        config.backend_verify,
    )


# Settings a reload cannot change in a running process.
RESTART_ONLY = (
    "host",
    "port",
    "workers",
    "ssl_ca_certs",
    "ssl_cert_reqs",
    "max_connections",
    "max_connections_per_ip",
    "max_handshakes",
    "handshake_timeout",
    "pool_max_idle",
    "pool_idle_timeout",
    "connect_timeout",
    "keepalive_timeout",
    "header_timeout",
    "demo",
    "otlp_endpoint",  # the exporter is made once, with its thread
    "otel_sample_ratio",
    "redis_url",  # the Redis client and its heartbeat are made once
    "redis_prefix",
    "compat",  # statuses and error bodies some answers have prebuilt
    "error_format",
    "prometheus_port",
    "prometheus_host",
)
LOOP_MESSAGE = (
    "routing loop: this request already passed through this router (its Via header names "
    "it); a service's URL points back at the router itself; fix that service's address"
)
_UNAUTHORIZED = "missing or invalid API key: send 'Authorization: Bearer <key>'"
_ADMIN_UNAUTHORIZED = (
    "admin endpoints need 'Authorization: Bearer <admin token>' (the router's --admin-token "
    "or LMPROXY_ADMIN_TOKEN)"
)
_ADMIN_FORBIDDEN = (
    "admin endpoints answer only loopback clients while no admin token is set; start the "
    "router with --admin-token (or LMPROXY_ADMIN_TOKEN) to allow others"
)
