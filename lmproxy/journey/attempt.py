"""An attempt: the lease on one service for one try of a request, and its one end.

An :class:`Attempt` is made when a strategy chooses a service: it takes the
service's slot at once (a request still connecting holds it, or concurrent
requests would all see room), sends on a pooled connection or opens one in a
short task, and calls the strategy's ``on_start`` at the send, whichever side
of a disaggregated request it serves. Its :meth:`~Attempt.end` runs once
whatever ends it, and is the only place that returns the slot, counts the
service's requests, errors and latencies, tells the registry (health, the
breaker), the metrics and the strategy, and pools or closes the connection:
the :data:`FAILURES` table says, per outcome, what each of those does.

Two kinds extend it: :class:`~lmproxy.journey.exchange.Exchange` relays the
answer to the client; :class:`~lmproxy.journey.pair.Prefill` keeps a prefill's
answer for its decode. An attempt reports its end to its owner (the journey,
or the prefill/decode pair it is one side of) through ``finish``, from a
``call_soon`` when the end came inside the backend parser's callbacks.
"""

from __future__ import annotations

import asyncio
import enum
import time
from typing import TYPE_CHECKING, NamedTuple, Protocol

from lmproxy.backend.upstream import ConnectError, UpstreamConnection
from lmproxy.errors import Fault, ProxyError

if TYPE_CHECKING:
    import strategies
    from lmproxy.client.connection import ClientConnection, ClientRequest
    from lmproxy.client.request import RouteRequest
    from lmproxy.fleet.roster import Service
    from lmproxy.protocols import ProxyHost

# A tpm key's answer that ends without usage is charged an estimate: its prompt at one
# token per BYTES_PER_TOKEN of the request body (as sent), and one token per SSE event
# relayed (an engine sends about one token per event), or for a body that is not a
# stream, one per BYTES_PER_TOKEN of it.
BYTES_PER_TOKEN = 4
LARGE_BODY = 64 * 1024  # above this the body is written beside the head, not copied onto it

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers the router sets itself for the backend connection.
# traceparent: replaced by one naming the router's span (tracing.py).
REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"traceparent"}
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})
_named_cache: dict[bytes, frozenset[bytes]] = {}


def connection_names(value: bytes) -> frozenset[bytes]:
    """The header names a ``Connection`` header lists beyond keep-alive and close: they
    are hop-by-hop too (RFC 9110 7.6.1). Cached: clients send the same few values."""
    names = _named_cache.get(value)
    if names is None:
        names = frozenset(t.strip().lower() for t in value.split(b",")) - _PLAIN_CONNECTION
        names -= {b""}
        if len(_named_cache) < 256:
            _named_cache[value] = names
    return names


class Outcome(enum.Enum):
    DONE = "done"  # the response completed
    STALE = "stale"  # a reused connection was closed before any byte: retry anywhere
    DROPPED = "dropped"  # connection lost before any byte: retry elsewhere
    BROKEN = "broken"  # garbage before the head (or a prefill's answer unusable): 502
    TIMEOUT = "timeout"  # no head within the request timeout: 504
    CUT = "cut"  # failed after the head reached the client
    CLIENT_GONE = "client_gone"
    UNREACHABLE = "connect"  # the connect failed: retry elsewhere
    PARTNER = "partner"  # the other side of a disaggregated request failed (pair.py)
    FALLBACK = "fallback"  # 429 or 503 before any byte, and the model has fallbacks
    RETRIED = "retried"  # 5xx or 429 before any byte, dropped: another service is tried
    REFUSED = "refused"  # a prefill answered 4xx: the request itself is wrong
    LET_GO = "let_go"  # given up before its answer, not for the service's fault
    CRASHED = "crashed"  # ended by Journey.crash: its slot back, nothing counted


class Retry(enum.Enum):
    NO = "no"  # answer the error
    ELSEWHERE = "elsewhere"  # on another service, within --retries
    ANYWHERE = "anywhere"  # on any service, this one too: not its fault


class Failure(NamedTuple):
    """What an outcome means, for the service (what ``Attempt.end`` counts) and for
    the request (the error the client gets if nothing else is tried, and where a
    retry may go; ``fault`` None: the client already has all it gets)."""

    counted: bool  # one more of the service's requests
    blames: bool  # a failure of the service: its health (Roster.request_failed)
    answered: bool  # an error answer: Roster.answered_error (a 5xx is its breaker's step)
    metric: bool  # counted in lmproxy_backend_failures_total, by the outcome's value
    fine: bool  # what the strategy's on_end is told: the service did its part
    fault: Fault | None
    retry: Retry
    message: str  # formatted with side, service, reason, status and timeout


_GONE = Failure(True, False, False, False, True, None, Retry.NO, "")
FAILURES: dict[Outcome, Failure] = {
    # The service's answer: counted apart, by its status (Attempt._done).
    Outcome.DONE: Failure(True, False, False, False, True, None, Retry.NO, ""),
    Outcome.CLIENT_GONE: _GONE,
    # The client has its error event, or a cut body and a close.
    Outcome.CUT: Failure(True, True, False, True, False, None, Retry.NO, ""),
    # Its keep-alive timer beat ours: the connection was stale, the service is fine.
    Outcome.STALE: Failure(
        False, False, False, True, False, Fault.BACKEND_UNREACHABLE, Retry.ANYWHERE, "{reason}"
    ),
    Outcome.DROPPED: Failure(
        True,
        True,
        False,
        True,
        False,
        Fault.BACKEND_CLOSED,
        Retry.ELSEWHERE,
        "{side}service {service} closed the connection before answering",
    ),
    Outcome.BROKEN: Failure(
        True,
        True,
        False,
        True,
        False,
        Fault.BACKEND_BROKEN,
        Retry.NO,
        "{side}service {service}: {reason}",
    ),
    Outcome.TIMEOUT: Failure(
        True,
        True,
        False,
        True,
        False,
        Fault.BACKEND_TIMEOUT,
        Retry.NO,
        "{side}service {service} sent no response within {timeout:g}s (--request-timeout)",
    ),
    # Never sent: no request of the service's to count, and no on_end to tell.
    Outcome.UNREACHABLE: Failure(
        False,
        True,
        False,
        True,
        False,
        Fault.BACKEND_UNREACHABLE,
        Retry.ELSEWHERE,
        "{side}service {service} is unreachable: {reason}",
    ),
    # Not the service's fault: a new pair is tried (pair.py).
    Outcome.PARTNER: Failure(
        True, False, False, False, True, Fault.BACKEND_UNREACHABLE, Retry.ANYWHERE, "{reason}"
    ),
    # A load signal, answered before any byte: the journey's next model is tried.
    Outcome.FALLBACK: Failure(
        True,
        False,
        True,
        True,
        False,
        Fault.NO_HEALTHY_SERVICE,
        Retry.NO,
        "{side}service {service} {reason}",
    ),
    # Its answer was dropped (the breaker counted it) for another service's.
    Outcome.RETRIED: Failure(
        True,
        False,
        True,
        True,
        False,
        Fault.BACKEND_BROKEN,
        Retry.ELSEWHERE,
        "{side}service {service} {reason}",
    ),
    # The client's error, answered as such (a 400, 413 or 422; else a 502).
    Outcome.REFUSED: Failure(
        True,
        False,
        False,
        False,
        True,
        Fault.BAD_REQUEST,
        Retry.NO,
        "{side}service {service} answered {status}: {reason}",
    ),
    Outcome.LET_GO: Failure(False, False, False, False, True, None, Retry.NO, ""),
    Outcome.CRASHED: Failure(False, False, False, False, False, None, Retry.NO, ""),
}


class Journey(Protocol):
    """The request an attempt is a try of, as its attempts see it (``journey.Journey``)."""

    router: ProxyHost
    client: ClientConnection
    request: ClientRequest
    route: RouteRequest | None
    forward_extra: bytes  # what the backend's request head gets added
    head_extra: bytes  # what the client's response head gets added
    fallbacks: list[str]
    tried: list[Service]
    failures: int
    last_error: ProxyError | None

    def finish(self, attempt: Attempt) -> None: ...

    def fail(self, error: ProxyError) -> None: ...

    def crash(self, exc: Exception, attempt: Attempt | None = None) -> None: ...

    def metered(self) -> bool: ...


class Owner(Protocol):
    """Whom an attempt reports to: its journey, or the pair it is one side of."""

    def finish(self, attempt: Attempt) -> None:
        """The attempt has an outcome: it ends (``Attempt.end``), then what follows."""
        ...

    def may_retry(self, failed: Service) -> bool:
        """Whether another try could follow ``failed``'s error answer."""
        ...


def prompt_estimate(body: bytes) -> tuple[int, int]:
    """The tokens of a request whose backend had its prompt and relayed nothing: at
    least one."""
    return max(1, len(body) // BYTES_PER_TOKEN), 0


def request_data(
    service: Service, request: ClientRequest, body: bytes, extra: bytes = b""
) -> list[bytes]:
    """The request as the backend gets it: the client's headers less the hop-by-hop
    ones, the router's own (``extra``), and ``body``."""
    lines = [
        b"%s %s%s HTTP/1.1\r\nHost: %s\r\n%s"
        % (request.method, service.path_prefix, request.target, service.host_header, extra)
    ]
    drop = REQUEST_DROP
    if request.connection is not None:
        named = connection_names(request.connection)
        if named:
            drop = drop | named
    for name, value in request.headers:
        if name not in drop:
            lines.append(b"%s: %s\r\n" % (name, value))
    if body or request.method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    head = b"".join(lines)
    if len(body) > LARGE_BODY:
        return [head, body]
    return [head + body]


class Attempt:
    """One try of a request on one service: from the choice to its end."""

    __slots__ = (
        "conn",
        "connecting",
        "ended",
        "journey",
        "outcome",
        "owner",
        "reason",
        "reusable",
        "route",
        "sent_at",
        "sent_tick",
        "service",
        "side",
        "status",
        "strategy",
        "tokens",
        "ttfb_s",
    )
    tokens: tuple[int, int] | None  # the answer's usage, set by the end of a DONE one

    def __init__(
        self,
        journey: Journey,
        owner: Owner,
        service: Service,
        strategy: strategies.Strategy,
        route: RouteRequest,
        side: str = "",
    ) -> None:
        self.journey = journey
        self.owner = owner
        self.service = service
        self.strategy = strategy
        self.route = route
        self.side = side  # "" for a whole request; "prefill" or "decode" for a pair's
        self.conn: UpstreamConnection | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.outcome: Outcome | None = None
        self.ended = False
        self.status = 0
        self.reason = ""
        self.reusable = False
        self.ttfb_s = 0.0
        self.sent_at = 0.0
        self.sent_tick = 0.0  # the send, on the loop's clock (ms ticks: for deadlines)
        self._begin(journey)
        service.acquire()

    def _begin(self, journey: Journey) -> None:
        """A kind's own state, from its start (its constructor is this one)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.journey.router.loop

    @property
    def timeout_s(self) -> float:
        """--request-timeout: for its answer's head, then for each silence after it."""
        return self.journey.router.config.request_timeout

    def go(self) -> None:
        """Send on an idle pooled connection at once, else open one (the one task)."""
        pool = self.service.pool
        assert pool is not None
        conn = pool.take_idle()
        if conn is not None:
            self.send(conn)
        else:
            self.connecting = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        pool = self.service.pool
        assert pool is not None
        try:
            conn = await pool.connect()
        except ConnectError as exc:
            self.connecting = None
            if self.outcome is None:
                self.reason = str(exc)
                self.outcome = Outcome.UNREACHABLE
                self.owner.finish(self)
            return
        except asyncio.CancelledError:  # cancel() has ended it
            self.connecting = None
            raise
        except Exception as exc:  # a bug: the request ends in crash, which ends this
            self.connecting = None
            self.journey.crash(exc, self)
            return
        self.connecting = None
        if self.outcome is not None or self.journey.client.closing:
            self.conn = conn
            self.reusable = True  # it is fresh and has carried nothing
            self.let_go()
            return
        try:
            self.send(conn)
        except Exception as exc:
            self.journey.crash(exc, self)

    def send(self, conn: UpstreamConnection) -> None:
        """Write the request to ``conn``, each kind its own; the strategy's ``on_start``
        comes with the send, on either side (``_sending``)."""
        raise NotImplementedError

    def _sending(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.sent_at = time.perf_counter()
        self.sent_tick = conn.loop.time()
        self.strategy.on_start(self.service, self.route)

    def let_go(self) -> None:
        """Given up before its answer, not for the service's fault (the client hung up,
        or a pair moved on): reported like any end."""
        if self.outcome is None:
            self.outcome = Outcome.LET_GO
            task = self.connecting
            if task is not None and task is not asyncio.current_task():
                task.cancel()
            if self.conn is not None and not self.reusable:
                self.conn.close()
            self.owner.finish(self)

    def stop(self, reason: str) -> bool:
        """The journey crashed: end here, since no finish follows. Whether the client
        has this attempt's response head (only an exchange can say yes)."""
        if self.outcome is None:
            self.outcome = Outcome.CRASHED
            task = self.connecting
            if task is not None and task is not asyncio.current_task():
                task.cancel()
            if self.conn is not None:
                self.conn.close()
        self.end()
        return False

    def failure(self) -> tuple[ProxyError, Retry]:
        """The error its outcome gives the request, and where a retry may go."""
        assert self.outcome is not None
        row = FAILURES[self.outcome]
        assert row.fault is not None
        message = row.message.format(
            side=f"{self.side} " if self.side == "prefill" else "",
            service=self.service.name,
            reason=self.reason,
            status=self.status,
            timeout=self.timeout_s,
        )
        return ProxyError(row.fault, message), row.retry

    def end(self) -> None:
        """The one place a try is accounted, once: the slot, the service's counts, its
        health, the metrics, the strategy, the connection."""
        if self.ended:
            return
        self.ended = True
        service = self.service
        service.release()  # first: nothing below may keep the slot
        latency_s = time.perf_counter() - self.sent_at
        outcome = self.outcome
        if outcome is not Outcome.DONE:
            self._failed(latency_s)
            return
        router = self.journey.router
        roster = router.roster
        status = self.status
        self.tokens = router.metrics.finished(
            service, self.route.model, status, latency_s, self.ttfb_s, self.tail
        )
        service.request_count += 1
        service.latencies.append(latency_s)
        if status == 508:
            # A router (this one, or one in a ring with it) saw its own Via.
            roster.request_failed(
                service, f"routing loop: {service.url} leads back to a router it came through"
            )
        elif status >= 500 or status == 429:
            roster.answered_error(service, status)  # a 5xx is its breaker's step
        elif service.watched:
            roster.request_succeeded(service)  # only then is there a streak to end
        conn = self.conn
        assert conn is not None
        if self.reusable:
            service.pool.release(conn)  # type: ignore[union-attr]
        else:
            conn.close()
        if self.side:
            router.metrics.pd(self.side, "ok" if status < 400 else "failed")
        self.strategy.on_end(service, self.route, latency_s, status < 500)

    def _failed(self, latency_s: float) -> None:
        """``end`` of any outcome but DONE: what its row in FAILURES says."""
        service = self.service
        outcome = self.outcome
        assert outcome is not None
        router = self.journey.router
        row = FAILURES[outcome]
        conn = self.conn
        if conn is not None:
            if self.reusable:
                service.pool.release(conn)  # type: ignore[union-attr]
            else:
                conn.close()
        if row.counted:
            service.request_count += 1
        if row.answered:
            router.roster.answered_error(service, self.status)
        if row.metric:
            router.metrics.failed(service, outcome.value)
        if row.blames:
            router.roster.request_failed(service, self.reason)
        if outcome is Outcome.CRASHED:
            return  # nothing of it is counted, nor told: what raised may raise again
        if self.side and outcome is not Outcome.LET_GO:
            router.metrics.pd(self.side, "failed")
        if self.sent_at:  # on_end follows on_start alone
            self.strategy.on_end(service, self.route, latency_s, row.fine)

    @property
    def tail(self) -> bytes:
        """The answer's last bytes, where its usage is (an exchange keeps them)."""
        return b""

    def tokens_used(self, body: bytes, metered: bool) -> tuple[int, int] | None:
        """(prompt, completion) tokens this try cost, for its key's grant: its answer's
        usage; ``metered`` (a tpm key), an estimate where it has none."""
        if metered and self.sent_at:
            return prompt_estimate(body)  # the backend had the prompt
        return None

    def check_timeout(self, now: float) -> None:
        """Called by the router's sweep while this is the request's try."""

    def pause(self) -> None:
        """The client is not reading: stop reading this attempt's backend."""

    def resume(self) -> None:
        pass

    def cancel(self) -> None:
        """The client hung up."""
        self.let_go()

    def served_by(self, name: str) -> str:
        """Who served the request, for the access log: the service's name."""
        return name
