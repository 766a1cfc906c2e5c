"""Every failure the router reports, and the one table that maps it to a status.

Every error the router answers itself names a :class:`Fault`, whose status is
decided here and nowhere else, in the spirit of h11's ``error_status_hint``.
Whether a failure counts against a backend service is the proxy's decision
(``journey/attempt.py``): it depends on what happened, not on the status.

Two start-up settings change what a client sees, never what the router does
(:func:`configure`, once per process, before any answer is prebuilt):
``--compat infinilm`` gives the InfiniLM routers' statuses where they differ
(503 for a backend that refuses connections and for an unknown model, which
InfiniLM's clients retry), and ``--error-format openai`` gives OpenAI's error
object, ``{"error": {"message", "type", "param", "code"}}``, whose ``code`` is the
fault's name, instead of the InfiniLM API's ``{"error": "message"}``.
"""

from __future__ import annotations

import enum
from http import HTTPStatus
from typing import Any

import msgspec


@enum.unique
class Fault(enum.Enum):
    """Every kind of failure the router answers itself; ``status`` is what the client
    gets. README's error table is this one. Values are names, never statuses: equal
    values would make enum members aliases of each other."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"  # a model no service lists (OpenAI's code for it)
    METHOD_NOT_ALLOWED = "method_not_allowed"
    REQUEST_TIMEOUT = "request_timeout"  # headers or a body too slow
    CONFLICT = "conflict"  # a registration for a configured name
    BODY_TOO_LARGE = "body_too_large"
    TOO_MANY_PIPELINED = "too_many_pipelined"
    QUEUE_TIMEOUT = "queue_timeout"  # every eligible service stayed at its max_in_flight
    QUEUE_FULL = "queue_full"  # --max-queue waiting, and this one's priority was the lowest
    # Waited --queue-timeout for the router-wide --max-concurrent-requests (sglang-router's 408).
    CONCURRENCY_TIMEOUT = "concurrency_timeout"
    RATE_LIMITED = "rate_limited"  # a [[keys]] limit: rpm, tpm or max_in_flight
    HEADERS_TOO_LARGE = "headers_too_large"
    INTERNAL = "internal"  # a bug in the router
    # Code run for a proxied request raised (a strategy plugin, a bug): that request ends.
    ROUTING_FAILED = "routing_failed"
    NOT_IMPLEMENTED = "not_implemented"  # a transfer coding other than chunked
    BACKEND_UNREACHABLE = "backend_unreachable"  # no connection could be made
    BACKEND_CLOSED = "backend_closed"  # it closed the connection before answering
    BACKEND_BROKEN = "backend_broken"
    NO_HEALTHY_SERVICE = "no_healthy_service"
    AT_CONNECTION_LIMIT = "at_connection_limit"
    SUPERVISOR_SILENT = "supervisor_silent"
    BACKEND_TIMEOUT = "backend_timeout"
    LOOP_DETECTED = "loop_detected"

    @property
    def status(self) -> int:
        return _STATUS[self]


DEFAULT_STATUS: dict[Fault, int] = {
    Fault.BAD_REQUEST: 400,
    Fault.UNAUTHORIZED: 401,
    Fault.FORBIDDEN: 403,
    Fault.NOT_FOUND: 404,
    Fault.MODEL_NOT_FOUND: 404,
    Fault.METHOD_NOT_ALLOWED: 405,
    Fault.REQUEST_TIMEOUT: 408,
    Fault.CONCURRENCY_TIMEOUT: 408,
    Fault.CONFLICT: 409,
    Fault.BODY_TOO_LARGE: 413,
    Fault.TOO_MANY_PIPELINED: 429,
    Fault.QUEUE_TIMEOUT: 429,
    Fault.QUEUE_FULL: 429,
    Fault.RATE_LIMITED: 429,
    Fault.HEADERS_TOO_LARGE: 431,
    Fault.INTERNAL: 500,
    Fault.NOT_IMPLEMENTED: 501,
    Fault.ROUTING_FAILED: 502,
    Fault.BACKEND_UNREACHABLE: 502,
    Fault.BACKEND_CLOSED: 502,
    Fault.BACKEND_BROKEN: 502,
    Fault.NO_HEALTHY_SERVICE: 503,
    Fault.AT_CONNECTION_LIMIT: 503,
    Fault.SUPERVISOR_SILENT: 503,
    Fault.BACKEND_TIMEOUT: 504,
    Fault.LOOP_DETECTED: 508,
}
# Where the InfiniLM routers answer otherwise (python/distributed_router.py and
# infini-router's proxy handler): a refused connection and a model no healthy
# service lists are both "unavailable", the status their clients retry on.
INFINILM_STATUS: dict[Fault, int] = {
    Fault.BACKEND_UNREACHABLE: 503,
    Fault.MODEL_NOT_FOUND: 503,
}
COMPAT = ("none", "infinilm")
ERROR_FORMATS = ("plain", "openai")
# The statuses in force: DEFAULT_STATUS, with --compat's changes (configure).
_STATUS: dict[Fault, int] = dict(DEFAULT_STATUS)
# OpenAI's error types, by status; others are "invalid_request_error" (4xx) or
# "server_error" (5xx).
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}

_openai_errors = False  # --error-format openai (configure)


def configure(compat: str = "none", error_format: str = "plain") -> None:
    """This process's statuses and error shape (``--compat``, ``--error-format``).
    Called before any error answer is built: some are built once and kept."""
    global _openai_errors
    _STATUS.clear()
    _STATUS.update(DEFAULT_STATUS)
    if compat == "infinilm":
        _STATUS.update(INFINILM_STATUS)
    _openai_errors = error_format == "openai"


class ProxyError(Exception):
    """A failure with a message that tells the client what to change."""

    def __init__(self, fault: Fault, message: str) -> None:
        super().__init__(message)
        self.fault = fault
        self.message = message
        self.retry_after: int | None = None  # seconds, sent as Retry-After

    @property
    def status(self) -> int:
        return self.fault.status


encode_json = msgspec.json.Encoder().encode

# Precomputed status lines: the reason phrase lookup is not free on the hot path.
STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus
}


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Unknown\r\n" % status
    return line


def http_response(
    status: int,
    content_type: bytes,
    body: bytes,
    keep_alive: bool = True,
    extra_headers: bytes = b"",
    head_only: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response."""
    head = b"%sContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n" % (
        status_line(status),
        content_type,
        len(body),
        extra_headers,
        b"" if keep_alive else b"Connection: close\r\n",
    )
    return head if head_only else head + body


def json_response(
    status: int,
    payload: object,
    keep_alive: bool = True,
    extra_headers: bytes = b"",
    head_only: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response with a JSON body."""
    return http_response(
        status, b"application/json", encode_json(payload), keep_alive, extra_headers, head_only
    )


def error_body(fault: Fault, message: str) -> dict[str, Any]:
    """The JSON of an error the router answers itself, in the --error-format shape."""
    if not _openai_errors:
        return {"error": message}
    status = fault.status
    kind = _OPENAI_TYPES.get(status) or (
        "invalid_request_error" if status < 500 else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": None, "code": fault.value}}


def error_response(
    fault: Fault, message: str, keep_alive: bool = True, extra_headers: bytes = b""
) -> bytes:
    return json_response(fault.status, error_body(fault, message), keep_alive, extra_headers)


def error_payload(fault: Fault, message: str) -> tuple[int, dict[str, Any]]:
    """A handler's (status, payload) for a failure: the admin API's answers."""
    return fault.status, error_body(fault, message)


def sse_error_event(message: str, fault: Fault = Fault.BACKEND_BROKEN) -> bytes:
    """The event that ends a stream the backend broke off: the router's error shape.

    The OpenAI SDKs raise ``APIError`` on any event whose JSON has an ``error`` key
    (with OpenAI's object, carrying its message and code).
    """
    return b"data: " + encode_json(error_body(fault, message)) + b"\n\n"
