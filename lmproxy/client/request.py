"""The request edge: decode only what routing and validation need, keep the bytes.

The body is decoded once into a small msgspec Struct: ``model``, ``stream``, the
sampling fields the InfiniLM router validates, and the fields strategies key on.
Everything else (the messages themselves, tool schemas...) is skipped by the
decoder without being materialised; ``messages`` and ``prompt`` stay raw JSON.
The original bytes are what the backend receives.

Paths the router only forwards (not the OpenAI API's) are read leniently, for
their ``model`` alone (:func:`forwarded_head`); a multipart/form-data body (audio
transcriptions) is scanned in place for its ``model`` field (:func:`form_model`).
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from lmproxy.errors import Fault, ProxyError

_Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
_TopP = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
INT32_MAX = 2**31 - 1  # what backends accept for token counts
_MaxTokens = Annotated[int, msgspec.Meta(gt=0, le=INT32_MAX)]
_TopK = Annotated[int, msgspec.Meta(ge=-INT32_MAX, le=INT32_MAX)]
_RepetitionPenalty = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]

_ABSENT = msgspec.Raw(b"")


class RequestHead(msgspec.Struct, gc=False):
    """The fields of an OpenAI-style request body that the router reads."""

    model: str | None = None
    stream: bool | None = None
    temperature: _Temperature | None = None
    top_p: _TopP | None = None
    top_k: _TopK | None = None
    max_tokens: _MaxTokens | None = None
    repetition_penalty: _RepetitionPenalty | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    messages: msgspec.Raw = _ABSENT
    prompt: msgspec.Raw = _ABSENT


_decode_head = msgspec.json.Decoder(RequestHead).decode

CHAT_PATHS = frozenset({b"/v1/chat/completions", b"/chat/completions"})
COMPLETION_PATHS = frozenset({b"/v1/completions", b"/completions"})
# Paths whose streams carry a usage object when asked (stream_options.include_usage).
USAGE_PATHS = CHAT_PATHS | COMPLETION_PATHS
# Paths whose body must carry a model (or get the default one).
MODEL_PATHS = CHAT_PATHS | COMPLETION_PATHS | {b"/v1/embeddings", b"/embeddings"}


def find_header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` in a list of (lower-cased name, value)."""
    for key, value in headers:
        if key == name:
            return value
    return None


class RouteRequest:
    """What a strategy sees of a request: its model, its decoded head, its headers."""

    __slots__ = ("body", "head", "headers", "memo", "model", "path")

    def __init__(
        self,
        path: bytes,
        model: str | None,
        head: RequestHead | None,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.path = path
        self.model = model
        self.head = head
        self.body = body
        self.headers = headers
        self.memo: object = None  # scratch space for the strategy, between choose and on_start

    def header(self, name: bytes) -> bytes | None:
        """The value of header ``name`` (lower-case bytes), or None."""
        return find_header(self.headers, name)

    @property
    def stream(self) -> bool:
        return bool(self.head and self.head.stream)


_EMPTY_ARRAY = re.compile(rb"\[\s*\]\Z")
_NULL, _ARRAY = b"n["  # first bytes of a raw JSON null and array


def _is_null(raw: msgspec.Raw) -> bool:
    return len(raw) == 4 and bytes(raw) == b"null"


def _undecodable(exc: Exception) -> ProxyError:
    """The 400 for a body that msgspec could not decode as a request."""
    if isinstance(exc, msgspec.ValidationError):  # a DecodeError too: asked first
        return ProxyError(Fault.BAD_REQUEST, f"invalid request body: {exc}")
    if isinstance(exc, msgspec.DecodeError):
        return ProxyError(Fault.BAD_REQUEST, f"request body is not valid JSON: {exc}")
    if isinstance(exc, RecursionError):
        return ProxyError(Fault.BAD_REQUEST, "request body is nested too deeply")
    return ProxyError(Fault.BAD_REQUEST, "request body is not valid UTF-8")


def decode_head(path: bytes, body: bytes) -> RequestHead:
    """Decode and validate a JSON body; 400 with a message naming the field otherwise."""
    if not body:
        raise ProxyError(
            Fault.BAD_REQUEST, "request body is empty; send a JSON object with a 'model' field"
        )
    try:
        head = _decode_head(body)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise _undecodable(exc) from None
    if path in CHAT_PATHS:
        # A memoryview: the messages may be megabytes, and are never copied here.
        messages = memoryview(head.messages)
        # The raw value is valid JSON, so its first byte tells its type: "n" is null.
        first = messages[0] if messages else _NULL
        if first == _NULL:
            raise ProxyError(
                Fault.BAD_REQUEST, "'messages' is required: a non-empty list of chat messages"
            )
        if first != _ARRAY:
            raise ProxyError(Fault.BAD_REQUEST, "'messages' must be a list of chat messages")
        if _EMPTY_ARRAY.match(messages):
            raise ProxyError(Fault.BAD_REQUEST, "'messages' must not be empty")
    elif path in COMPLETION_PATHS and (not head.prompt or _is_null(head.prompt)):
        raise ProxyError(Fault.BAD_REQUEST, "'prompt' is required for text completions")
    return head


class _ModelOnly(msgspec.Struct):
    model: str | None = None


_decode_model_only = msgspec.json.Decoder(_ModelOnly).decode


def forwarded_head(body: bytes) -> RequestHead | None:
    """What routing reads of a JSON body on a path the router only forwards (SGLang's
    /generate, vLLM's /tokenize...): that API is the backend's to judge, so nothing
    is refused here. The fields it can read, or else the ``model`` alone, or None."""
    try:
        return _decode_head(body)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        pass  # a field of another type on this API than on OpenAI's, or no JSON at all
    try:
        model = _decode_model_only(body).model
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None
    return RequestHead(model=model) if model is not None else None


# multipart/form-data (RFC 7578): OpenAI's audio transcriptions and translations name
# their model in a form field. The body is scanned in place, never copied: a bounded
# number of parts, each part's header block bounded, the model's value bounded.
MAX_FORM_PARTS = 64  # the SDKs send under a dozen fields, the file among them
MAX_PART_HEAD_BYTES = 4096  # a part's header lines: Content-Disposition, Content-Type
MAX_FORM_MODEL_BYTES = 1024  # a model name
_BOUNDARY = re.compile(rb';\s*boundary\s*=\s*(?:"([^"\r\n]{1,70})"|([^\s;,"]{1,70}))', re.I)
_MODEL_FIELD = re.compile(
    rb"\r\ncontent-disposition[ \t]*:[ \t]*form-data[^\r\n]*?;[ \t]*name[ \t]*=[ \t]*"
    rb'(?:"model"|model)[ \t]*(?:;|\r|\Z)',
    re.I,
)


def is_form(content_type: bytes | None) -> bool:
    return content_type is not None and content_type[:19].lower() == b"multipart/form-data"


def form_model_span(body: bytes, content_type: bytes) -> tuple[int, int] | None:
    """Where the value of the ``model`` field of a multipart/form-data body is, or None
    (no such field in the first MAX_FORM_PARTS parts, or a body not framed as its
    Content-Type says)."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        return None
    delimiter = b"--" + (found.group(1) or found.group(2))
    if body.startswith(delimiter):
        at = len(delimiter)
    else:  # a preamble before the first delimiter
        first = body.find(b"\r\n" + delimiter)
        if first < 0:
            return None
        at = first + 2 + len(delimiter)
    delimiter = b"\r\n" + delimiter
    for _ in range(MAX_FORM_PARTS):
        if body.startswith(b"--", at):
            return None  # the close delimiter: no part left
        # The rest of the delimiter's line (transport padding), then the part's header
        # lines, end at a blank line; a part with no headers starts with it.
        line_end = body.find(b"\r\n", at, at + MAX_PART_HEAD_BYTES)
        if line_end < 0:
            return None
        head_end = body.find(b"\r\n\r\n", line_end, line_end + MAX_PART_HEAD_BYTES)
        if head_end < 0:
            return None
        start = head_end + 4
        # From the CRLF before the first header line: each line is matched after its CRLF.
        if _MODEL_FIELD.search(body, line_end, head_end):
            end = body.find(delimiter, start, start + MAX_FORM_MODEL_BYTES + len(delimiter))
            return None if end < 0 else (start, end)
        end = body.find(delimiter, start)  # over a file's bytes: one scan, in C
        if end < 0:
            return None
        at = end + len(delimiter)
    return None


def form_model(body: bytes, content_type: bytes) -> str | None:
    """The ``model`` field of a multipart/form-data body, if it has one."""
    span = form_model_span(body, content_type)
    if span is None:
        return None
    try:
        return body[span[0] : span[1]].decode() or None
    except UnicodeDecodeError:
        return None


def naming_model(route: RouteRequest, model: str) -> bytes:
    """The route's body naming ``model`` (an alias resolved, a fallback taken), where the
    body names one: a JSON body's ``model``, a form's ``model`` field. Any other body
    (a model-less one routed by --default-model, a body that is not JSON) goes as sent."""
    body = route.body
    head = route.head
    if head is not None:
        if head.model is not None or route.path in MODEL_PATHS:
            return replace_model(body, model)
        return body
    content_type = route.header(b"content-type")
    if not is_form(content_type):
        return body
    assert content_type is not None
    span = form_model_span(body, content_type)
    if span is None:
        return body
    return body[: span[0]] + model.encode() + body[span[1] :]


class _ModelValue(msgspec.Struct):
    model: msgspec.Raw = msgspec.Raw(b"")


_decode_model_value = msgspec.json.Decoder(_ModelValue).decode


def replace_model(body: bytes, model: str) -> bytes:
    """The body with its top-level ``"model"`` set to ``model`` (an alias resolved, a
    fallback taken): that value is the one span rewritten, every other byte stays as
    the client sent it. Where the span cannot be told apart from a nested ``model`` key
    of the same value, the body is encoded again instead."""
    raw = bytes(_decode_model_value(body).model)
    if not raw:
        return with_model(body, model)
    value = msgspec.json.encode(model)
    spans = [m.span(1) for m in re.finditer(rb'"model"\s*:\s*(%s)' % re.escape(raw), body)]
    if len(spans) == 1:
        start, end = spans[0]
        return body[:start] + value + body[end:]
    fields = msgspec.json.decode(body)
    fields["model"] = model
    return msgspec.json.encode(fields)


def with_model(body: bytes, model: str) -> bytes:
    """The body with ``"model"`` set, for a request that left it out.

    Backends require the field, so a request routed to the default model must
    carry it. Only called when the decoded body (a JSON object) had no model.
    """
    # Appended last: JSON parsers keep the last of duplicate keys, so this also
    # overrides an explicit "model": null.
    end = body.rindex(b"}")
    inner = body[:end].rstrip()
    separator = b"" if inner.endswith(b"{") else b","
    return inner + separator + b'"model":' + msgspec.json.encode(model) + b"}"


def with_stream_usage(body: bytes) -> bytes:
    """``body`` asking for the stream's usage (``stream_options.include_usage``), as
    OpenAI's API has it: the stream then ends with one chunk holding ``usage`` and no
    choices. Unchanged if it asks already (or is not a JSON object)."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body
    if not isinstance(data, dict):
        return body
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body
    data["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    return msgspec.json.encode(data)
