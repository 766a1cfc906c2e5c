"""The simulator's HTTP server: one asyncio Protocol per connection, httptools parsing,
answers built from ``shapes``, faults from ``faults``, timing from the engine."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Awaitable, Callable
from ssl import SSLContext
from typing import Any

import httptools
import msgspec

from lmproxy.sim.engine import Engine
from lmproxy.sim.faults import FAULTS, FLOOD_MODELS, answer_with_fault
from lmproxy.sim.metrics import engine_metrics, flood_metrics
from lmproxy.sim.shapes import (
    CREATED,
    WORDS,
    completion,
    embeddings,
    encode,
    event,
    json_answer,
    prompt_count,
    rendered,
    text,
)
from lmproxy.sim.state import MockState

HIGH_WATER = 64 * 1024
BATCH_EVENTS = 64  # events per write when there is no delay between tokens
DEEP_LEVELS = 1000  # the models-deep fault's nesting: past Python's recursion limit
MAX_N = 128  # OpenAI's bound on a request's n
MAX_CHOICES = 2048  # n times the prompts of a list prompt: bounds one answer's size


class _Body(msgspec.Struct):
    model: str | None = None
    stream: bool | None = False
    max_tokens: int | None = None
    # What chat clients send now, and sglang-router sends in max_tokens' place; vLLM
    # takes it first.
    max_completion_tokens: int | None = None
    n: int | None = None  # choices per prompt
    encoding_format: str | None = None  # an embedding's: "float" or "base64"
    input: Any = None
    messages: msgspec.Raw = msgspec.Raw(b"")
    prompt: msgspec.Raw = msgspec.Raw(b"")
    # Disaggregation (sim/pd.py): what a router adds for a prefill or a decode.
    kv_transfer_params: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    stream_options: Any = None


_decode_body = msgspec.json.Decoder(_Body).decode


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
            self.write(json_answer(400, {"error": "bad request"}))
            self.close()

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
        self.state.write_pauses += 1
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

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def _handle(
        self, method: bytes, url: bytes, headers: dict[bytes, bytes], body: bytes
    ) -> None:
        path = url.split(b"?", 1)[0].decode("latin-1")
        if not path.startswith("/mock/"):  # the test's own questions are not traffic
            self._record(path, headers, body)
        local = _LOCAL.get(path)
        if local is not None:
            await local(self, body)
            return
        if path.startswith(("/mock/kv/", "/mock/room/")) and self.state.pd is not None:
            await self._disaggregation(path, url)
            return
        raw = headers.get(b"x-mock-raw")
        if raw is not None:
            self.write(base64.b64decode(raw))
            if headers.get(b"x-mock-raw-close"):
                self.close()
            return
        asked = headers.get(b"x-mock-fault", b"").decode()
        kind = _KINDS.get(path)
        if kind is None or method not in (b"POST", b"HEAD"):
            await self._unrouted(method, path, asked)
            return
        fault = asked or self.state.fault
        if not await answer_with_fault(self, fault):
            await self._generate(kind, headers, body, fault)

    async def _unrouted(self, method: bytes, path: str, asked: str) -> None:
        # A fault asked for by header applies on any path and method (a HEAD to some
        # /v1/ path, say); otherwise there is nothing here.
        if not (asked and await answer_with_fault(self, asked)):
            self.write(json_answer(404, {"error": f"no route {method.decode()} {path}"}))

    def _record(self, path: str, headers: dict[bytes, bytes], body: bytes) -> None:
        """What /mock/stats shows of the traffic: counts, paths, the last request."""
        state = self.state
        state.requests += 1
        state.paths.append(path)
        state.last_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()}
        state.last_body = body
        if body:
            state.bodies.append(body)

    # --- the simulator's own endpoints (_LOCAL) ---------------------------------------

    async def _health(self, body: bytes) -> None:
        state = self.state
        if state.health_delay_s:
            await asyncio.sleep(state.health_delay_s)
        if state.fault == "unhealthy":
            self.write(json_answer(503, {"status": "unhealthy"}))
        else:
            self.write(json_answer(200, {"status": "healthy"}))
        state.completed += 1

    async def _v1_models(self, body: bytes) -> None:
        if not self.state.v1_models:
            self.write(json_answer(404, {"detail": "Not Found"}))
            return
        await self._models(body)

    async def _models(self, body: bytes) -> None:
        state = self.state
        models = state.models
        if state.fault == "model-flood":
            first = state.requests * FLOOD_MODELS
            models = [f"flood-{i}" for i in range(first, first + FLOOD_MODELS)]
        data = [
            {"id": m, "object": "model", "created": CREATED, "owned_by": state.name} for m in models
        ]
        listing = {"object": "list", "data": data}
        if state.fault == "models-deep":  # spliced in: an encoder refuses such depth
            deep = b"[" * DEEP_LEVELS + b"]" * DEEP_LEVELS
            body = msgspec.json.encode(listing)[:-1] + b',"extra":' + deep + b"}"
            self.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        else:
            self.write(json_answer(200, listing))
        state.completed += 1

    async def _metrics(self, body: bytes) -> None:
        state = self.state
        if state.metrics == "none":
            self.write(json_answer(404, {"detail": "Not Found"}))
            return
        body = flood_metrics() if state.fault == "metrics-flood" else engine_metrics(state)
        self.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    async def _stats(self, body: bytes) -> None:
        self.write(json_answer(200, self.state.stats()))

    async def _settings(self, body: bytes) -> None:
        state = self.state
        try:
            settings = msgspec.json.decode(body, type=dict[str, float])
            state.ttft_s = settings.get("ttft", state.ttft_s)
            state.token_delay_s = settings.get("token_delay", state.token_delay_s)
            state.health_delay_s = settings.get("health_delay", state.health_delay_s)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.write(json_answer(400, {"error": f"settings: {exc}"}))
            return
        now = {
            "ttft": state.ttft_s,
            "token_delay": state.token_delay_s,
            "health_delay": state.health_delay_s,
        }
        self.write(json_answer(200, now))

    async def _set_fault(self, body: bytes) -> None:
        try:
            fault = msgspec.json.decode(body)["fault"]
        except (msgspec.DecodeError, KeyError, TypeError):
            fault = None
        if fault not in FAULTS:
            self.write(json_answer(400, {"error": f"fault must be one of {', '.join(FAULTS)}"}))
            return
        self.state.fault = fault
        self.write(json_answer(200, {"fault": fault}))

    # --- generation: chat, completions, embeddings, renders --------------------------

    async def _generate(
        self, kind: str, headers: dict[bytes, bytes], body: bytes, fault: str
    ) -> None:
        state = self.state
        checked = self._checked(kind, body)
        if checked is None:
            return
        request, model, choices = checked
        n = request.max_completion_tokens or request.max_tokens or state.tokens
        step = await self._step(kind, request)
        if step is None:
            return
        if step == "prefill":
            n = 1  # the first token; the decode generates the rest
        if kind.startswith("render"):  # no generation: the engine's batch is not involved
            self.write(json_answer(200, _render(kind, model, request, n, next(state.ids))))
            state.completed += 1
            return
        ttft = float(headers.get(b"x-mock-ttft", b"") or state.ttft_s)
        delay = float(headers.get(b"x-mock-token-delay", b"") or state.token_delay_s)
        if kind == "embedding":
            await self._embed(request, model, body, ttft)
            return
        await self._complete(kind, request, model, n, choices, step, ttft, delay, fault)

    def _checked(self, kind: str, body: bytes) -> tuple[_Body, str, int] | None:
        """The request, its model and its count of choices; None once refused."""
        state = self.state
        try:
            request = _decode_body(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.write(json_answer(400, {"error": f"invalid body: {exc}"}))
            return None
        model = request.model or (state.models[0] if state.models else "mock")
        if model not in state.models:
            self.write(json_answer(404, {"error": f"model {model!r} is not served here"}))
            return None
        per_prompt = 1 if request.n is None else request.n
        if not 1 <= per_prompt <= MAX_N:
            self.write(json_answer(400, {"error": f"n must be 1 to {MAX_N}, not {request.n}"}))
            return None
        choices = per_prompt
        if kind == "text":
            choices *= prompt_count(bytes(request.prompt))
        if choices > MAX_CHOICES:
            self.write(
                json_answer(
                    400, {"error": f"n times the prompts is {choices}: at most {MAX_CHOICES}"}
                )
            )
            return None
        return request, model, choices

    async def _step(self, kind: str, request: _Body) -> str | None:
        """The request's step (``_pd_step``), "whole" off disaggregation; None once
        refused."""
        pd = self.state.pd
        if pd is None or kind not in ("chat", "text"):
            return "whole"
        step, why = await self._pd_step(request)
        if why is not None:
            pd.refused += 1
            self.write(json_answer(400, {"error": why}))
            return None
        return step

    async def _embed(self, request: _Body, model: str, body: bytes, ttft: float) -> None:
        if request.encoding_format not in (None, "float", "base64"):
            self.write(
                json_answer(
                    400,
                    {
                        "error": f"encoding_format must be float or base64, "
                        f"not {request.encoding_format!r}"
                    },
                )
            )
            return
        await asyncio.sleep(ttft)
        prompt_tokens = max(1, len(body) // Engine.BYTES_PER_TOKEN)
        as_base64 = request.encoding_format == "base64"
        self.write(json_answer(200, embeddings(model, request.input, prompt_tokens, as_base64)))
        self.state.completed += 1

    async def _complete(
        self,
        kind: str,
        request: _Body,
        model: str,
        n: int,
        choices: int,
        step: str,
        ttft: float,
        delay: float,
        fault: str,
    ) -> None:
        """A chat or text completion, in a place of the engine's batch."""
        state = self.state
        engine = state.engine
        if request.stream:
            state.streams_started += 1
        await engine.admit()
        try:
            prompt = bytes(request.messages) or bytes(request.prompt)
            prompt_tokens, cached, prefill_s = engine.prefill(prompt)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n * choices,
                "total_tokens": prompt_tokens + n * choices,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            if step != "decode":  # a decode has the KV cache: the prompt's time was spent
                await asyncio.sleep(ttft + prefill_s)
            if step != "whole" and self._disaggregated(step, kind, request, model, n, usage):
                return
            if request.stream:
                await self._stream(
                    kind, model, n, choices, self._usage_shown(request, usage), delay, fault
                )
                return
            if delay:
                for _ in range(n):
                    await asyncio.sleep(engine.token_delay(delay))
            payload = completion(kind, state.name, next(state.ids), model, text(n), usage, choices)
            self.write(json_answer(200, payload, b"X-Mock-Server: %s\r\n" % state.name.encode()))
            state.completed += 1
        finally:
            engine.release()

    def _disaggregated(
        self, step: str, kind: str, request: _Body, model: str, n: int, usage: dict[str, Any]
    ) -> bool:
        """A prefill's or a decode's own part, once the prompt is prefilled; whether it
        answered the request (a vLLM prefill answers with its KV blocks' handle)."""
        pd = self.state.pd
        assert pd is not None
        if step == "decode":
            pd.decoded += 1
            return False
        pd.prefilled += 1
        if pd.mode == "sglang":
            for room in pd.rooms_of(_fields(request)) or []:
                pd.room(room).set()
            return False
        state = self.state
        payload = completion(kind, state.name, next(state.ids), model, text(n), usage)
        payload["kv_transfer_params"] = pd.hold_blocks(usage["prompt_tokens"])
        self.write(json_answer(200, payload, b"X-Mock-Server: %s\r\n" % state.name.encode()))
        state.completed += 1
        return True

    def _usage_shown(self, request: _Body, usage: dict[str, Any]) -> dict[str, Any]:
        """The usage a stream ends with; none (empty) if the simulator shows it only
        when asked (``stream_usage``) and the request did not ask."""
        options = request.stream_options
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        if self.state.stream_usage == "asked" and not wants_usage:
            return {}
        return usage

    async def _stream(
        self,
        kind: str,
        model: str,
        n: int,
        choices: int,
        usage: dict[str, Any],
        delay: float,
        fault: str,
    ) -> None:
        """``n`` tokens for each of ``choices`` choices, interleaved by token as OpenAI
        sends them; then each choice's finish, and ``usage`` (unless empty) in a last
        chunk of its own with no choices, as OpenAI's ``include_usage`` has it."""
        state = self.state
        engine = state.engine
        events = _Events(kind, f"{state.name}-{next(state.ids)}", model, choices)
        self.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"X-Mock-Server: %s\r\nTransfer-Encoding: chunked\r\n\r\n" % state.name.encode()
        )
        cut_at = n // 2 if fault in ("close-mid-stream", "stall-mid-stream") else -1
        pending = events.pending
        if events.chat:
            events.add({"delta": {"role": "assistant", "content": ""}})
        for i in range(n):
            if i == cut_at:
                await self._cut(pending, fault)
                return
            word = WORDS[i % len(WORDS)] + " "
            events.add({"delta": {"content": word}} if events.chat else {"text": word})
            if delay:
                self._flush(pending)
                await asyncio.sleep(engine.token_delay(delay))
            elif len(pending) >= BATCH_EVENTS:
                self._flush(pending)
            if not self.writable.is_set():  # the reader is slow: wait as a real server does
                await self.writable.wait()
            if self.closed:
                return
        # The last events and the end of the body in one write: a client that closes at
        # [DONE] (the openai SDK does) then never races the router for the last chunk.
        data = events.last(n, usage)
        self.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
        state.streams_completed += 1
        state.completed += 1

    async def _cut(self, pending: list[bytes], fault: str) -> None:
        """A stream's fault, halfway: what was made so far is sent, then the connection
        is closed (``close-mid-stream``) or nothing more is ever sent."""
        self._flush(pending)
        if fault == "close-mid-stream":
            self.close()  # FIN after what was sent, as a killed process does
            return
        await asyncio.Event().wait()

    async def _pd_step(self, request: _Body) -> tuple[str, str | None]:
        """Which step this request is on a prefill or decode service ("prefill",
        "decode", or "whole"), and why it is refused (None: it is not)."""
        pd = self.state.pd
        assert pd is not None
        if pd.role == "decode":
            if pd.mode == "vllm":
                why = await pd.fetch_kv(request.kv_transfer_params)
            else:
                why = await pd.wait_rooms(_fields(request))
            return "decode", why
        if pd.mode == "vllm":
            params = request.kv_transfer_params
            remote = isinstance(params, dict) and params.get("do_remote_decode")
            return ("prefill" if remote else "whole"), None
        if pd.rooms_of(_fields(request)) is None:
            return "prefill", (
                "bootstrap_room is required on a prefill service (one, or one per sequence): "
                "send through the router"
            )
        return "prefill", None

    async def _disaggregation(self, path: str, url: bytes) -> None:
        """A decode asking this prefill: for its KV blocks (vLLM), or whether a room
        was prefilled (SGLang, waiting up to ``?wait=S``)."""
        pd = self.state.pd
        assert pd is not None
        self.responding = False  # a peer's question, not traffic: its hang-up is not counted
        parts = path.split("/")
        if parts[2] == "kv" and len(parts) == 5:
            found = pd.take_blocks(parts[3], parts[4])
            self.write(json_answer(200 if found else 404, {"taken": found}))
            return
        try:
            room = int(parts[3])
            query = url.partition(b"?")[2].decode("latin-1")
            wait = float(query.partition("wait=")[2] or 0) if "wait=" in query else 0.0
        except (IndexError, ValueError):
            self.write(json_answer(400, {"error": "GET /mock/room/ROOM[?wait=S]"}))
            return
        event = pd.room(room)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), min(wait, 60.0))
        self.write(json_answer(200 if event.is_set() else 404, {"seen": event.is_set()}))

    def _flush(self, pending: list[bytes]) -> None:
        if pending:
            data = b"".join(pending)
            pending.clear()
            self.write(b"%x\r\n%s\r\n" % (len(data), data))


class _Events:
    """The events of one streamed completion, made up to be sent in batches."""

    __slots__ = ("chat", "choices", "cid", "created", "model", "obj", "pending")

    def __init__(self, kind: str, number: str, model: str, choices: int) -> None:
        self.chat = kind == "chat"
        self.cid = f"{'chatcmpl' if self.chat else 'cmpl'}-{number}"
        self.obj = "chat.completion.chunk" if self.chat else "text_completion"
        self.created = int(time.time())
        self.model = model
        self.choices = choices
        self.pending: list[bytes] = []

    def add(self, delta: dict[str, Any]) -> None:
        """One event per choice, each with ``delta`` (or a completion's text)."""
        for c in range(self.choices):
            self.pending.append(event(self.cid, self.obj, self.created, self.model, delta, c))

    def last(self, n: int, usage: dict[str, Any]) -> bytes:
        """What is pending, then each choice's finish, ``usage`` (unless empty) and
        [DONE], joined."""
        pending = self.pending
        final: dict[str, Any] = {
            "id": self.cid,
            "object": self.obj,
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": c,
                    "finish_reason": "length" if n else "stop",
                    **({"delta": {}} if self.chat else {"text": ""}),
                }
                for c in range(self.choices)
            ],
        }
        pending.append(b"data: " + encode(final) + b"\n\n")
        if usage:
            final["choices"] = []
            final["usage"] = usage
            pending.append(b"data: " + encode(final) + b"\n\n")
        pending.append(b"data: [DONE]\n\n")
        data = b"".join(pending)
        pending.clear()
        return data


# The simulator's own endpoints, answered before any fault or generation.
_LOCAL: dict[str, Callable[[MockConnection, bytes], Awaitable[None]]] = {
    "/health": MockConnection._health,
    "/models": MockConnection._models,
    "/v1/models": MockConnection._v1_models,
    "/metrics": MockConnection._metrics,
    "/mock/stats": MockConnection._stats,
    "/mock/settings": MockConnection._settings,
    "/mock/fault": MockConnection._set_fault,
}

# The generating endpoints, by the kind of answer they make.
_KINDS = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/completions": "text",
    "/completions": "text",
    "/v1/embeddings": "embedding",
    "/embeddings": "embedding",
    "/v1/chat/completions/render": "render-chat",
    "/v1/completions/render": "render-text",
}


def _fields(request: _Body) -> dict[str, Any]:
    return {
        "bootstrap_room": request.bootstrap_room,
        "bootstrap_host": request.bootstrap_host,
        "bootstrap_port": request.bootstrap_port,
    }


def _render(kind: str, model: str, request: _Body, n: int, number: int) -> Any:
    """vLLM's render answers: one ``GenerateRequest`` for a chat, a list of them (one per
    prompt) for a completion. The token ids are of the same bytes ``prefill`` caches."""
    if kind == "render-chat":
        return rendered(model, Engine.token_ids(bytes(request.messages)), n, f"render-{number}")
    prompts = [bytes(request.prompt)]
    try:
        decoded = msgspec.json.decode(prompts[0])
    except msgspec.DecodeError:
        decoded = None
    if isinstance(decoded, list) and decoded and all(isinstance(p, str) for p in decoded):
        prompts = [encode(p) for p in decoded]
    return [
        rendered(model, Engine.token_ids(p), n, f"render-{number}-{i}")
        for i, p in enumerate(prompts)
    ]


async def start_mock(
    state: MockState, host: str = "127.0.0.1", port: int = 0, ssl: SSLContext | None = None
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: MockConnection(state), host, port, backlog=4096, ssl=ssl
    )
