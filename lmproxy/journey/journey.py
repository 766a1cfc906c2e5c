"""One request's journey: route -> policies -> tries -> one end.

A :class:`Journey` carries one proxied request. It resolves the route
(``route.py``), applies the key and model policies (``policies.py``), and makes
tries until one answers: each try is an :class:`~lmproxy.journey.exchange.Exchange`
(a whole request on one service) or a :class:`~lmproxy.journey.pair.Pair` (a
prefill and a decode), and reports its result through :meth:`Journey.finish`.
The journey keeps what spans its tries: retries (only while nothing has reached
the client), fallbacks to the model's next, its place in the admission queue,
its key's grant, its span and its id. It is the client connection's handle for
what is under way (``cancel``, ``pause``, ``resume``, ``check_timeout``), set
at the start and cleared at the end by the journey alone. :meth:`Journey.end`
runs once, whatever the end: it alone ends the grant and the span and writes
the access-log line.

A request that finds an idle pooled connection runs no task at all; one that
must connect runs a short task for the connect. Timeouts are checked by the
router's sweep (``check_timeout``), not a timer per request.

Every way into a journey from outside it (the dispatch, a parser callback, a
``call_soon``, a connect task, the admission queue, a key's verdict) is
supervised: an exception there, from a strategy plugin or a bug, ends that one
request in :meth:`Journey.crash` (502, or the error event once the head is out),
returns every slot it held and is logged once per cause (:func:`log_crash`).
The guards are ``try`` blocks around code that runs anyway: free in CPython 3.11
until something raises.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from lmproxy.errors import Fault, ProxyError
from lmproxy.journey import pair, policies
from lmproxy.journey.attempt import FAILURES, Attempt, Outcome, Retry
from lmproxy.journey.exchange import Exchange, MeteredExchange
from lmproxy.journey.route import any_model, choices, may_retry_on, may_start, route
from lmproxy.telemetry import tracing
from lmproxy.telemetry.metrics import log_access, usage_tokens

if TYPE_CHECKING:
    import strategies
    from lmproxy.client.connection import ClientConnection, ClientRequest
    from lmproxy.client.request import RouteRequest
    from lmproxy.fleet.roster import Service
    from lmproxy.keys.limits import Grant
    from lmproxy.protocols import ProxyHost

log = logging.getLogger("lmproxy")

# Failures after which a model's fallback is tried (nothing has reached the client).
FALLBACK_FAULTS = frozenset(
    {
        Fault.NO_HEALTHY_SERVICE,
        Fault.MODEL_NOT_FOUND,
        Fault.BACKEND_UNREACHABLE,
        Fault.BACKEND_CLOSED,
        Fault.BACKEND_BROKEN,
    }
)
_NONE: list[str] = []  # no fallbacks: shared, never changed (a journey gets its own list)
_NO_SERVICES: list[Service] = []  # the same for services tried
# Causes of crashed requests already logged with their traceback (see log_crash).
_CRASHES: set[tuple[str, str]] = set()
MAX_CRASH_CAUSES = 256


def log_crash(exc: BaseException, what: str) -> None:
    """Log an exception that ended a request, with its traceback, once per cause: its
    type and the line that raised it. A strategy that raises on every request would
    otherwise write a traceback per request; the repeats go to the debug log."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
    cause = (type(exc).__qualname__, where)
    if cause in _CRASHES or len(_CRASHES) >= MAX_CRASH_CAUSES:
        log.debug("%s: %s: %s (logged before)", what, type(exc).__qualname__, exc)
        return
    _CRASHES.add(cause)
    log.error(
        "%s: %s: %s (raised at %s; logged once per cause)",
        what,
        type(exc).__qualname__,
        exc,
        where,
        exc_info=exc,
    )


class Try(Protocol):
    """One try of a request: an exchange, or a prefill/decode pair."""

    def cancel(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def check_timeout(self, now: float) -> None: ...

    def stop(self, reason: str) -> bool: ...

    def served_by(self, name: str) -> str: ...


class Journey:
    """One proxied request, from routing to its last byte, retries included."""

    __slots__ = (
        "client", "ended", "failures", "fallbacks", "fallen_from", "forward_extra", "grant",
        "head_extra", "id_header", "last_candidates", "last_error", "priority", "queued",
        "queued_at", "request", "request_id", "route", "router", "span", "split", "strategy",
        "trace_id", "tried", "try_",
    )  # fmt: skip
    # Set only where they are used: by the routing, and as the request meets the queue.
    strategy: strategies.Strategy
    queued_at: float
    last_candidates: list[Service]

    def __init__(self, router: ProxyHost, client: ClientConnection, request: ClientRequest) -> None:
        self.router = router
        self.client = client
        self.request = request
        self.route: RouteRequest | None = None
        # Services that failed this request, either role: shared and empty until one does.
        self.tried: list[Service] = _NO_SERVICES
        given = request.request_id
        self.request_id = given or router.next_request_id()
        # A made id travels as a header to the backend and back to the client.
        self.id_header = b"" if given else b"X-Request-ID: %s\r\n" % self.request_id
        self.head_extra = self.id_header  # what the client's response head gets added
        tracer = router.tracer
        if tracer is None and request.traceparent is None:
            trace_line, self.trace_id = tracing.new_trace()
            self.span: Any = None  # an OpenTelemetry span, with --otlp-endpoint
        else:
            trace_line, self.trace_id, self.span = tracing.begin(tracer, request.traceparent)
        # What the backend's request head gets added: the id, the trace, the Via.
        self.forward_extra = self.id_header + trace_line + router.via_line
        # Models to try next (the route's model's fallbacks), and the first model asked
        # when one of them answers.
        self.fallbacks: list[str] = _NONE
        self.fallen_from: str | None = None
        self.failures = 0
        self.last_error: ProxyError | None = None
        self.queued = False  # in the admission queue: written by admission.py alone
        self.grant: Grant | None = None  # a [[keys]] key's hold on its limits, until the end
        self.priority = 0  # in the admission queue: its key's, or its X-Priority
        self.try_: Try | None = None  # the try under way (or the last one)
        self.split: pair.Split | None = None  # a disaggregated model's: pairs are tried
        self.ended = False

    def start(self) -> None:
        self.client.underway = self
        try:
            try:
                self.route = route(self.router, self.request)
            except ProxyError as exc:
                self.fail(exc)
                return
            if self.router.policies and not policies.apply(self):
                return  # answered, or waiting for the key limits' verdict
            self.proceed()
        except Exception as exc:
            self.crash(exc)

    def proceed(self) -> None:
        """The routed request, past its policies, goes to its model's services."""
        route = self.route
        assert route is not None
        router = self.router
        if router.config.any_model and route.model is not None:
            any_model(router, route)
        pd_models = router.roster.pd_models
        if pd_models and route.model in pd_models:
            self._serve(route.model)
            return
        self.strategy = router.strategy_for(route.model)
        self.attempt()

    def _serve(self, model: str | None) -> None:
        """Tries for ``model``: whole requests, or pairs when it is disaggregated."""
        router = self.router
        self.strategy = router.strategy_for(model)
        pd_models = router.roster.pd_models
        self.split = None
        self.try_ = None
        if pd_models and model in pd_models:
            split = pair.split(self)
            if isinstance(split, ProxyError):
                self.fail(split)
                return
            self.split = split
        self.attempt()

    def _fall_back(self, error: ProxyError) -> None:
        """The model could not answer before any byte reached the client: its next
        fallback gets the request, with a fresh set of retries."""
        assert self.route is not None
        if self.split is not None:
            self.route.body = self.split.body  # as the client sent it, not a pair's
        model = policies.fall_back(self, error)
        self.tried = _NO_SERVICES
        self.failures = 0
        self.last_error = None
        self._serve(model)

    # --- tries -------------------------------------------------------------------

    def attempt(self) -> None:
        """The next try: a pair, for a disaggregated model; else a service chosen and
        sent to, or the queue, when every candidate is at its limit."""
        if self.split is not None and self._pair():
            return
        router = self.router
        route = self.route
        assert route is not None
        try:
            found = choices(router, route, self.tried)
        except ProxyError as exc:
            self.fail(self.last_error or exc)  # after a failed try, the failure says more
            return
        if not found:  # every one has failed it
            assert self.last_error is not None
            self.fail(self.last_error)
            return
        admission = router.admission
        if admission.limited:
            self.last_candidates = found
            admitted = admission.admit(self, found)
            if admitted is None:  # queued, or refused
                return
            found = admitted
        service = self.strategy.choose(found, route)
        if self.grant is not None and self.metered():
            exchange: Exchange = MeteredExchange(self, self, service, self.strategy, route)
        else:
            exchange = Exchange(self, self, service, self.strategy, route)
        self.try_ = exchange
        exchange.go()

    def _pair(self) -> bool:
        """A pair try; False when the model has no pair to offer but services that
        take whole requests, which then take it."""
        split = self.split
        assert split is not None and self.route is not None
        sides = pair.pair_or_error(self)
        if sides is None:
            self.split = None
            self.strategy = self.router.strategy_for(self.route.model)
            self.route.body = split.body
            return False
        if isinstance(sides, ProxyError):
            self.fail(sides)
            return True
        self.try_ = try_ = pair.Pair(self, split)
        try_.start(*sides)
        return True

    def metered(self) -> bool:
        """Whether its answers are counted as relayed: only a key with a tpm pays."""
        key = self.request.key
        return self.grant is not None and key is not None and bool(key.tpm)

    def may_start(self) -> bool:
        """Whether a waiting request would now find room (or an error to report)."""
        assert self.route is not None
        return may_start(self.router, self.route, self.tried)

    def may_retry(self, failed: Service) -> bool:
        """Whether a retry could follow ``failed``'s error answer: retries are left, and
        another service may take the request (else that answer is relayed)."""
        if self.failures >= self.router.config.retries or self.client.closing:
            return False
        assert self.route is not None
        return any(s is not failed for s in may_retry_on(self.router, self.route, self.tried))

    def finish(self, attempt: Attempt) -> None:
        """A try's result, through the attempt that decides it: it ends, then the request
        is answered, retried, or over."""
        try:
            attempt.end()
            outcome = attempt.outcome
            if outcome is Outcome.DONE:
                self.end(attempt.status, attempt)
                self.client.response_done()
                return
            assert outcome is not None
            if FAILURES[outcome].fault is None:  # nothing more to say, or no one to hear
                if outcome is not Outcome.CRASHED:
                    self.end(attempt.status if outcome is Outcome.CUT else 499, attempt)
                return
            error, retry = attempt.failure()
            if retry is Retry.NO:
                self.fail(error)
            else:
                self._retry(attempt.service if retry is Retry.ELSEWHERE else None, error)
        except Exception as exc:
            self.crash(exc, attempt)

    def _retry(self, failed: Service | None, error: ProxyError) -> None:
        """Try another service (any service, if ``failed`` is None), within --retries."""
        self.failures += 1
        if failed is not None:
            self.tried = [*self.tried, failed]
            self.last_error = error
        if self.failures > self.router.config.retries or self.client.closing:
            self.fail(error)
        else:
            self.attempt()

    # --- the client connection's handle (and the sweep's) ----------------------------

    def cancel(self) -> None:
        """The client hung up."""
        try:
            if self.queued:
                self.router.admission.leave(self)
                self.end(499)
            elif self.try_ is not None:
                self.try_.cancel()
            # Else it waits for its key's verdict, which sees the client closing.
        except Exception as exc:
            self.crash(exc)

    def pause(self) -> None:
        if self.try_ is not None:
            self.try_.pause()

    def resume(self) -> None:
        if self.try_ is not None:
            self.try_.resume()

    def check_timeout(self, now: float) -> None:
        if self.try_ is not None:
            self.try_.check_timeout(now)

    # --- ends --------------------------------------------------------------------

    def shed(self, error: ProxyError) -> None:
        key = self.request.key
        self.router.metrics.shed(key.name if key is not None else None)
        self.fail(error)

    def fail(self, error: ProxyError) -> None:
        if self.fallbacks and error.fault in FALLBACK_FAULTS and not self.client.closing:
            self._fall_back(error)
            return
        self.end(error.status)
        if not self.client.closing:
            extra = self.id_header
            if error.retry_after is not None:
                extra += b"Retry-After: %d\r\n" % error.retry_after
            self.client.respond_error(error.fault, error.message, extra)

    def crash(self, exc: Exception, attempt: Attempt | None = None) -> None:
        """The supervised end: code run for this request raised (a strategy plugin, a
        sink, a bug). The request ends here, whatever it was doing: every slot it holds
        comes back (its tries', the key's grant, its place in the queue), the client
        gets a 502 (or, when it has the response head, the stream's error event) and the
        connection closes, so nothing the journey left scheduled can answer after it.
        ``attempt``: the one that was ending, if any."""
        log_crash(exc, f"request {self.request_id.decode()} failed inside the router")
        client = self.client
        try:
            answered = self._stop(f"the router failed: {type(exc).__name__}", attempt)
            if self.ended:  # answered and logged; what failed came after that
                if client.current is self.request:
                    client.close()
                return
            done = attempt is not None and attempt.outcome is Outcome.DONE
            self.end(attempt.status if done and attempt else Fault.ROUTING_FAILED.status, attempt)
            if answered or done or client.closing:
                client.close()
            else:
                self.request.keep_alive = False
                client.respond_error(
                    Fault.ROUTING_FAILED,
                    f"the router failed routing this request ({type(exc).__name__}); retry, "
                    "and if it persists see the router's log (a strategy plugin or a bug)",
                    self.id_header,
                )
        except Exception:  # crash must end the request even when its own steps fail
            log.exception("request %s: ending it after a failure failed", self.request_id.decode())
            client.abort()

    def _stop(self, reason: str, attempt: Attempt | None) -> bool:
        """Everything under way stops, its slots returned: whether the client has the
        response head."""
        answered = False
        for held in (attempt, self.try_):
            if held is not None and held.stop(reason):
                answered = True
        if self.queued:
            self.router.admission.leave(self)
        return answered

    def end(self, status: int, attempt: Attempt | None = None) -> None:
        """The request's one end, whatever it was: the client's handle let go, the key's
        grant ended with the tokens used, the span ended, the access-log line."""
        if self.ended:
            return
        self.ended = True
        client = self.client
        if client.underway is self:
            client.underway = None
        try_, self.try_ = self.try_, None  # it refers back: let go, or the body waits for GC
        if self.grant is not None:
            self._end_grant(attempt)
        if self.span is None and self.router.config.access_log == "off":
            return
        name = attempt.service.name if attempt is not None and attempt.side != "prefill" else ""
        if try_ is not None and self.split is not None:
            name = try_.served_by(name)
        if self.span is not None:
            span, self.span = self.span, None
            _end_span(span, self, name, status, attempt)
        style = self.router.config.access_log
        if style != "off":
            _log_access(style, self, name, status, attempt)

    def _end_grant(self, attempt: Attempt | None) -> None:
        grant, self.grant = self.grant, None
        assert grant is not None
        key = self.request.key
        route = self.route
        tokens = None
        if attempt is not None and route is not None:
            tokens = attempt.tokens_used(route.body, key is not None and bool(key.tpm))
        grant.end(tokens[0] + tokens[1] if tokens else 0)
        if tokens and key is not None:
            self.router.metrics.key_tokens(key.name, tokens)


def _log_access(
    style: str, journey: Journey, name: str, status: int, attempt: Attempt | None
) -> None:
    request = journey.request
    route = journey.route
    exchange = attempt if isinstance(attempt, Exchange) else None
    log_access(
        style,
        journey.request_id,
        request.method,
        request.path,
        route.model if route else None,
        name,
        status,
        exchange.bytes_out if exchange is not None else 0,
        exchange.ttfb_s if exchange is not None else 0.0,
        time.perf_counter() - request.received_at,
        journey.fallen_from,
        journey.trace_id,
        request.key.name if request.key is not None else None,
    )


def _end_span(
    span: Any, journey: Journey, service: str, status: int, attempt: Attempt | None
) -> None:
    """The request's OTLP span (--otlp-endpoint): its attributes, then its end."""
    route = journey.route
    span.set_attribute("lmproxy.model", route.model if route and route.model else "")
    span.set_attribute("lmproxy.service", service)
    span.set_attribute("http.response.status_code", status)
    span.set_attribute("lmproxy.retries", journey.failures)
    if journey.fallen_from is not None:
        span.set_attribute("lmproxy.fallback_from", journey.fallen_from)
    if isinstance(attempt, Exchange) and attempt.outcome is not Outcome.CRASHED:
        tokens = usage_tokens(attempt.tail)
        if tokens is not None:
            span.set_attribute("gen_ai.usage.input_tokens", tokens[0])
            span.set_attribute("gen_ai.usage.output_tokens", tokens[1])
        if attempt.head_sent:
            # When the backend's head came, on the wall clock.
            since = time.perf_counter() - (attempt.sent_at + attempt.ttfb_s)
            span.add_event("first_byte", timestamp=time.time_ns() - int(since * 1e9))
    span.end()
