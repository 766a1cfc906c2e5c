"""Prefill/decode disaggregation: one request, served by a prefill and a decode service.

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
``--decode-strategy``) among the healthy services of its role. Only these
requests are decoded whole and encoded again (msgspec, into plain dicts, so a
field the router does not know survives as sent); every other request's bytes
pass untouched.

Failures: a prefill that fails before answering (connect, drop, 5xx, 429), or
whose answer is not the JSON object vLLM sends (garbage, or nested past
``lmproxy.decode``'s depth), is counted on it and retried on another prefill; a
4xx from it is the client's error and is answered as such. A decode that fails
before its first byte is retried with a new pair (and, for SGLang, a new room),
within ``--retries``.
After the decode's first byte nothing is retried (the stream gets the usual
SSE error event). A client that hangs up cancels both sides. An exception in
either step (a strategy's, a bug) ends the request as ``Journey.crash`` does,
and the prefill slots the journey holds (``prefills_held``) come back with it.

The decode step is an ordinary :class:`~lmproxy.proxy.Journey` send: streaming,
flow control, timeouts and accounting are the proxy's own.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import msgspec

from lmproxy import decode
from lmproxy.admission import has_room
from lmproxy.errors import Fault, ProxyError
from lmproxy.proxy import (
    Exchange,
    Journey,
    Outcome,
    _request_data,
    prompt_estimate,
)
from lmproxy.request import COMPLETION_PATHS, RouteRequest
from lmproxy.upstream import ConnectError, UpstreamConnection

if TYPE_CHECKING:
    from lmproxy.registry import Service

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


class _Answer(msgspec.Struct):
    """Of a vLLM prefill's answer, the one field the decode needs (kept as decoded)."""

    kv_transfer_params: Any = None


class Prefill:
    """The prefill step of one pair: the :class:`~lmproxy.upstream.Sink` of its
    upstream connection (the answer, de-chunked, kept up to ``limit`` bytes), and
    an :class:`~lmproxy.protocols.Exchanging` for the client side and the router's
    sweep while it is the client's only exchange (vLLM's first step). No task and
    no timer: its end is a ``call_soon`` to the journey, its deadline the sweep's
    (SGLang's, beside the decode, a timer of its own)."""

    __slots__ = (
        "body",
        "conn",
        "done",
        "journey",
        "limit",
        "overflow",
        "pair",
        "sent_at",
        "sent_tick",
        "service",
        "status",
        "timer",
        "ttfb_s",
    )

    def __init__(
        self,
        journey: PDJourney,
        service: Service,
        conn: UpstreamConnection,
        limit: int,
        pair: int,
    ) -> None:
        self.journey = journey
        self.service = service
        self.conn = conn
        self.limit = limit
        self.pair = pair
        self.status = 0
        self.body = bytearray()
        self.overflow = False
        self.done = False
        self.sent_at = time.perf_counter()
        self.sent_tick = conn.loop.time()
        self.ttfb_s = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # --- Sink -------------------------------------------------------------------------

    def on_head(self, status: int, head: bytes, framing: int) -> None:
        self.status = status
        self.ttfb_s = time.perf_counter() - self.sent_at

    def on_body(self, data: bytes) -> None:
        room = self.limit - len(self.body)
        if len(data) > room:
            self.overflow = True
            data = data[: max(room, 0)]
        self.body += data

    def flush(self) -> None:
        pass

    def on_complete(self, reusable: bool) -> None:
        if self._end():
            # Not inline: this runs inside the upstream parser's callbacks.
            self.conn.loop.call_soon(self.journey.prefill_answered, self, reusable)

    def on_lost(self, reason: str, broken: bool) -> None:
        if self._end():
            self.conn.loop.call_soon(
                self.journey.prefill_failed, self, "dropped", f"failed before answering: {reason}"
            )

    def on_error(self, exc: Exception) -> None:
        self.journey.crash(exc)

    # --- Exchanging ---------------------------------------------------------------------

    def client_gone(self) -> None:
        try:
            self.cancel()
        except Exception as exc:  # its strategy's on_end, or a bug
            self.journey.crash(exc)

    def stop(self, reason: str) -> bool:
        """The journey crashed: the step is over; its slot comes back with the journey's
        (``PDJourney._release_held``)."""
        if self._end():
            self.conn.close()
        return False

    def pause(self) -> None:
        pass  # nothing of the prefill's answer goes to the client

    def resume(self) -> None:
        pass

    def check_timeout(self, now: float) -> None:
        timeout = self.journey.router.config.request_timeout
        if not self.done and now - self.sent_tick >= timeout:
            self.expire()

    # ---------------------------------------------------------------------------------

    def expire(self) -> None:
        if self._end():
            self.conn.close()
            timeout = self.journey.router.config.request_timeout
            self.journey.prefill_failed(
                self, "timeout", f"sent no answer within {timeout:g}s (--request-timeout)"
            )

    def cancel(self) -> None:
        """The client hung up, or the journey is over: stop the prefill's work."""
        if self._end():
            self.conn.close()
            self.journey.prefill_cancelled(self)

    def _end(self) -> bool:
        """Mark the step over; False if it already was."""
        if self.done:
            return False
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        return True


class PDJourney(Journey):
    """A request for a disaggregated model: the prefill step, then (or with) the
    decode step, which is the journey's own send."""

    __slots__ = (
        "connecting",
        "decode_exchange",
        "fields",
        "final_error",
        "mode",
        "pair",
        "partner_failed",
        "prefill",
        "prefill_connect",
        "prefill_route",
        "prefill_side",
        "prefill_strategy",
        "prefill_tried",
        "prefills_held",
        "whole",
    )

    def setup(self, *args: Any) -> None:
        """(mode, prefill strategy, decode strategy): ``PDJourney.take_over(journey, ...)``
        continues a routed request, with its id, trace and fallbacks."""
        mode, prefill, decode = args
        route = self.route
        assert route is not None
        self.mode = mode
        self.strategy = decode
        self.prefill_strategy = prefill
        # The prefill strategy has a route object of its own: a strategy keeps
        # scratch state on it between choose and on_start.
        self.prefill_route = RouteRequest(
            route.path, route.model, route.head, route.body, route.headers
        )
        self.prefill_tried: list[Service] = []
        # Prefill services whose slot this journey holds (SGLang: a cancelled pair's
        # may be returned after the next pair's is taken): a crash returns them all.
        self.prefills_held: list[Service] = []
        self.prefill: Service | None = None
        self.prefill_side: Prefill | None = None  # the current pair's, while it runs
        self.prefill_connect: asyncio.Task[None] | None = None  # SGLang: its connect
        self.partner_failed: ProxyError | None = None
        self.final_error: ProxyError | None = None  # answered instead of any retry
        self.pair = 0  # which (prefill, decode) pair is current: one per attempt
        self.connecting = False  # the current pair's decode is connecting
        self.decode_exchange: Exchange | None = None
        self.whole = False  # no prefill or decode is healthy: whole requests instead
        self.fields: dict[str, Any] = {}

    def start(self) -> None:
        try:
            try:
                fields = decode.json(self.route.body)  # type: ignore[union-attr]
            except msgspec.DecodeError:
                fields = None
            if not isinstance(fields, dict):
                self.fail(
                    ProxyError(
                        Fault.BAD_REQUEST,
                        "the request body must be a JSON object, nested at most "
                        f"{decode.MAX_DEPTH} levels deep",
                    )
                )
                return
            self.fields = fields
            self.attempt()
        except Exception as exc:
            self.crash(exc)

    # --- choosing a pair -----------------------------------------------------------

    def attempt(self) -> None:
        if self.whole:
            Journey.attempt(self)
            return
        route = self.route
        assert route is not None and route.model is not None
        registry = self.router.registry
        model = route.model
        prefills = self._untried("prefill")
        decodes = self._untried("decode")
        if not prefills or not decodes:
            if registry.candidates(model):
                # Services that take whole requests are better than a 503.
                self.whole = True
                self.strategy = self.router.strategy_for(model)
                route.body = self.request_body()
                Journey.attempt(self)
                return
            self.fail(
                self.last_error or self._unavailable(model, "prefill" if not prefills else "decode")
            )
            return
        admission = self.router.admission
        if admission.limited:
            full = admission.full()  # --max-concurrent-requests: the whole router's
            prefills = [s for s in prefills if has_room(s) and not full]
            decodes = [s for s in decodes if has_room(s) and not full]
            if full:
                error = ProxyError(
                    Fault.QUEUE_TIMEOUT,
                    "the router has its --max-concurrent-requests under way; retry shortly",
                )
                error.retry_after = 1
                self.fail(error)
                return
            if not prefills or not decodes:
                side = "prefill" if not prefills else "decode"
                error = ProxyError(
                    Fault.QUEUE_TIMEOUT,
                    f"every {side} service for model {model!r} is at its max_in_flight; "
                    "retry shortly",
                )
                error.retry_after = 1
                self.fail(error)
                return
        self._cancel_prefill()  # a previous pair's, whose decode failed
        self.pair += 1
        prefill = self.prefill_strategy.choose(prefills, self.prefill_route)
        prefill.acquire()
        self.prefills_held.append(prefill)
        self.prefill_strategy.on_start(prefill, self.prefill_route)
        self.prefill = prefill
        self.partner_failed = None
        if self.mode == "vllm":
            fields = dict(self.fields)
            fields["max_tokens"] = 1
            if "max_completion_tokens" in fields:
                fields["max_completion_tokens"] = 1
            fields["stream"] = False
            fields.pop("stream_options", None)
            fields["kv_transfer_params"] = REMOTE_DECODE
            self._prefill(prefill, msgspec.json.encode(fields), MAX_PREFILL_ANSWER)
            return
        # SGLang: both at once, the same body, a fresh room for this pair.
        route.body = msgspec.json.encode({**self.fields, **self._bootstrap(prefill)})
        self._prefill(prefill, route.body, KEPT_ERROR)
        self._decode(decodes)

    def request_body(self) -> bytes:
        """The body as the client sent it (with the model filled in)."""
        return self.prefill_route.body

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
        n = self.fields.get("n")
        if isinstance(n, int) and n > 1:
            return n
        assert self.route is not None
        prompt = self.fields.get("prompt")
        if (
            self.route.path in COMPLETION_PATHS
            and isinstance(prompt, list)
            and prompt
            and not isinstance(prompt[0], int)
        ):
            return len(prompt)
        return None

    def _unavailable(self, model: str, side: str) -> ProxyError:
        registry = self.router.registry
        among = [s for s in registry.services.values() if s.role == side and model in s.models]
        return ProxyError(
            Fault.NO_HEALTHY_SERVICE,
            f"no healthy {side} service for model {model!r}: "
            + (registry.why_unavailable(model, among) if among else "none is configured"),
        )

    def _decode(self, decodes: list[Service]) -> None:
        """The decode step: the proxy's own send, to a decode service."""
        route = self.route
        assert route is not None
        service = self.strategy.choose(decodes, route)
        service.acquire()
        pool = service.pool
        assert pool is not None
        conn = pool.take_idle()
        if conn is not None:
            self._send(service, conn)
        else:
            self.connecting = True
            self.client.task = self.router.loop.create_task(self._connect(service))

    def _send(self, service: Service, conn: UpstreamConnection) -> None:
        self.connecting = False
        error = self.partner_failed
        if error is not None and not self.whole:  # the prefill failed while we connected
            self.partner_failed = None
            service.release()
            service.pool.release(conn)  # type: ignore[union-attr]
            self._retry(None, error)
            return
        Journey._send(self, service, conn)
        exchange = self.client.exchange
        self.decode_exchange = exchange if isinstance(exchange, Exchange) else None

    async def _connect(self, service: Service) -> None:
        try:
            await Journey._connect(self, service)
        except asyncio.CancelledError:
            self.connecting = False
            self._cancel_prefill()
            raise
        finally:
            self.connecting = False

    def _fall_back(self, error: ProxyError) -> None:
        # The next model is served as any other: whole, or by a journey of its own
        # when it is disaggregated too.
        self._cancel_prefill()
        self.whole = True
        Journey._fall_back(self, error)

    def may_retry(self, failed: Service) -> bool:
        """A decode's error answer is dropped when a new pair can be made without it
        (or the model has services for whole requests)."""
        if self.whole:
            return Journey.may_retry(self, failed)
        if self.failures >= self.router.config.retries or self.client.closing:
            return False
        route = self.route
        assert route is not None and route.model is not None
        pair = self._untried("prefill") and self._untried("decode", failed)
        return bool(pair) or bool(self.router.registry.candidates(route.model))

    def _untried(self, role: str, failed: Service | None = None) -> list[Service]:
        """Healthy ``role`` services of the model not tried yet by this request (nor
        ``failed``, whose failure is not recorded yet)."""
        route = self.route
        assert route is not None and route.model is not None
        tried = self.prefill_tried if role == "prefill" else self.tried
        return [
            s
            for s in self.router.registry.pd_candidates(route.model, role)
            if s is not failed and s not in tried
        ]

    def _retry(self, failed: Service | None, error: ProxyError) -> None:
        if self.final_error is not None:  # the prefill said the request itself is wrong
            error, self.final_error = self.final_error, None
            self.fail(error)
            return
        Journey._retry(self, failed, error)

    # --- the prefill step ------------------------------------------------------------

    def _prefill(self, prefill: Service, body: bytes, limit: int) -> None:
        """Send the prefill step; on a pooled connection at once, else after a connect."""
        pool = prefill.pool
        assert pool is not None
        conn = pool.take_idle()
        if conn is not None:
            self._send_prefill(prefill, conn, body, limit, self.pair)
        elif self.mode == "vllm":
            self.client.task = self.router.loop.create_task(
                self._connect_prefill(prefill, body, limit, self.pair)
            )
        else:  # beside the decode, whose connect may be the client's task
            self.prefill_connect = self.router.loop.create_task(
                self._connect_prefill(prefill, body, limit, self.pair)
            )

    async def _connect_prefill(self, prefill: Service, body: bytes, limit: int, pair: int) -> None:
        pool = prefill.pool
        assert pool is not None
        try:
            try:
                conn = await pool.connect()
            except ConnectError as exc:
                # First: what follows may start the next connect, as this journey's task.
                self._connect_over()
                self._prefill_failed(prefill, pair, "connect", f"is unreachable: {exc}")
                return
            except asyncio.CancelledError:  # the client hung up, or the journey moved on
                self._connect_over()
                self._let_go(prefill)
                raise
            self._connect_over()
            if self.client.closing or pair != self.pair:
                self._let_go(prefill)
                pool.release(conn)
                return
            self._send_prefill(prefill, conn, body, limit, pair)
        except Exception as exc:
            self._connect_over()
            self.crash(exc)

    def _connect_over(self) -> None:
        """The connect task is over: it is nobody's task any more."""
        if self.mode == "vllm":
            self.client.task = None
        else:
            self.prefill_connect = None

    def _let_go(self, prefill: Service) -> None:
        """A prefill step given up before its answer: not the service's failure."""
        if self._free_prefill(prefill):
            self.prefill_strategy.on_end(prefill, self.prefill_route, 0.0, True)

    def _free_prefill(self, prefill: Service) -> bool:
        """Return a prefill's slot, unless a crash returned it already."""
        try:
            self.prefills_held.remove(prefill)
        except ValueError:
            return False
        prefill.release()
        return True

    def _release_held(self) -> None:
        """A crash: the prefill slots still held come back, a prefill under way stops."""
        side, self.prefill_side = self.prefill_side, None
        if side is not None:
            side.stop("")
        task = self.prefill_connect
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        held, self.prefills_held = self.prefills_held, []
        for prefill in held:
            prefill.release()

    def _send_prefill(
        self, prefill: Service, conn: UpstreamConnection, body: bytes, limit: int, pair: int
    ) -> None:
        side = Prefill(self, prefill, conn, limit, pair)
        router = self.router
        self.prefill_side = side
        if self.mode == "vllm":
            self.client.exchange = side  # the client side and the sweep drive it
        else:
            side.timer = router.loop.call_later(router.config.request_timeout, side.expire)
        data = _request_data(prefill, self.request, body, self.forward_extra)
        conn.send(side, data, False, True)

    def prefill_answered(self, side: Prefill, reusable: bool) -> None:
        """The prefill answered (any status): account, then go on or deal with it."""
        try:
            self._prefill_answered(side, reusable)
        except Exception as exc:
            self.crash(exc)

    def _prefill_answered(self, side: Prefill, reusable: bool) -> None:
        self._prefill_over(side)
        prefill, router = side.service, self.router
        pool = prefill.pool
        assert pool is not None
        if reusable:
            pool.release(side.conn)
        else:
            side.conn.close()
        latency_s = time.perf_counter() - side.sent_at
        if not self._free_prefill(prefill):
            return  # a crash ended the journey, and returned the slot
        prefill.request_count += 1
        prefill.latencies.append(latency_s)
        model = self.prefill_route.model
        router.metrics.finished(prefill, model, side.status, latency_s, side.ttfb_s, b"")
        answer: _Answer | None = None
        broken = ""  # what is wrong with a 2xx answer the decode needs
        if side.status < 400 and self.mode == "vllm" and not side.overflow:
            try:
                answer = decode.json(side.body, into=_Answer)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                broken = f"answered what is not the JSON object vLLM sends ({exc})"
        ok = side.status < 500 and not broken
        self.prefill_strategy.on_end(prefill, self.prefill_route, latency_s, ok)
        if side.status >= 400:
            router.metrics.pd("prefill", "failed")
            error, final = self._prefill_refused(prefill, side)
            self._prefill_lost(prefill, side.pair, error, final)
            return
        if broken:
            # Counted on it as broken HTTP would be; another prefill may answer well.
            router.metrics.pd("prefill", "failed")
            router.metrics.failed(prefill, "broken")
            router.registry.request_failed(prefill, broken)
            error = ProxyError(Fault.BACKEND_BROKEN, f"prefill service {prefill.name} {broken}")
            self._prefill_lost(prefill, side.pair, error, False)
            return
        router.metrics.pd("prefill", "ok")
        if prefill.watched:
            router.registry.request_succeeded(prefill)
        if self.mode == "vllm" and side.pair == self.pair and not self.client.closing:
            self._after_prefill(side, answer)

    def prefill_failed(self, side: Prefill, kind: str, what: str) -> None:
        """The prefill's connection failed, or it timed out, before its answer."""
        try:
            self._prefill_over(side)
            side.conn.close()
            self._prefill_failed(side.service, side.pair, kind, what)
        except Exception as exc:
            self.crash(exc)

    def prefill_cancelled(self, side: Prefill) -> None:
        """The client hung up (or the journey is over) while the prefill ran."""
        self._prefill_over(side)
        self._let_go(side.service)
        if self.mode == "vllm" and self.client.closing:
            key = self.request.key
            if self.grant is not None and key is not None and key.tpm:
                route = self.route
                assert route is not None
                self._end_key(prompt_estimate(route.body))  # the prefill had the prompt
            self._log(side.service.name, 499, 0, 0.0)

    def _prefill_over(self, side: Prefill) -> None:
        if self.prefill_side is side:
            self.prefill_side = None
        if self.client.exchange is side:
            self.client.exchange = None

    def _prefill_failed(self, prefill: Service, pair: int, kind: str, what: str) -> None:
        router = self.router
        if not self._free_prefill(prefill):
            return  # a crash ended the journey, and returned the slot
        prefill.request_count += 1
        router.registry.request_failed(prefill, what)
        router.metrics.failed(prefill, kind)
        router.metrics.pd("prefill", "failed")
        self.prefill_strategy.on_end(prefill, self.prefill_route, 0.0, False)
        error = ProxyError(Fault.BACKEND_UNREACHABLE, f"prefill service {prefill.name} {what}")
        self._prefill_lost(prefill, pair, error, False)

    def _prefill_lost(self, prefill: Service, pair: int, error: ProxyError, final: bool) -> None:
        """A failed prefill: another is tried (or ``error`` answered, if ``final``), unless
        the journey has moved on from its pair."""
        self.prefill_tried.append(prefill)
        self.last_error = error
        log.debug("request %s: %s", self.request_id.decode(), error.message)
        if pair == self.pair and not self.client.closing:
            self._cancel_decode(error, final)

    def _prefill_refused(self, prefill: Service, side: Prefill) -> tuple[ProxyError, bool]:
        """A prefill answered an error status: (the error, whether it is final). A 4xx
        says the request is wrong, and is answered; a 5xx or 429 is retried elsewhere."""
        said = bytes(side.body[:KEPT_ERROR]).decode("utf-8", "replace").strip()
        message = f"prefill service {prefill.name} answered {side.status}: {said}"
        if side.status < 500 and side.status != 429:
            fault = Fault.BAD_REQUEST if side.status in (400, 413, 422) else Fault.BACKEND_BROKEN
            return ProxyError(fault, message), True
        self.router.registry.answered_error(prefill, side.status)  # a 5xx: its breaker's step
        return ProxyError(Fault.BACKEND_BROKEN, message), False

    def _cancel_decode(self, error: ProxyError, final: bool) -> None:
        """The current pair's prefill failed: stop its decode (SGLang's runs meanwhile),
        then retry with a new pair, or answer ``error`` if ``final``. A decode that
        already answered is left to finish: nothing can be taken back."""
        if final:
            self.final_error = error
        exchange = self.decode_exchange
        if exchange is not None and exchange.outcome is None:
            if exchange.head_sent:
                self.final_error = None
                return
            exchange.partner_failed(error.message)  # not the decode's fault
        elif self.connecting:
            self.partner_failed = error  # _send sees it once connected
        elif self.mode == "vllm":
            self._retry(None, error)
        else:
            self.final_error = None  # the decode is over: its answer stands

    def _cancel_prefill(self) -> None:
        """Stop a prefill still under way: its pair is given up, or the client is gone."""
        side = self.prefill_side
        if side is not None:
            side.cancel()
        task = self.prefill_connect
        if task is not None and not task.done():
            task.cancel()

    def _after_prefill(self, side: Prefill, answer: _Answer | None) -> None:
        """vLLM: the decode step, with the kv_transfer_params the prefill answered."""
        prefill = side.service
        if side.overflow or answer is None:
            self.fail(
                ProxyError(
                    Fault.BACKEND_BROKEN,
                    f"prefill service {prefill.name} answered more than "
                    f"{MAX_PREFILL_ANSWER} bytes to a one-token request",
                )
            )
            return
        decode_fields = dict(self.fields)
        params = answer.kv_transfer_params
        if params is not None:
            decode_fields["kv_transfer_params"] = params
        elif prefill.name not in _WARNED and len(_WARNED) < 1000:
            _WARNED.add(prefill.name)
            log.warning(
                "prefill service %s answered without kv_transfer_params: its decode "
                "computes the prompt again. Start it with a KV connector "
                "(--kv-transfer-config)",
                prefill.name,
            )
        route = self.route
        assert route is not None and route.model is not None
        route.body = msgspec.json.encode(decode_fields)
        decodes = self._untried("decode")
        if not decodes:
            self.fail(self.last_error or self._unavailable(route.model, "decode"))
            return
        self._decode(decodes)

    # --- the end ------------------------------------------------------------------------

    def finish(self, exchange: Exchange) -> None:
        outcome = exchange.outcome
        if exchange is self.decode_exchange:
            self.decode_exchange = None
        if outcome is not None and not self.whole:
            self.router.metrics.pd(
                "decode", "ok" if outcome is Outcome.DONE and exchange.status < 400 else "failed"
            )
        Journey.finish(self, exchange)
        if outcome is Outcome.CLIENT_GONE:
            try:
                self._cancel_prefill()
            except Exception as exc:
                self.crash(exc)

    def _log(self, service: str, status: int, bytes_out: int, ttfb_s: float) -> None:
        prefill = self.prefill
        if prefill is not None and not self.whole:
            service = (
                f"prefill={prefill.name},decode={service}"
                if service
                else (f"prefill={prefill.name}")
            )
        Journey._log(self, service, status, bytes_out, ttfb_s)
