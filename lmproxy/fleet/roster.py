"""The roster: the services the router knows, the models each serves, and whether each
is healthy. (The word "registry" is kept for the InfiniLM-SVC registry it may poll.)

Health has two inputs: the active checker (``health.py``) sets it after every
probe, and the proxy ejects a service passively after ``max_errors`` consecutive
failed requests. An ejected service comes back only through a passing probe.
Besides health, each service has a circuit breaker (``breaker.py``), which its
requests' 5xx answers and failures open and which closes by itself, through
half-open trials: a service is routed to while healthy and its breaker routable.
The per-model candidate lists are cached and rebuilt only when health or
membership changes, so a request's lookup is one dict access.

Membership changes at run time (``membership.py``: the admin API, an InfiniLM
registry, a reloaded config). A removed service leaves the lookups at once;
requests already on it finish, and its connections close as they come back.
In a worker process the whole state is mirrored from the supervisor (``sync``).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from lmproxy.backend import tls
from lmproxy.config import ServiceSpec
from lmproxy.fleet.breaker import (
    CLOSED,
    DEFAULT_FAILURE_THRESHOLD,
    DEFAULT_SUCCESS_THRESHOLD,
    DEFAULT_TIMEOUT_S,
    HALF_OPEN,
    SERVER_ERRORS,
    Breaker,
)
from lmproxy.telemetry.logs import iso_time, masked_url

if TYPE_CHECKING:
    from lmproxy.backend.upstream import Pool

log = logging.getLogger("lmproxy")

LATENCY_WINDOW = 100  # requests behind the mean in /stats
# What one backend can make the router hold: its models past these are refused.
MAX_MODELS_PER_SERVICE = 1000
MAX_MODEL_ID = 256
LOGGED_MODELS = 20  # a log line or error message names at most this many models
LOGGED_SERVICES = 5  # an error message explains at most this many services
HEARTBEAT_FRESH_S = 120.0  # the InfiniLM registry's rule for an entry's health


class ModelInfo:
    """What /v1/models says of a model; None where no service has told it."""

    __slots__ = ("created", "owned_by")

    def __init__(self, created: int | None, owned_by: str | None) -> None:
        self.created = created
        self.owned_by = owned_by


class Entry(msgspec.Struct):
    """A registration the router keeps, lists and takes heartbeats for, but never
    routes to: a service of another ``metadata.type`` than ``openai-api``, such as
    the supervisor ("babysitter") that InfiniLM registers beside its server.

    It is healthy as the InfiniLM registry reckons: status ``running`` and a
    heartbeat (or the registration) under HEARTBEAT_FRESH_S old.
    """

    name: str
    url: str
    type: str
    status: str = "running"
    metadata: dict[str, Any] = {}
    registered_at: float = 0.0  # epoch seconds
    last_heartbeat: float = 0.0  # epoch seconds

    @property
    def healthy(self) -> bool:
        return self.status == "running" and time.time() - self.last_heartbeat < HEARTBEAT_FRESH_S


class Service:
    """One backend service: its address, models, health and live figures."""

    __slots__ = (
        "breaker",
        "cache_type",
        "circuit_reason",
        "consecutive_errors",
        "engine_at",
        "engine_extra",
        "engine_full",
        "engine_kv",
        "engine_models",
        "engine_running",
        "engine_waiting",
        "error_count",
        "health_path",
        "healthy",
        "host",
        "host_header",
        "in_flight",
        "last_check",
        "last_error",
        "last_error_at",
        "latencies",
        "local_in_flight",
        "max_in_flight",
        "metrics_missing",
        "models",
        "models_capped",
        "models_configured",
        "models_known",
        "name",
        "on_circuit",
        "on_free",
        "origin",
        "path_prefix",
        "pool",
        "port",
        "request_count",
        "role",
        "server_name",
        "spec",
        "ssl",
        "url",
        "watched",
        "weight",
    )

    def __init__(self, spec: ServiceSpec, origin: str = "config") -> None:
        self.spec = spec
        # Who added it: "config", "admin" or "registry"; each source manages its own.
        self.origin = origin
        self.name = spec.name
        self.url = spec.base_url
        self.host = spec.host
        self.server_name = spec.server_name or spec.host  # what its certificate must name
        self.port = spec.port
        self.role = spec.role  # "both": whole requests; "prefill"/"decode": one step (pair.py)
        host = f"[{spec.host}]" if ":" in spec.host else spec.host  # IPv6 literal
        self.host_header = f"{host}:{spec.port}".encode()
        self.path_prefix = spec.path_prefix.encode()
        self.weight = spec.weight
        self.health_path = spec.health_path
        self.cache_type = cache_type_of(spec)  # "static": takes infini-router's large prompts
        # https://: the one TLS context of its requests, checks and scrapes (Roster.add).
        self.ssl: ssl.SSLContext | None = None
        self.models: tuple[str, ...] = tuple(spec.models)
        self.models_configured = bool(spec.models)
        # False until the models are known: configured, or listed by the backend once.
        self.models_known = self.models_configured
        self.healthy = False
        self.consecutive_errors = 0
        self.request_count = 0
        self.error_count = 0
        # in_flight: requests under way at this service from the whole router (other
        # workers' share as last synced); local_in_flight: this process's own, which
        # admission control (max_in_flight, a per-process share) counts against.
        self.in_flight = 0
        self.local_in_flight = 0
        self.max_in_flight = spec.max_in_flight
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.last_check: float | None = None
        self.last_error = ""  # kept after the service recovers, with its time
        self.last_error_at: float | None = None
        self.models_capped = False  # it listed more models than are taken (warned once)
        self.pool: Pool | None = None
        self.on_free: Callable[[], None] = _nothing  # the registry's slot_freed
        # Its requests' 5xx answers and failures (breaker.py); the registry sets its
        # thresholds, and hears through on_circuit when a trial changes routing.
        self.breaker = Breaker()
        self.on_circuit: Callable[[], None] = _nothing
        self.circuit_reason = ""  # why it last opened, as logged
        # An error streak or a breaker not clean: the request path's one check (in
        # acquire, release and after an answer), kept by note_streaks.
        self.watched = False
        # The engine's own load, scraped from its /metrics (load.py): None until known.
        self.engine_running: int | None = None
        self.engine_waiting: int | None = None
        self.engine_kv: float | None = None
        self.engine_models: dict[str, tuple[int, int]] = {}  # model_name: (running, waiting)
        self.engine_at: float | None = None  # epoch seconds of the last scrape
        # What the load-aware strategies add to in_flight: the engine's requests that are
        # not this router's (other routers', direct clients'); 0 when stale or unknown.
        self.engine_extra = 0
        # The engine queues requests (its batch is full), as of a fresh scrape.
        self.engine_full = False
        self.metrics_missing = False  # no /metrics with load figures: not scraped again

    # The only places in_flight changes on the request path: httpcore keeps its pool's
    # bookkeeping in one function, and so does this.

    def acquire(self) -> None:
        """A request chose this service: it holds a slot until ``release``."""
        self.in_flight += 1
        self.local_in_flight += 1
        if self.watched and self.breaker.begin_trial():
            self.on_circuit()  # half-open: the one request let through, none beside it

    def release(self) -> None:
        """The request's slot is free again; a request waiting for one is woken."""
        self.in_flight -= 1
        self.local_in_flight -= 1
        if self.watched and self.breaker.end_trial():
            self.on_circuit()  # its verdict, if it has one, comes next (Roster)
        if self.max_in_flight:
            self.on_free()

    def note_streaks(self) -> None:
        """``watched`` anew: after its error streak or its breaker changed."""
        self.watched = self.consecutive_errors > 0 or not self.breaker.clean

    def note_error(self, reason: str, at: float | None = None) -> None:
        """Record a failure: ``last_error`` and ``last_error_at`` always change together."""
        self.last_error = reason
        self.last_error_at = time.time() if at is None else at

    @property
    def mean_latency_s(self) -> float:
        return sum(self.latencies) / len(self.latencies) if self.latencies else 0.0

    def __repr__(self) -> str:
        return f"<Service {self.name} {self.url} healthy={self.healthy}>"


class Roster:
    def __init__(
        self,
        max_errors: int = 3,
        make_pool: Callable[[Service], Pool] | None = None,
    ) -> None:
        self.max_errors = max_errors
        # --cb-failure-threshold (0: no breaker), --cb-success-threshold,
        # --cb-timeout-duration-secs: every service's breaker's settings.
        self.breaker_settings = (
            DEFAULT_FAILURE_THRESHOLD,
            DEFAULT_SUCCESS_THRESHOLD,
            DEFAULT_TIMEOUT_S,
        )
        self.open_circuits: set[Service] = set()  # what the sweep may turn half-open
        self.make_pool = make_pool
        # Called after any change of membership or health (the supervisor's broadcast,
        # the admission queue); and when this process ejects a service by itself.
        self.listeners: list[Callable[[], None]] = []
        self.on_eject: Callable[[Service, str], None] | None = None
        # Called when a limited service frees a slot (the admission queue's wake).
        self.on_slot_freed: Callable[[], None] = _nothing
        # Per-process share of each service's max_in_flight (workers split it).
        self.limit_share = 1
        # This process's share of --max-concurrent-requests (0: none). No service can
        # have more under way than the whole router, so it caps each one's limit: then
        # every release wakes the admission queue, at no cost to the request path.
        self.router_limit = 0
        # A worker's mirror logs membership at debug level: the supervisor says it once.
        self.note = log.info
        self.services: dict[str, Service] = {}
        self.entries: dict[str, Entry] = {}  # registrations never routed to
        self.known_models: dict[str, ModelInfo] = {}
        self._candidates: dict[str, list[Service]] = {}
        self._healthy: list[Service] = []
        # Disaggregation (journey/pair.py): healthy services that take whole requests (all of
        # them when no service has a role), the models that some prefill or decode
        # service serves, and each (model, role)'s healthy services.
        self._whole: list[Service] = []
        self.pd_models: frozenset[str] = frozenset()
        self._pd: dict[tuple[str, str], list[Service]] = {}
        # Some healthy service's metadata.cache_type is "static": size-based routing is on
        # (strategies/size.py); False, the request path pays one attribute read for it.
        self.any_static = False
        self.started_at = int(time.time())
        # --backend-ca-certs, --backend-certfile, --backend-keyfile, and whether to verify:
        # what an https:// service that sets none of its own is connected with.
        self.backend_tls: tuple[str | None, str | None, str | None, bool] = (None, None, None, True)

    def tls_context(self, spec: ServiceSpec) -> ssl.SSLContext | None:
        """The context for ``spec``'s connections (None for http://); ConfigError if a file
        it names cannot be read."""
        if not spec.tls:
            return None
        ca, cert, key, verify = self.backend_tls
        return tls.client_context(
            spec.ca or ca,
            spec.cert or cert,
            spec.key or (None if spec.cert else key),
            verify if spec.verify is None else spec.verify,
        )

    # --- membership ---------------------------------------------------------

    def add(self, spec: ServiceSpec, origin: str = "config") -> Service:
        service = Service(spec, origin)
        service.ssl = self.tls_context(spec)
        service.on_free = self._slot_freed
        service.on_circuit = self._changed
        service.breaker.configure(*self.breaker_settings)
        service.max_in_flight = self._limit(spec)
        if self.make_pool is not None:
            service.pool = self.make_pool(service)
        self.services[service.name] = service
        self.note(
            "service %s at %s (weight %d, health %s%s)",
            service.name,
            masked_url(service.url),
            service.weight,
            service.health_path,
            "" if service.role == "both" else f", {service.role}",
        )
        if service.url != spec.url.rstrip("/"):
            base = masked_url(service.url)
            self.note(
                "service %s: its URL ends in /v1, which clients' paths carry themselves, "
                "so the router drops it: requests go to %s/v1/..., health checks to %s%s",
                service.name,
                base,
                base,
                service.health_path,
            )
        self._learn_cards(spec)
        if service.models:
            self.note("service %s serves %s", service.name, name_models(service.models))
        self._changed()
        return service

    def _limit(self, spec: ServiceSpec) -> int:
        """A service's limit in this process: its own share, capped by the router's."""
        own = share(spec.max_in_flight, self.limit_share)
        cap = self.router_limit
        return min(own, cap) if own and cap else own or cap

    def set_router_limit(self, limit: int) -> None:
        """This process's share of --max-concurrent-requests (0: none), at start and reload."""
        if limit != self.router_limit:
            self.router_limit = limit
            for service in self.services.values():
                service.max_in_flight = self._limit(service.spec)
            self._changed()

    def remove(self, name: str, why: str) -> Service | None:
        """Take a service out; requests on it finish, then its connections close."""
        service = self.services.pop(name, None)
        if service is None:
            return None
        self.note("service %s removed: %s", name, why)
        self.open_circuits.discard(service)
        if service.pool is not None:
            service.pool.close()
        self._forget_models()
        self._changed()
        return service

    def update(self, spec: ServiceSpec, origin: str) -> Service:
        """Add ``spec``, or change the service of that name to match it.

        A new address, health path or model list makes it a new service (health
        unknown until probed); weight and max_in_flight change in place.
        """
        service = self.services.get(spec.name)
        if service is None:
            return self.add(spec, origin)
        old = service.spec
        service.origin = origin
        if not same_backend(old, spec):
            self.remove(spec.name, "its address, role, health path, models or TLS settings changed")
            return self.add(spec, origin)
        if old != spec:
            service.spec = spec
            self._learn_cards(spec)
            service.weight = spec.weight
            service.cache_type = cache_type_of(spec)
            service.max_in_flight = self._limit(spec)
            self.note("service %s updated (weight %d)", spec.name, spec.weight)
            self._changed()
        return service

    def inherit(self, service: Service, old: Service) -> None:
        """``service`` is ``old`` under a new name (``same_backend``): it starts with what
        was known of the backend, its health first, instead of unhealthy until its first
        check. Counts and requests under way stay with the old name."""
        self.note(
            "service %s is %s renamed (the same backend): it keeps its health",
            service.name,
            old.name,
        )
        service.healthy = old.healthy
        service.consecutive_errors = old.consecutive_errors
        service.breaker.inherit(old.breaker)
        service.note_streaks()
        if old in self.open_circuits:
            self.open_circuits.discard(old)
            self.open_circuits.add(service)
        service.last_check = old.last_check
        service.last_error = old.last_error
        service.last_error_at = old.last_error_at
        if not service.models_configured:  # listed by the backend: its models are known
            service.models = old.models
            service.models_known = old.models_known
            service.models_capped = old.models_capped
        service.engine_running = old.engine_running
        service.engine_waiting = old.engine_waiting
        service.engine_kv = old.engine_kv
        service.engine_at = old.engine_at
        service.engine_models = old.engine_models
        service.engine_extra = old.engine_extra
        service.engine_full = old.engine_full
        service.metrics_missing = old.metrics_missing
        self._changed()

    # Entries change no routing, so they notify no listener and are not mirrored
    # into workers: with --workers, the supervisor answers /services itself.

    def keep(self, entry: Entry) -> None:
        """Keep (or replace) a registration that is not routed to."""
        if entry.name not in self.entries:
            self.note(
                "entry %s at %s kept (type %s: listed and heartbeated, never routed to)",
                entry.name,
                masked_url(entry.url),
                entry.type,
            )
        self.entries[entry.name] = entry

    def drop(self, name: str, why: str) -> Entry | None:
        entry = self.entries.pop(name, None)
        if entry is not None:
            self.note("entry %s removed: %s", name, why)
        return entry

    # --- lookups on the request path ---------------------------------------------

    def candidates(self, model: str) -> list[Service]:
        """Healthy services serving ``model``, in registration order."""
        found = self._candidates.get(model)
        if found is None:
            found = [s for s in self._whole if model in s.models]
            self._candidates[model] = found
        return found

    def healthy(self) -> list[Service]:
        return self._healthy

    def whole(self) -> list[Service]:
        """Healthy services that take whole requests (not a prefill or decode service)."""
        return self._whole

    def pd_candidates(self, model: str, role: str) -> list[Service]:
        """Healthy ``role`` ("prefill" or "decode") services serving ``model``."""
        found = self._pd.get((model, role))
        if found is None:
            found = [s for s in self._healthy if s.role == role and model in s.models]
            self._pd[(model, role)] = found
        return found

    def discovery_pending(self) -> bool:
        """Some service's models are not known yet: an unknown model may still appear."""
        return any(not s.models_known for s in self.services.values())

    def why_unavailable(self, model: str | None, among: list[Service] | None = None) -> str:
        """Why no service can take a request for ``model`` (None: any model), naming
        each service's own failure, so a client is told the cause and not only the effect.

        ``among``: the services to explain, if not those that list ``model``.
        """
        if not self.services:
            return (
                "no backend service is configured or registered yet (the router's "
                "--backend, --config, --static-services, --registry-url, --discover, "
                "--k8s-selector or POST /services)"
            )
        if among is None:
            among = [s for s in self.services.values() if model is None or model in s.models]
        which = "no healthy service" if model is None else f"no healthy service for model {model!r}"
        return f"{which}: {explain(among)}" if among else which

    def served_models(self) -> list[str]:
        """Models some service currently lists, healthy or not, in first-seen order."""
        return _models_of(self.services.values())

    def healthy_models(self) -> list[str]:
        return _models_of(self._healthy)

    # --- health ---------------------------------------------------------------

    def probe_passed(
        self, service: Service, models: list[tuple[str, int | None, str | None]] | None
    ) -> None:
        """An active check passed; ``models`` is what the service listed, if it was asked."""
        service.last_check = time.time()
        if models is not None and not service.models_configured:
            self._take_models(service, models)
        if not service.healthy:
            log.info("service %s is healthy", service.name)
        service.healthy = True
        service.consecutive_errors = 0
        service.note_streaks()
        self._changed()

    def _take_models(
        self, service: Service, models: list[tuple[str, int | None, str | None]]
    ) -> None:
        """What a service listed, within bounds (``_within_bounds``)."""
        listed = _within_bounds(service, models)
        new = tuple(listed)
        if new == service.models:
            service.models_known = True
            return
        added = [m for m in new if m not in service.models]
        gone = [m for m in service.models if m not in listed]
        for model in added:
            created, owned_by = listed[model]
            self._learn_model(model, created, owned_by)
        service.models = new
        service.models_known = True
        if gone:
            self._forget_models()
        # One line per service and check, however many models changed.
        changes = []
        if added:
            changes.append("serves " + name_models(added))
        if gone:
            changes.append("no longer lists " + name_models(gone))
        self.note("service %s %s", service.name, "; ".join(changes))

    def probe_failed(self, service: Service, reason: str) -> None:
        first = service.last_check is None
        service.last_check = time.time()
        service.note_error(reason, service.last_check)
        if first:
            # A wrong URL or a backend not up yet: say so once, not on every retry.
            log.warning("service %s is not healthy yet: %s", service.name, reason)
        if service.healthy:
            log.warning("service %s is unhealthy: %s", service.name, reason)
            service.healthy = False
            self._changed()

    def engine_load(
        self,
        service: Service,
        running: int,
        waiting: int,
        kv: float | None,
        at: float,
        models: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        """A scrape of the engine's /metrics: its batch, its queue, its KV-cache use,
        and the batch and queue of each model it labels."""
        service.engine_running = running
        service.engine_waiting = waiting
        service.engine_kv = kv
        service.engine_at = at
        service.engine_models = models or {}
        # The engine counts this router's requests too: only the rest is extra.
        extra, full = max(0, running + waiting - service.in_flight), waiting > 0
        if (extra, full) != (service.engine_extra, service.engine_full):
            # Only what routing reads goes to the listeners (the workers' copies):
            # no broadcast of the whole registry for a scrape that changed nothing.
            service.engine_extra, service.engine_full = extra, full
            self._notify()

    def engine_stale(self, service: Service, forget: bool = False) -> None:
        """The last scrape is too old to trust: the router's own count decides alone.
        ``forget``: the figures are gone too (a page refused), and /stats shows none."""
        if forget:
            service.engine_running = service.engine_waiting = service.engine_kv = None
            service.engine_at = None
            service.engine_models = {}
        if service.engine_extra or service.engine_full:
            service.engine_extra = 0
            service.engine_full = False
            self._notify()

    def request_failed(self, service: Service, reason: str) -> None:
        """A proxied request failed by the service's fault (never a client hang-up)."""
        service.consecutive_errors += 1
        self._count_failure(service, reason)
        if service.healthy and self.max_errors and service.consecutive_errors >= self.max_errors:
            log.warning(
                "service %s ejected after %d consecutive failed requests (last: %s); "
                "it returns after its next passing health check",
                service.name,
                service.consecutive_errors,
                reason,
            )
            service.healthy = False
            self._changed()
            if self.on_eject is not None:
                self.on_eject(service, reason)

    def eject(self, name: str, reason: str) -> None:
        """A worker ejected this service: it stays out until a probe passes."""
        service = self.services.get(name)
        if service is not None and service.healthy:
            log.warning("service %s ejected by a worker: %s", name, reason)
            service.healthy = False
            service.note_error(reason)
            self._changed()

    def answered_error(self, service: Service, status: int) -> None:
        """The service answered an error status of its own (a 5xx, or a 429) and the
        request went no further there. A 500, 502, 503 or 504 says it works as a server,
        not as an engine: its breaker counts it; passive ejection (``max_errors``) does
        not, since only a passing health check would end that, and the health path still
        passes. Any other (a 429: busy, not broken) is counted only."""
        if status not in SERVER_ERRORS:
            service.error_count += 1
            return
        self._count_failure(service, f"answered {status}")

    def _count_failure(self, service: Service, reason: str) -> None:
        """A failure of the service's: its figures, its last error, its breaker's step."""
        service.error_count += 1
        service.note_error(reason)
        self._circuit_failed(service, reason)
        service.note_streaks()

    def request_succeeded(self, service: Service) -> None:
        """An answer that is neither a failure nor "busy" (a 2xx, 3xx or 4xx)."""
        service.consecutive_errors = 0
        breaker = service.breaker
        closed = not breaker.clean and breaker.succeeded()
        service.note_streaks()
        if closed:
            log.info("service %s: circuit breaker closed", service.name)
            self._changed()

    # --- circuit breakers ---------------------------------------------------------

    def configure_breakers(
        self, failure_threshold: int, success_threshold: int, timeout_s: float
    ) -> None:
        """Every breaker's settings (start-up and reload); failure_threshold 0: none."""
        self.breaker_settings = (failure_threshold, success_threshold, timeout_s)
        closed = False
        for service in self.services.values():
            if service.breaker.configure(failure_threshold, success_threshold, timeout_s):
                self.open_circuits.discard(service)
                closed = True
            service.note_streaks()
        if closed:
            self._changed()

    def recover_circuits(self, now: float | None = None) -> None:
        """Open breakers whose timeout is over become half-open (the router's sweep)."""
        now = time.monotonic() if now is None else now
        due = [s for s in self.open_circuits if s.breaker.due(now)]
        if due:
            for service in due:
                self.open_circuits.discard(service)
                # Each timeout of a backend that stays broken: not worth a line each.
                log.debug(
                    "service %s: circuit breaker half-open, one request at a time let through",
                    service.name,
                )
            self._changed()

    def _circuit_failed(self, service: Service, reason: str) -> None:
        breaker = service.breaker
        was = breaker.state
        if not breaker.failed(time.monotonic()):
            return
        self.open_circuits.add(service)
        # A breaker that fails its trials opens again every timeout: said once per
        # cause, then at debug level until the cause changes.
        say = log.warning if was == CLOSED or reason != service.circuit_reason else log.debug
        service.circuit_reason = reason
        after = (
            "its half-open trial failed"
            if was == HALF_OPEN
            else f"{breaker.failure_threshold} failures in a row (5xx answers, failed requests)"
        )
        say(
            "service %s: circuit breaker open: %s (last: %s); it gets no requests for "
            "%gs (--cb-timeout-duration-secs), then one at a time",
            service.name,
            after,
            reason,
            breaker.timeout_s,
        )
        self._changed()

    # --- internals ------------------------------------------------------------

    def _slot_freed(self) -> None:
        self.on_slot_freed()

    def _learn_cards(self, spec: ServiceSpec) -> None:
        cards = {card.id: card for card in spec.model_cards}
        for model in spec.models:
            card = cards.get(model)
            if card is None:
                self._learn_model(model, None, None)
            else:
                self._learn_model(model, card.created, card.owned_by)

    def _learn_model(self, model: str, created: int | None, owned_by: str | None) -> None:
        """First told, first kept; a field no service has told yet is taken from the next."""
        info = self.known_models.get(model)
        if info is None:
            self.known_models[model] = ModelInfo(created, owned_by)
            return
        if info.created is None:
            info.created = created
        if info.owned_by is None:
            info.owned_by = owned_by

    def _forget_models(self) -> None:
        """Keep only the models some service still lists: a departed service's go."""
        served = {m for s in self.services.values() for m in s.models}
        for model in [m for m in self.known_models if m not in served]:
            del self.known_models[model]

    # --- mirroring (workers) ------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Membership, health and models, for the workers (``sync``)."""
        return {
            "services": [
                {
                    "spec": msgspec.to_builtins(s.spec),
                    "origin": s.origin,
                    "healthy": s.healthy,
                    "models": list(s.models),
                    "models_known": s.models_known,
                    "last_check": s.last_check,
                    "last_error": s.last_error,
                    "last_error_at": s.last_error_at,
                    "engine": [
                        s.engine_running,
                        s.engine_waiting,
                        s.engine_kv,
                        s.engine_at,
                        s.engine_extra,
                        s.engine_full,
                        s.engine_models,
                    ],
                }
                for s in self.services.values()
            ],
            "known_models": {m: [i.created, i.owned_by] for m, i in self.known_models.items()},
        }

    def sync(self, state: dict[str, Any]) -> None:
        """Become what the supervisor's registry is."""
        wanted = {}
        for entry in state["services"]:
            spec = msgspec.convert(entry["spec"], ServiceSpec)
            wanted[spec.name] = entry
            service = self.update(spec, entry["origin"])
            if entry["healthy"] and not service.healthy:
                service.consecutive_errors = 0  # back after a passing probe
                service.note_streaks()
            service.healthy = entry["healthy"]
            service.models = tuple(entry["models"])
            service.models_known = entry["models_known"]
            service.last_check = entry["last_check"]
            service.last_error = entry["last_error"]
            service.last_error_at = entry["last_error_at"]
            (
                service.engine_running,
                service.engine_waiting,
                service.engine_kv,
                service.engine_at,
                service.engine_extra,
                service.engine_full,
                models,
            ) = entry["engine"]
            service.engine_models = {m: (r, w) for m, (r, w) in models.items()}
        for name in [n for n in self.services if n not in wanted]:
            self.remove(name, "removed by the supervisor")
        self.known_models = {
            m: ModelInfo(created, owned_by)
            for m, (created, owned_by) in state["known_models"].items()
        }
        self._changed()

    def _notify(self) -> None:
        """Figures changed, not membership or health: the listeners (the workers' copies)
        hear of it; the routing lists stay as they are."""
        for listener in self.listeners:
            listener()

    def _changed(self) -> None:
        self._healthy = [s for s in self.services.values() if s.healthy and s.breaker.routable]
        self._candidates.clear()
        self._pd.clear()
        self.pd_models = frozenset(
            m for s in self.services.values() if s.role != "both" for m in s.models
        )
        self._whole = (
            [s for s in self._healthy if s.role == "both"] if self.pd_models else self._healthy
        )
        self._note_static()
        self._notify()

    def _note_static(self) -> None:
        """Whether any service routed to whole is static (``any_static``), told once
        when size-based routing comes on."""
        static = [s.name for s in self._whole if s.cache_type == "static"]
        if static and not self.any_static:
            self.note(
                "size-based routing on, as infini-router's: prompts over "
                "--cache-type-routing-threshold bytes go to the services whose "
                "metadata.cache_type is static (%s), the others to the rest",
                name_models(static, "GET /services", LOGGED_SERVICES),
            )
        self.any_static = bool(static)


# What makes a service another one: a change of any is a new service, probed anew.
_IDENTITY = ("role", "url", "health_path", "models", "ca", "cert", "key", "verify", "server_name")


def same_backend(a: ServiceSpec, b: ServiceSpec) -> bool:
    """Whether ``a`` and ``b`` reach the same backend the same way (their names aside):
    what its checks found of one holds for the other."""
    return all(getattr(a, field) == getattr(b, field) for field in _IDENTITY)


def _nothing() -> None:
    pass


def cache_type_of(spec: ServiceSpec) -> str:
    """Its metadata's cache_type, as infini-router reads it (a string, else none)."""
    value = spec.metadata.get("cache_type")
    return value if isinstance(value, str) else ""


def babysitter_url(service: Service) -> str | None:
    """Where the InfiniLM routers expect the service's babysitter: its port plus one,
    on its host (both routers derive it so, for every service)."""
    if service.port >= 65535:
        return None
    scheme = "https" if service.url.startswith("https:") else "http"
    host = f"[{service.host}]" if ":" in service.host else service.host
    return f"{scheme}://{host}:{service.port + 1}"


def share(limit: int, workers: int) -> int:
    """This process's part of a router-wide limit: never 0 (a worker must be able to
    serve), so with N workers the sum may exceed the limit by at most N - 1."""
    return -(-limit // workers) if limit else 0


def name_models(
    models: Iterable[str], where: str = "GET /v1/models lists them all", most: int = LOGGED_MODELS
) -> str:
    """Names for a log line or a message: at most ``most``, then how many more, and
    ``where`` the rest are listed."""
    listed = list(models)
    shown = ", ".join(listed[:most])
    if len(listed) > most:
        shown += f" and {len(listed) - most} more ({where})"
    return shown


def _within_bounds(
    service: Service, models: list[tuple[str, int | None, str | None]]
) -> dict[str, tuple[int | None, str | None]]:
    """The models a service listed that the router takes: a backend cannot make it hold
    (or log) more than MAX_MODELS_PER_SERVICE models of MAX_MODEL_ID characters. The
    first refusal is logged, once per service."""
    listed: dict[str, tuple[int | None, str | None]] = {}
    refused = 0
    for model, created, owned_by in models:
        if len(listed) >= MAX_MODELS_PER_SERVICE or len(model) > MAX_MODEL_ID or not model:
            refused += 1
        else:
            listed.setdefault(model, (created, owned_by))
    if refused and not service.models_capped:
        service.models_capped = True
        log.warning(
            "service %s lists %d models the router does not take (it takes at most %d, "
            "each 1 to %d characters)",
            service.name,
            refused,
            MAX_MODELS_PER_SERVICE,
            MAX_MODEL_ID,
        )
    return listed


def service_entry(service: Service) -> dict[str, Any]:
    """One service as /services lists it: lmproxy's fields, and the InfiniLM routers'
    (host, port, babysitter_url, the counts, metadata)."""
    return {
        "name": service.name,
        "host": service.host,
        "port": service.port,
        "url": masked_url(service.url),
        "babysitter_url": babysitter_url(service),
        "healthy": service.healthy,
        "request_count": service.request_count,
        "error_count": service.error_count,
        "response_time": round(service.mean_latency_s, 6),
        "models": list(service.models),
        "weight": service.weight,
        "max_in_flight": service.spec.max_in_flight,
        "origin": service.origin,
        "type": "openai-api",
        "routable": True,
        "role": service.role,
        "metadata": service.spec.metadata,
        "circuit": service.breaker.state_name,
    }


def kept_entry(entry: Entry) -> dict[str, Any]:
    """A registration never routed to (an InfiniLM babysitter's), as /services lists it."""
    return {
        "name": entry.name,
        "url": masked_url(entry.url),
        "healthy": entry.healthy,
        "models": [],
        "origin": "admin",
        "type": entry.type,
        "routable": False,
        "status": entry.status,
        "last_heartbeat": iso_time(entry.last_heartbeat),
        "metadata": entry.metadata,
    }


def explain(services: Iterable[Service]) -> str:
    """``name: last error`` of each service out of routing, for at most LOGGED_SERVICES."""
    listed = list(services)
    text = "; ".join(
        f"{s.name}: circuit breaker {s.breaker.state_name} (last: {s.last_error})"
        if s.healthy and s.breaker.state != CLOSED
        else f"{s.name}: {s.last_error or 'not checked yet'}"
        for s in listed[:LOGGED_SERVICES]
    )
    if len(listed) > LOGGED_SERVICES:
        text += f"; and {len(listed) - LOGGED_SERVICES} more (GET /stats has each one's last error)"
    return text


def _models_of(services: Iterable[Service]) -> list[str]:
    """The de-duplicated models of ``services``, in first-seen order."""
    seen: dict[str, None] = {}
    for service in services:
        seen.update(dict.fromkeys(service.models))
    return list(seen)
