"""A simulated OpenAI-compatible backend, shaped like InfiniLM's inference server.

It serves ``/health``, ``/models``, ``/v1/models``, chat and text completions
(plain and streamed), and embeddings, with ``usage`` in its answers. It is fast
(uvloop + httptools) so that it is never the bottleneck of a benchmark, and it
fails on demand so that tests can prove what the router does about failures.

Fault modes, set for one request by the ``X-Mock-Fault`` header or for all
requests at run time by ``POST /mock/fault`` with ``{"fault": MODE}`` (``none``
clears it):

==================  =========================================================
``500``/``503``/``429``  answer that status with a JSON error body
``hang``            accept the request and never answer
``close``           close the connection without answering
``close-mid-stream``  send half the tokens, then close the connection
``stall-mid-stream``  send half the tokens, then go silent (connection open)
``garbage``         answer bytes that are not HTTP
``truncated``       a body shorter than its Content-Length, then close
``wrong-length``    a body longer than its Content-Length
``bad-chunk``       a chunked body with a chunk size that is not hex
``endless-chunk``   a chunk that never ends (the backend stalls inside it)
``cut-mid-chunk``   a streamed answer whose connection closes inside a chunk
``chunked-extra``   a complete chunked answer, then bytes nobody asked for
``early-hints``     a ``103 Early Hints`` head, then the answer, in one write
``close-delimited``  a streamed answer with neither Content-Length nor chunks:
                    its end is the close
``two-responses``   a whole answer, then a second one in the same write
``204-then-response``  a ``204 No Content``, then a second answer in the same write
``chunked-then-response``  a whole chunked answer, then a second one
``connection-named``  an answer whose ``Connection`` header names another of its
                    headers (hop-by-hop: a proxy must drop it)
``unhealthy``       ``/health`` answers 503 (set at run time)
``model-flood``     every ``/v1/models`` lists 5,000 models never listed before
                    (set at run time)
==================  =========================================================

``X-Mock-Raw: BASE64`` on a request makes the answer exactly those bytes (and
``X-Mock-Raw-Close: 1`` closes the connection after them): how tests try the
router against framings no fault mode names. Both headers, and the fault modes
that answer before any token (all but the mid-stream ones), work on any path and
method, not only on the completion endpoints.

Timing per request can be overridden with ``X-Mock-TTFT`` and
``X-Mock-Token-Delay`` (seconds), and for all requests at run time by
``POST /mock/settings`` with ``{"ttft": S, "token_delay": S}``.
``GET /mock/stats`` reports what the simulator saw, including streams the
client (the router) cut off: that is how tests see a hang-up reach the backend.

Run it as ``python -m lmproxy.mock --port 8100 --model Qwen3-32B``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import itertools
import sys
import time
from typing import Any

import httptools
import msgspec

from lmproxy.config import ServiceSpec
from lmproxy.system import raise_open_file_limit

FAULTS = (
    "none",
    "500",
    "503",
    "429",
    "hang",
    "close",
    "close-mid-stream",
    "stall-mid-stream",
    "garbage",
    "truncated",
    "wrong-length",
    "bad-chunk",
    "endless-chunk",
    "cut-mid-chunk",
    "chunked-extra",
    "early-hints",
    "close-delimited",
    "two-responses",
    "204-then-response",
    "chunked-then-response",
    "connection-named",
    "unhealthy",
    "model-flood",
)
SECOND_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Second: yes\r\n\r\nSECOND"
FLOOD_MODELS = 5000
WORDS = (
    "The quick brown fox jumps over the lazy dog while the router streams "
    "every token as soon as the backend produces it"
).split(" ")
CREATED = 1705312200
HIGH_WATER = 64 * 1024
BATCH_EVENTS = 64  # events per write when there is no delay between tokens

_encode = msgspec.json.Encoder().encode


class _Body(msgspec.Struct):
    model: str | None = None
    stream: bool | None = False
    max_tokens: int | None = None
    input: Any = None
    messages: msgspec.Raw = msgspec.Raw(b"")
    prompt: msgspec.Raw = msgspec.Raw(b"")


_decode_body = msgspec.json.Decoder(_Body).decode


class Engine:
    """The simulated engine's capacity, so that where a request goes shows in latency.

    - a bounded batch: at most ``max_batch`` sequences generate at once, the rest
      wait in arrival order (0: unbounded);
    - decoding slows as the batch grows: each token takes
      ``token_delay * (1 + batch_slowdown * (sequences - 1))``;
    - prefill costs ``prefill_per_token`` seconds per prompt token (about 4 bytes),
      except for the leading part found in the prefix cache: the last
      ``cache_blocks`` prompt blocks of 128 bytes it saw, least recently used
      evicted first.
    """

    BLOCK_BYTES = 128
    BYTES_PER_TOKEN = 4

    def __init__(
        self,
        max_batch: int = 0,
        batch_slowdown: float = 0.0,
        prefill_per_token_s: float = 0.0,
        cache_blocks: int = 0,
    ) -> None:
        self.max_batch = max_batch
        self.batch_slowdown = batch_slowdown
        self.prefill_per_token_s = prefill_per_token_s
        self.cache_blocks = cache_blocks
        self.active = 0
        self.peak_active = 0  # the most requests it ever had under way at once
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.cache: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.prompt_tokens = 0
        self.cached_tokens = 0

    async def admit(self) -> None:
        """Wait for a place in the batch."""
        if self.max_batch and self.active >= self.max_batch:
            waiter = asyncio.get_running_loop().create_future()
            self.waiting.append(waiter)
            try:
                await waiter  # the finishing sequence hands its place over
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.release()  # handed a place just as the client left
                elif waiter in self.waiting:
                    self.waiting.remove(waiter)
                raise
        else:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)

    def release(self) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place passes on; active stays the same
                return
        self.active -= 1

    def prefill(self, prompt: bytes) -> tuple[int, int, float]:
        """(prompt tokens, of which cached, prefill seconds), and remember the prompt."""
        tokens = max(1, len(prompt) // self.BYTES_PER_TOKEN)
        cached = 0
        if self.cache_blocks:
            hashes = []
            h = 0
            size = self.BLOCK_BYTES
            for start in range(0, len(prompt) - size + 1, size):
                h = hash((h, prompt[start : start + size]))
                hashes.append(h)
            matched = 0
            for h in hashes:
                if h not in self.cache:
                    break
                matched += 1
            for h in hashes:
                self.cache[h] = None
                self.cache.move_to_end(h)
            while len(self.cache) > self.cache_blocks:
                self.cache.popitem(last=False)
            cached = min(tokens, matched * size // self.BYTES_PER_TOKEN)
        self.prompt_tokens += tokens
        self.cached_tokens += cached
        return tokens, cached, (tokens - cached) * self.prefill_per_token_s

    def token_delay(self, base_s: float) -> float:
        return base_s * (1 + self.batch_slowdown * max(0, self.active - 1))


class MockState:
    """Settings and counters of one simulated backend."""

    def __init__(
        self,
        name: str,
        models: list[str],
        ttft_s: float = 0.0,
        token_delay_s: float = 0.0,
        tokens: int = 16,
        fault: str = "none",
        v1_models: bool = True,
        engine: Engine | None = None,
    ) -> None:
        self.name = name
        self.v1_models = v1_models
        self.engine = engine or Engine()
        self.models = models
        self.ttft_s = ttft_s
        self.token_delay_s = token_delay_s
        self.tokens = tokens
        self.fault = fault
        self.ids = itertools.count(1)
        self.requests = 0
        self.completed = 0
        self.streams_started = 0
        self.streams_completed = 0
        self.client_disconnects = 0  # a response the client stopped before its end
        self.last_disconnect_at = 0.0
        self.open_connections = 0
        self.total_connections = 0
        self.last_headers: dict[str, str] = {}
        self.last_body = b""
        self.paths: list[str] = []

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fault": self.fault,
            "requests": self.requests,
            "completed": self.completed,
            "streams_started": self.streams_started,
            "streams_completed": self.streams_completed,
            "client_disconnects": self.client_disconnects,
            "last_disconnect_at": self.last_disconnect_at,
            "open_connections": self.open_connections,
            "total_connections": self.total_connections,
            "last_headers": self.last_headers,
            "paths": self.paths[-50:],
            "active": self.engine.active,
            "peak_active": self.engine.peak_active,
            "waiting": len(self.engine.waiting),
            "prompt_tokens": self.engine.prompt_tokens,
            "cached_tokens": self.engine.cached_tokens,
        }


def _json(status: int, payload: Any, extra: bytes = b"") -> bytes:
    body = _encode(payload)
    return b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        len(body),
        extra,
        body,
    )


class MockConnection(asyncio.Protocol):
    def __init__(self, state: MockState) -> None:
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.task: asyncio.Task[None] | None = None
        self.responding = False  # a response is under way and not finished
        self.closed = False
        self.queue: list[tuple[bytes, bytes, dict[bytes, bytes], bytes]] = []
        self.writable = asyncio.Event()
        self.writable.set()

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(HIGH_WATER)  # type: ignore[union-attr]
        self.state.open_connections += 1
        self.state.total_connections += 1

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(_json(400, {"error": "bad request"}))
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state.open_connections -= 1
        if self.responding:
            self.state.client_disconnects += 1
            self.state.last_disconnect_at = time.time()
        if self.task is not None:
            self.task.cancel()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # --- httptools callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        request = (self.parser.get_method(), self.url, self.headers, b"".join(self.body))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._serve(request))
        else:
            self.queue.append(request)

    # --- serving ----------------------------------------------------------------------

    async def _serve(self, request: tuple[bytes, bytes, dict[bytes, bytes], bytes]) -> None:
        while True:
            self.responding = True
            await self._handle(*request)
            self.responding = False
            if not self.queue or self.closed:
                break
            request = self.queue.pop(0)
        self.task = None

    def _write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def _handle(
        self, method: bytes, url: bytes, headers: dict[bytes, bytes], body: bytes
    ) -> None:
        state = self.state
        path = url.split(b"?", 1)[0].decode("latin-1")
        if not path.startswith("/mock/"):  # the test's own questions are not traffic
            state.requests += 1
            state.paths.append(path)
            state.last_headers = {
                k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()
            }
            state.last_body = body
        if path == "/health":
            if state.fault == "unhealthy":
                self._write(_json(503, {"status": "unhealthy"}))
            else:
                self._write(_json(200, {"status": "healthy"}))
            state.completed += 1
            return
        if path == "/v1/models" and not state.v1_models:
            self._write(_json(404, {"detail": "Not Found"}))
            return
        if path in ("/models", "/v1/models"):
            models = state.models
            if state.fault == "model-flood":
                first = state.requests * FLOOD_MODELS
                models = [f"flood-{i}" for i in range(first, first + FLOOD_MODELS)]
            data = [
                {"id": m, "object": "model", "created": CREATED, "owned_by": state.name}
                for m in models
            ]
            self._write(_json(200, {"object": "list", "data": data}))
            state.completed += 1
            return
        if path == "/mock/stats":
            self._write(_json(200, state.stats()))
            return
        if path == "/mock/settings":
            try:
                settings = msgspec.json.decode(body, type=dict[str, float])
                state.ttft_s = settings.get("ttft", state.ttft_s)
                state.token_delay_s = settings.get("token_delay", state.token_delay_s)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._write(_json(400, {"error": f"settings: {exc}"}))
                return
            self._write(_json(200, {"ttft": state.ttft_s, "token_delay": state.token_delay_s}))
            return
        if path == "/mock/fault":
            try:
                fault = msgspec.json.decode(body)["fault"]
            except (msgspec.DecodeError, KeyError, TypeError):
                fault = None
            if fault not in FAULTS:
                self._write(_json(400, {"error": f"fault must be one of {', '.join(FAULTS)}"}))
                return
            state.fault = fault
            self._write(_json(200, {"fault": fault}))
            return
        kind = {
            "/v1/chat/completions": "chat",
            "/chat/completions": "chat",
            "/v1/completions": "text",
            "/completions": "text",
            "/v1/embeddings": "embedding",
            "/embeddings": "embedding",
        }.get(path)
        raw = headers.get(b"x-mock-raw")
        if raw is not None:
            self._write(base64.b64decode(raw))
            if headers.get(b"x-mock-raw-close"):
                self._close()
            return
        asked = headers.get(b"x-mock-fault", b"").decode()
        if kind is None or method not in (b"POST", b"HEAD"):
            # A fault asked for by header applies on any path and method (a HEAD to
            # some /v1/ path, say); otherwise there is nothing here.
            if not (asked and await self._fault_before_answer(asked)):
                self._write(_json(404, {"error": f"no route {method.decode()} {path}"}))
            return
        fault = asked or state.fault
        if await self._fault_before_answer(fault):
            return
        try:
            request = _decode_body(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._write(_json(400, {"error": f"invalid body: {exc}"}))
            return
        model = request.model or (state.models[0] if state.models else "mock")
        if model not in state.models:
            self._write(_json(404, {"error": f"model {model!r} is not served here"}))
            return
        ttft = float(headers.get(b"x-mock-ttft", b"") or state.ttft_s)
        delay = float(headers.get(b"x-mock-token-delay", b"") or state.token_delay_s)
        if kind == "embedding":
            await asyncio.sleep(ttft)
            prompt_tokens = max(1, len(body) // Engine.BYTES_PER_TOKEN)
            self._write(_json(200, _embeddings(model, request.input, prompt_tokens)))
            state.completed += 1
            return
        n = request.max_tokens if request.max_tokens else state.tokens
        engine = state.engine
        if request.stream:
            state.streams_started += 1
        await engine.admit()
        try:
            prompt = bytes(request.messages) or bytes(request.prompt)
            prompt_tokens, cached, prefill_s = engine.prefill(prompt)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n,
                "total_tokens": prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            await asyncio.sleep(ttft + prefill_s)
            if request.stream:
                await self._stream(kind, model, n, usage, delay, fault)
                return
            if delay:
                for _ in range(n):
                    await asyncio.sleep(engine.token_delay(delay))
            payload = _completion(kind, state, model, _text(n), usage)
            self._write(_json(200, payload, b"X-Mock-Server: %s\r\n" % state.name.encode()))
            state.completed += 1
        finally:
            engine.release()

    async def _fault_before_answer(self, fault: str) -> bool:
        if fault in ("500", "503", "429"):
            status = int(fault)
            extra = b"Retry-After: 1\r\n" if status == 429 else b""
            self._write(_json(status, {"error": f"simulated {status}"}, extra))
            return True
        if fault == "hang":
            await asyncio.Event().wait()  # until the connection is lost
            return True
        if fault == "close":
            self._close()
            return True
        if fault == "garbage":
            self._write(b"HTTP/1.1 2OO NOT\x00HTTP\r\n\x01\x02garbage\r\n\r\n")
            self._close()
            return True
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        if fault == "truncated":  # promises 1000 bytes, sends 10, closes
            self._write(head + b"Content-Length: 1000\r\n\r\n" + b'{"id": "tr')
            self._close()
            return True
        if fault == "wrong-length":  # sends more body than its Content-Length says
            self._write(head + b"Content-Length: 5\r\n\r\n" + b'{"id": "too long"}')
            return True
        if fault == "bad-chunk":  # a chunk size that is not hex
            self._write(head + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\nZZ\r\nxx\r\n')
            return True
        if fault == "endless-chunk":  # announces a chunk, sends part of it, stalls
            self._write(head + b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n" + b'{"id": "en')
            await asyncio.Event().wait()
            return True
        sse = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        event = b'data: {"choices": [{"index": 0, "delta": {"content": "tok "}}]}\n\n'
        if fault == "cut-mid-chunk":  # two whole chunks, then half of a third, then close
            whole = b"%x\r\n%s\r\n" % (len(event), event)
            self._write(sse + b"Transfer-Encoding: chunked\r\n\r\n" + whole * 2)
            await asyncio.sleep(0.05)
            self._write(b"%x\r\n%s" % (len(event), event[:10]))
            self._close()
            return True
        if fault == "chunked-extra":  # a whole chunked answer followed by junk
            body = b'{"id": "chunked", "object": "chat.completion"}'
            self._write(
                head
                + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
                + b"JUNK AFTER THE ANSWER"
            )
            return True
        if fault == "early-hints":
            body = b'{"id": "hinted", "object": "chat.completion"}'
            self._write(
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                + head
                + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            return True
        if fault == "two-responses":
            self._write(head + b"Content-Length: 5\r\n\r\nhello" + SECOND_RESPONSE)
            return True
        if fault == "204-then-response":
            self._write(b"HTTP/1.1 204 No Content\r\n\r\n" + SECOND_RESPONSE)
            return True
        if fault == "chunked-then-response":
            self._write(
                head
                + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                + SECOND_RESPONSE
            )
            return True
        if fault == "connection-named":
            self._write(
                head + b"Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nX-Kept: yes\r\n"
                b"Content-Length: 2\r\n\r\n{}"
            )
            return True
        if fault == "close-delimited":  # events over time; the close ends the body
            self._write(sse + b"Connection: close\r\n\r\n" + event)
            for _ in range(3):
                await asyncio.sleep(0.01)
                self._write(event)
            self._write(b"data: [DONE]\n\n")
            self._close()
            return True
        return False

    async def _stream(
        self,
        kind: str,
        model: str,
        n: int,
        usage: dict[str, Any],
        delay: float,
        fault: str,
    ) -> None:
        state = self.state
        engine = state.engine
        cid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{state.name}-{next(state.ids)}"
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        created = int(time.time())
        self._write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"X-Mock-Server: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % state.name.encode()
        )
        cut_at = n // 2 if fault in ("close-mid-stream", "stall-mid-stream") else -1
        pending: list[bytes] = []
        if kind == "chat":
            role = {"delta": {"role": "assistant", "content": ""}}
            pending.append(_event(cid, obj, created, model, role))
        for i in range(n):
            if i == cut_at:
                self._flush(pending)
                if fault == "close-mid-stream":
                    self._close()  # FIN after what was sent, as a killed process does
                    return
                await asyncio.Event().wait()
            word = WORDS[i % len(WORDS)] + " "
            choice = {"delta": {"content": word}} if kind == "chat" else {"text": word}
            pending.append(_event(cid, obj, created, model, choice))
            if delay:
                self._flush(pending)
                await asyncio.sleep(engine.token_delay(delay))
            elif len(pending) >= BATCH_EVENTS:
                self._flush(pending)
            if not self.writable.is_set():  # the reader is slow: wait as a real server does
                await self.writable.wait()
            if self.closed:
                return
        final: dict[str, Any] = {
            "id": cid,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "length" if n else "stop",
                    **({"delta": {}} if kind == "chat" else {"text": ""}),
                }
            ],
            "usage": usage,
        }
        pending.append(b"data: " + _encode(final) + b"\n\n")
        pending.append(b"data: [DONE]\n\n")
        self._flush(pending)
        self._write(b"0\r\n\r\n")
        state.streams_completed += 1
        state.completed += 1

    def _flush(self, pending: list[bytes]) -> None:
        if pending:
            data = b"".join(pending)
            pending.clear()
            self._write(b"%x\r\n%s\r\n" % (len(data), data))


def _event(cid: str, obj: str, created: int, model: str, choice: dict[str, Any]) -> bytes:
    chunk = {
        "id": cid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [{"index": 0, **choice, "finish_reason": None}],
    }
    return b"data: " + _encode(chunk) + b"\n\n"


def _text(n: int) -> str:
    return "".join(WORDS[i % len(WORDS)] + " " for i in range(n))


def _completion(
    kind: str, state: MockState, model: str, text: str, usage: dict[str, Any]
) -> dict[str, Any]:
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length",
        }
        obj, prefix = "chat.completion", "chatcmpl"
    else:
        choice = {"index": 0, "text": text, "finish_reason": "length"}
        obj, prefix = "text_completion", "cmpl"
    return {
        "id": f"{prefix}-{state.name}-{next(state.ids)}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def _embeddings(model: str, inputs: Any, prompt_tokens: int) -> dict[str, Any]:
    items = (
        inputs
        if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int)
        else [inputs]
    )
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": [((hash(str(item)) >> k) % 1000) / 1000 for k in range(8)],
        }
        for i, item in enumerate(items)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


async def start_mock(state: MockState, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: MockConnection(state), host, port, backlog=4096)


DEMO_BACKENDS = (("demo-qwen3-32b", "Qwen3-32B"), ("demo-9g-8b-thinking", "9g_8b_thinking"))


async def start_demo_backends() -> tuple[list[asyncio.Server], list[ServiceSpec]]:
    """Two simulated backends on free loopback ports, paced so streaming is visible."""
    servers, specs = [], []
    for name, model in DEMO_BACKENDS:
        state = MockState(name, [model], ttft_s=0.05, token_delay_s=0.02, tokens=32)
        server = await start_mock(state)
        port = server.sockets[0].getsockname()[1]
        servers.append(server)
        specs.append(ServiceSpec(url=f"http://127.0.0.1:{port}", name=name))
    return servers, specs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmproxy.mock",
        description="A simulated OpenAI-compatible LLM backend with fault modes, for tests, "
        "demos and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8100, help="port; 0 picks one (default: 8100)")
    parser.add_argument("--name", default="", help="name in responses (default: mock-PORT)")
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="a model to serve; repeatable (default: Qwen3-32B)",
    )
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds to first token")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument(
        "--tokens", type=int, default=16, help="tokens per answer without max_tokens (default 16)"
    )
    parser.add_argument("--fault", choices=FAULTS, default="none", help="fault mode at start")
    g = parser.add_argument_group("engine capacity (see Engine)")
    g.add_argument(
        "--max-batch",
        type=int,
        default=0,
        help="sequences generated at once; more wait (default 0: unbounded)",
    )
    g.add_argument(
        "--batch-slowdown",
        type=float,
        default=0.0,
        help="extra time per token per additional sequence in the batch, as a "
        "fraction of --token-delay (default 0)",
    )
    g.add_argument(
        "--prefill-per-token",
        type=float,
        default=0.0,
        help="seconds of prefill per uncached prompt token (~4 bytes) (default 0)",
    )
    g.add_argument(
        "--prefix-cache-blocks",
        type=int,
        default=0,
        help="128-byte prompt blocks kept in the prefix cache (default 0: none)",
    )
    parser.add_argument(
        "--no-v1-models",
        action="store_true",
        help="answer 404 on /v1/models (only /models), like older InfiniLM servers",
    )
    args = parser.parse_args(argv)

    raise_open_file_limit()

    async def run() -> None:
        state = MockState(
            args.name,
            args.models or ["Qwen3-32B"],
            args.ttft,
            args.token_delay,
            args.tokens,
            args.fault,
            v1_models=not args.no_v1_models,
            engine=Engine(
                args.max_batch,
                args.batch_slowdown,
                args.prefill_per_token,
                args.prefix_cache_blocks,
            ),
        )
        server = await start_mock(state, args.host, args.port)
        port = server.sockets[0].getsockname()[1]
        state.name = state.name or f"mock-{port}"
        print(f"mock backend {state.name} listening on http://{args.host}:{port}", flush=True)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
