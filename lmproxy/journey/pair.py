"""Prefill/decode disaggregation: one try of a request as a prefill and a decode.

A model served by services with the ``prefill`` and ``decode`` roles is routed
in two steps; ``--pd-mode`` (or the model's ``pd_mode``) says which protocol
its engines speak:

- ``vllm`` (sequential; vLLM's KV connectors such as NIXL): the request goes to a
  prefill service with ``max_tokens`` 1, ``stream`` false, no ``stream_options``
  and ``kv_transfer_params`` asking for a remote decode. Its answer carries the
  ``kv_transfer_params`` that locate the KV cache; the original request, with
  those, then goes to a decode service, whose answer the client gets.
- ``sglang`` (parallel; Mooncake, NIXL): the router adds the prefill's
  ``bootstrap_host``, ``bootstrap_port`` and a random ``bootstrap_room`` (arrays,
  one per sequence, for a batch or ``n`` > 1) and sends the same body to both at
  once. The decode's answer is relayed; the prefill's is read and dropped.

Each side is chosen by its own strategy (``--prefill-strategy``,
``--decode-strategy``) among the healthy services of its role, and each is an
:class:`~lmproxy.journey.attempt.Attempt`: the decode an ordinary
:class:`~lmproxy.journey.exchange.Exchange` (streaming, flow control, timeouts
and accounting are the proxy's own), the prefill a :class:`Prefill`. A
:class:`Pair` is one try: the journey makes a new pair for each retry. Only
these requests are decoded whole and encoded again (msgspec, into plain dicts,
so a field the router does not know survives as sent); every other request's
bytes pass untouched.

What a pair does on each side's end is a transition table per mode
(:data:`TRANSITIONS`), in the manner of h11's ``_state.py``: the pair's state
and the event give the next state and the one action to take. The pair
reports its result to the journey through the journey's ``finish``, with the
attempt whose end decides it: a prefill that fails before answering (connect,
drop, timeout, 5xx, 429), or whose answer is not the JSON object vLLM sends, is
retried with a new pair, without it; a 4xx from it is the client's error and is
answered as such. A decode that fails before its first byte is retried with a
new pair (and, for SGLang, a new room), within ``--retries``. After the
decode's first byte nothing is retried (the stream gets the usual SSE error
event). A client that hangs up cancels both sides.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import msgspec

from lmproxy import decode
from lmproxy.backend.upstream import UpstreamConnection
from lmproxy.client.request import COMPLETION_PATHS, RouteRequest
from lmproxy.errors import Fault, ProxyError
from lmproxy.journey.admission import has_room
from lmproxy.journey.attempt import Attempt, Journey, Outcome, Retry, request_data
from lmproxy.journey.exchange import Exchange, MeteredExchange

if TYPE_CHECKING:
    import asyncio

    import strategies
    from lmproxy.fleet.roster import Service

log = logging.getLogger("lmproxy")

MAX_PREFILL_ANSWER = 1024 * 1024  # vLLM's: one token and kv_transfer_params
KEPT_ERROR = 2048  # bytes of a failed prefill's answer quoted to the client
REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
_WARNED: set[str] = set()  # prefill services that answered without kv_transfer_params
# A prefill's failures before its answer, in its own words.
_PREFILL_SAYS = {
    Outcome.DROPPED: "prefill service {service} failed before answering: {reason}",
    Outcome.TIMEOUT: "prefill service {service} sent no answer within {timeout:g}s "
    "(--request-timeout)",
    Outcome.BROKEN: "prefill service {service} {reason}",
}


class _Answer(msgspec.Struct):
    """Of a vLLM prefill's answer, the one field the decode needs (kept as decoded)."""

    kv_transfer_params: Any = None


class State(enum.Enum):
    PREFILLING = "prefilling"  # vLLM: the prefill alone
    BOTH = "both"  # SGLang: the prefill and the decode at once
    DECODING = "decoding"  # the decode alone: the prefill has answered
    PREFILL_ONLY = "prefill_only"  # SGLang: the decode has ended, the prefill runs on
    OVER = "over"


class Event(enum.Enum):
    PREFILL_OK = "prefill_ok"
    PREFILL_FAILED = "prefill_failed"
    PREFILL_FAILED_LATE = "prefill_failed_late"  # the decode's head reached the client
    DECODE_ENDED = "decode_ended"


class Action(enum.Enum):
    NOTHING = "nothing"
    SEND_DECODE = "send_decode"  # vLLM: the decode, with the prefill's kv_transfer_params
    REPORT_PREFILL = "report_prefill"  # the prefill's failure ends the pair
    STOP_DECODE = "stop_decode"  # ... and the decode under way beside it stops
    REPORT_DECODE = "report_decode"  # the decode's end is the request's


# (state, event) -> (next state, action). A pair whose state has no row for an event
# is over for it: an end that comes after the pair's result is only accounted.
TRANSITIONS: dict[str, dict[tuple[State, Event], tuple[State, Action]]] = {
    "vllm": {
        (State.PREFILLING, Event.PREFILL_OK): (State.DECODING, Action.SEND_DECODE),
        (State.PREFILLING, Event.PREFILL_FAILED): (State.OVER, Action.REPORT_PREFILL),
        (State.DECODING, Event.DECODE_ENDED): (State.OVER, Action.REPORT_DECODE),
    },
    "sglang": {
        (State.BOTH, Event.PREFILL_OK): (State.DECODING, Action.NOTHING),
        (State.BOTH, Event.PREFILL_FAILED): (State.OVER, Action.STOP_DECODE),
        # Nothing can be taken back: the decode's answer stands.
        (State.BOTH, Event.PREFILL_FAILED_LATE): (State.DECODING, Action.NOTHING),
        (State.BOTH, Event.DECODE_ENDED): (State.PREFILL_ONLY, Action.REPORT_DECODE),
        (State.DECODING, Event.DECODE_ENDED): (State.OVER, Action.REPORT_DECODE),
        (State.PREFILL_ONLY, Event.PREFILL_OK): (State.OVER, Action.NOTHING),
        (State.PREFILL_ONLY, Event.PREFILL_FAILED): (State.OVER, Action.NOTHING),
    },
}


class Split:
    """What a journey for a disaggregated model keeps across its pairs."""

    __slots__ = ("body", "decode_strategy", "fields", "mode", "prefill_route", "prefill_strategy")

    def __init__(self, journey: Journey, fields: dict[str, Any]) -> None:
        router = journey.router
        route = journey.route
        assert route is not None and route.model is not None
        self.mode = router.pd_mode(route.model)
        self.prefill_strategy = router.prefill_strategy
        self.decode_strategy = router.decode_strategy
        self.fields = fields
        self.body = route.body  # as the client sent it (with the model filled in)
        # The prefill strategy has a route object of its own: a strategy keeps
        # scratch state on it between choose and on_start.
        self.prefill_route = RouteRequest(
            route.path, route.model, route.head, route.body, route.headers
        )


def split(journey: Journey) -> Split | ProxyError:
    """A journey's request for a disaggregated model, decoded: its body must be an object."""
    route = journey.route
    assert route is not None
    try:
        fields = decode.json(route.body)
    except msgspec.DecodeError:
        fields = None
    if not isinstance(fields, dict):
        return ProxyError(
            Fault.BAD_REQUEST,
            "the request body must be a JSON object, nested at most "
            f"{decode.MAX_DEPTH} levels deep",
        )
    return Split(journey, fields)


def untried(journey: Journey, role: str, failed: Service | None = None) -> list[Service]:
    """Healthy ``role`` services of the model not tried yet by this request (nor
    ``failed``, whose failure is not recorded yet)."""
    route = journey.route
    assert route is not None and route.model is not None
    tried = journey.tried
    return [
        s
        for s in journey.router.roster.pd_candidates(route.model, role)
        if s is not failed and s not in tried
    ]


def pair_or_error(journey: Journey) -> tuple[list[Service], list[Service]] | ProxyError | None:
    """The prefill and decode services a new pair may use; None when there are none
    but services that take whole requests (better than a 503); else the error."""
    route = journey.route
    assert route is not None and route.model is not None
    router = journey.router
    model = route.model
    prefills = untried(journey, "prefill")
    decodes = untried(journey, "decode")
    if not prefills or not decodes:
        if router.roster.candidates(model):
            return None
        return journey.last_error or _unavailable(
            journey, model, "prefill" if not prefills else "decode"
        )
    if not router.admission.limited:
        return prefills, decodes
    return _with_room(journey, model, prefills, decodes)


def _with_room(
    journey: Journey, model: str, prefills: list[Service], decodes: list[Service]
) -> tuple[list[Service], list[Service]] | ProxyError:
    """Under admission limits, the services with room; a pair never waits in the queue."""
    if journey.router.admission.full():  # --max-concurrent-requests: the whole router's
        error = ProxyError(
            Fault.QUEUE_TIMEOUT,
            "the router has its --max-concurrent-requests under way; retry shortly",
        )
        error.retry_after = 1
        return error
    prefills = [s for s in prefills if has_room(s)]
    decodes = [s for s in decodes if has_room(s)]
    if not prefills or not decodes:
        side = "prefill" if not prefills else "decode"
        error = ProxyError(
            Fault.QUEUE_TIMEOUT,
            f"every {side} service for model {model!r} is at its max_in_flight; retry shortly",
        )
        error.retry_after = 1
        return error
    return prefills, decodes


def _unavailable(journey: Journey, model: str, side: str) -> ProxyError:
    roster = journey.router.roster
    among = [s for s in roster.services.values() if s.role == side and model in s.models]
    return ProxyError(
        Fault.NO_HEALTHY_SERVICE,
        f"no healthy {side} service for model {model!r}: "
        + (roster.why_unavailable(model, among) if among else "none is configured"),
    )


class Prefill(Attempt):
    """The prefill side of one pair: the :class:`~lmproxy.backend.upstream.Sink` of its
    upstream connection (the answer, de-chunked, kept up to ``limit`` bytes). Its
    deadline is a timer of its own: an SGLang prefill may outlive its request."""

    __slots__ = ("answer", "body", "final", "kept", "limit", "overflow", "timer")

    def __init__(
        self,
        journey: Journey,
        pair: Pair,
        service: Service,
        strategy: strategies.Strategy,
        route: RouteRequest,
        body: bytes,
        limit: int,
    ) -> None:
        super().__init__(journey, pair, service, strategy, route, "prefill")
        self.body = body
        self.limit = limit
        self.kept = bytearray()
        self.overflow = False
        self.final = False  # its failure is answered, never retried
        self.answer: _Answer | None = None
        self.timer: asyncio.TimerHandle | None = None

    def send(self, conn: UpstreamConnection) -> None:
        self._sending(conn)
        journey = self.journey
        self.timer = self.loop.call_later(self.timeout_s, self.expire)
        data = request_data(self.service, journey.request, self.body, journey.forward_extra)
        conn.send(self, data, False, True)

    # --- Sink -------------------------------------------------------------------------

    def on_head(self, status: int, head: bytes, framing: int) -> None:
        self.status = status
        self.ttfb_s = time.perf_counter() - self.sent_at

    def on_body(self, data: bytes) -> None:
        room = self.limit - len(self.kept)
        if len(data) > room:
            self.overflow = True
            data = data[: max(room, 0)]
        self.kept += data

    def flush(self) -> None:
        pass

    def on_complete(self, reusable: bool) -> None:
        if self.outcome is None:
            self.reusable = reusable
            self.outcome = self._judged()
            # Not inline: this runs inside the upstream parser's callbacks.
            self.loop.call_soon(self.owner.finish, self)

    def on_lost(self, reason: str, broken: bool) -> None:
        if self.outcome is None:
            self.reason = reason
            self.outcome = Outcome.DROPPED
            self.loop.call_soon(self.owner.finish, self)

    def on_error(self, exc: Exception) -> None:
        self.journey.crash(exc, self)

    def _judged(self) -> Outcome:
        """What its answer means: the decode's go-ahead, the client's error, or a
        failure another prefill may not have."""
        status = self.status
        said = bytes(self.kept[:KEPT_ERROR]).decode("utf-8", "replace").strip()
        if status >= 500 or status == 429:
            self.reason = f"answered {status}: {said}"
            return Outcome.RETRIED
        if status >= 400:
            self.reason = said
            return Outcome.REFUSED
        if self.limit != MAX_PREFILL_ANSWER:
            return Outcome.DONE  # SGLang's: read and dropped
        if self.overflow:
            self.final = True
            self.reason = f"answered more than {MAX_PREFILL_ANSWER} bytes to a one-token request"
            return Outcome.BROKEN
        try:
            self.answer = decode.json(self.kept, into=_Answer)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.reason = f"answered what is not the JSON object vLLM sends ({exc})"
            return Outcome.BROKEN
        return Outcome.DONE

    # ---------------------------------------------------------------------------------

    def expire(self) -> None:
        self.timer = None
        if self.outcome is None:
            self.conn.close()  # type: ignore[union-attr]
            self.outcome = Outcome.TIMEOUT
            self.owner.finish(self)

    def end(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        Attempt.end(self)

    def failure(self) -> tuple[ProxyError, Retry]:
        """Every failure of a prefill is retried on another, but the client's own (a
        4xx) and an answer no prefill should give."""
        error, _ = Attempt.failure(self)
        outcome = self.outcome
        says = _PREFILL_SAYS.get(outcome) if outcome is not None else None
        if says is not None:
            error.message = says.format(
                service=self.service.name, reason=self.reason, timeout=self.timeout_s
            )
        if outcome is Outcome.DROPPED or outcome is Outcome.TIMEOUT:
            error.fault = Fault.BACKEND_UNREACHABLE  # its decode never started: a 502
        if outcome is Outcome.REFUSED:
            if self.status not in (400, 413, 422):
                error.fault = Fault.BACKEND_BROKEN
            return error, Retry.NO
        if self.final:
            return error, Retry.NO
        return error, Retry.ELSEWHERE


class Pair:
    """One try of a disaggregated request: a prefill and a decode, each an attempt."""

    __slots__ = ("decode", "journey", "prefill", "prefill_name", "split", "state", "table")

    def __init__(self, journey: Journey, split: Split) -> None:
        self.journey = journey
        self.split = split
        self.table = TRANSITIONS[split.mode]
        self.prefill: Prefill | None = None
        self.decode: Exchange | None = None
        self.prefill_name = ""
        self.state = State.PREFILLING if split.mode == "vllm" else State.BOTH

    def start(self, prefills: list[Service], decodes: list[Service]) -> None:
        split = self.split
        route = self.journey.route
        assert route is not None
        service = split.prefill_strategy.choose(prefills, split.prefill_route)
        self.prefill_name = service.name
        if split.mode == "vllm":
            fields = dict(split.fields)
            fields["max_tokens"] = 1
            if "max_completion_tokens" in fields:
                fields["max_completion_tokens"] = 1
            fields["stream"] = False
            fields.pop("stream_options", None)
            fields["kv_transfer_params"] = REMOTE_DECODE
            body, limit = msgspec.json.encode(fields), MAX_PREFILL_ANSWER
        else:
            # SGLang: both at once, the same body, a fresh room for this pair.
            route.body = msgspec.json.encode({**split.fields, **self._bootstrap(service)})
            body, limit = route.body, KEPT_ERROR
        self.prefill = Prefill(
            self.journey, self, service, split.prefill_strategy, split.prefill_route, body, limit
        )
        self.prefill.go()
        if self.state is State.BOTH:
            self._decode(decodes)

    def _decode(self, decodes: list[Service]) -> None:
        journey = self.journey
        route = journey.route
        assert route is not None
        strategy = self.split.decode_strategy
        service = strategy.choose(decodes, route)
        kind = MeteredExchange if journey.metered() else Exchange
        self.decode = kind(journey, self, service, strategy, route, "decode")
        self.decode.go()

    def _bootstrap(self, prefill: Service) -> dict[str, Any]:
        count = self._batch_size()
        host, port = prefill.host, prefill.spec.bootstrap_port
        if count is None:
            return {
                "bootstrap_host": host,
                "bootstrap_port": port,
                "bootstrap_room": random.getrandbits(63),
            }
        return {
            "bootstrap_host": [host] * count,
            "bootstrap_port": [port] * count,
            "bootstrap_room": [random.getrandbits(63) for _ in range(count)],
        }

    def _batch_size(self) -> int | None:
        """Sequences in one request, as SGLang counts them: ``n`` > 1, or a list of
        prompts (a list of token ids is one prompt); None for one."""
        fields = self.split.fields
        n = fields.get("n")
        if isinstance(n, int) and n > 1:
            return n
        prompt = fields.get("prompt")
        if (
            self.split.prefill_route.path in COMPLETION_PATHS
            and isinstance(prompt, list)
            and prompt
            and not isinstance(prompt[0], int)
        ):
            return len(prompt)
        return None

    # --- the ends of its sides: Owner ----------------------------------------------------

    def finish(self, attempt: Attempt) -> None:
        """A side ended: account for it, then the pair's table says what follows."""
        try:
            attempt.end()
            prefill = attempt is self.prefill
            event = self._prefill_event(attempt) if prefill else Event.DECODE_ENDED
            move = self.table.get((self.state, event))
            if move is None:
                return  # the pair's result is out: this end is only accounted
            self.state, action = move
            self._act(action, attempt)
            if self.state is State.OVER:
                # Its sides refer back to it: let go of them, or the pair (and the
                # request's body) would wait for the garbage collector.
                self.prefill = self.decode = None
        except Exception as exc:
            self.journey.crash(exc, attempt)

    def _prefill_event(self, prefill: Attempt) -> Event:
        if prefill.outcome is Outcome.DONE:
            return Event.PREFILL_OK
        decode = self.decode
        if decode is not None and decode.head_sent and decode.outcome is None:
            return Event.PREFILL_FAILED_LATE
        return Event.PREFILL_FAILED

    def _act(self, action: Action, attempt: Attempt) -> None:
        journey = self.journey
        if action is Action.REPORT_DECODE:
            prefill = self.prefill
            if attempt.outcome is not Outcome.DONE and prefill is not None:
                prefill.let_go()  # its decode failed: the pair is given up
            journey.finish(attempt)
        elif action is Action.SEND_DECODE:
            self._after_prefill(attempt)
        elif action is not Action.NOTHING:
            decode = self.decode
            if action is Action.STOP_DECODE and decode is not None:
                decode.partner_failed(f"prefill service {attempt.service.name} failed")
            journey.finish(attempt)

    def _after_prefill(self, prefill: Attempt) -> None:
        """vLLM: the decode step, with the kv_transfer_params the prefill answered."""
        journey = self.journey
        if journey.client.closing:
            self.state = State.OVER
            journey.finish(prefill)  # the client left while it prefilled
            return
        assert isinstance(prefill, Prefill)
        fields = dict(self.split.fields)
        params = prefill.answer.kv_transfer_params if prefill.answer is not None else None
        if params is not None:
            fields["kv_transfer_params"] = params
        elif prefill.service.name not in _WARNED and len(_WARNED) < 1000:
            _WARNED.add(prefill.service.name)
            log.warning(
                "prefill service %s answered without kv_transfer_params: its decode "
                "computes the prompt again. Start it with a KV connector "
                "(--kv-transfer-config)",
                prefill.service.name,
            )
        route = journey.route
        assert route is not None and route.model is not None
        route.body = msgspec.json.encode(fields)
        decodes = untried(journey, "decode")
        if not decodes:
            self.state = State.OVER
            journey.fail(journey.last_error or _unavailable(journey, route.model, "decode"))
            return
        self._decode(decodes)

    def may_retry(self, failed: Service) -> bool:
        """A decode's error answer is dropped when a new pair can be made without it
        (or the model has services for whole requests)."""
        journey = self.journey
        if journey.failures >= journey.router.config.retries or journey.client.closing:
            return False
        route = journey.route
        assert route is not None and route.model is not None
        pair = untried(journey, "prefill") and untried(journey, "decode", failed)
        return bool(pair) or bool(journey.router.roster.candidates(route.model))

    # --- what the journey drives: the client side and the sweep ---------------------------

    def cancel(self) -> None:
        """The client hung up: the decode's end lets the prefill go, else the prefill."""
        decode, prefill = self.decode, self.prefill
        if decode is not None and decode.outcome is None:
            decode.cancel()
        elif prefill is not None and prefill.outcome is None:
            prefill.cancel()

    def stop(self, reason: str) -> bool:
        """The journey crashed: both sides end; whether the client has the decode's head."""
        answered = False
        for side in (self.prefill, self.decode):
            if side is not None and side.stop(reason):
                answered = True
        return answered

    def pause(self) -> None:
        if self.decode is not None:
            self.decode.pause()

    def resume(self) -> None:
        if self.decode is not None:
            self.decode.resume()

    def check_timeout(self, now: float) -> None:
        if self.decode is not None:
            self.decode.check_timeout(now)

    def served_by(self, name: str) -> str:
        prefill = self.prefill_name
        if not prefill:
            return name
        return f"prefill={prefill},decode={name}" if name else f"prefill={prefill}"
