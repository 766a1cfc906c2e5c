"""Every failure the router reports, and the one table that maps it to a status.

Whose fault a failure is decides two things at once: the HTTP status the client
gets and whether it counts against a backend service. Both are decided here and
nowhere else, in the spirit of h11's ``error_status_hint``.
"""

from __future__ import annotations

import enum
from http import HTTPStatus

import msgspec


class Fault(enum.Enum):
    """A kind of failure: (status, counts against the backend service)."""

    BAD_REQUEST = (400, False)
    UNAUTHORIZED = (401, False)
    FORBIDDEN = (403, False)
    NOT_FOUND = (404, False)
    METHOD_NOT_ALLOWED = (405, False)
    BODY_TOO_LARGE = (413, False)
    HEADERS_TOO_LARGE = (431, False)
    QUEUE_TIMEOUT = (429, False)  # every eligible service stayed at its max_in_flight
    NO_HEALTHY_SERVICE = (503, False)
    BACKEND_UNREACHABLE = (502, True)
    BACKEND_BROKEN = (502, True)
    BACKEND_TIMEOUT = (504, True)
    SHUTTING_DOWN = (503, False)

    def __init__(self, status: int, counts_against_service: bool) -> None:
        self.status = status
        self.counts_against_service = counts_against_service


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


def error_response(
    status: int, message: str, keep_alive: bool = True, extra_headers: bytes = b""
) -> bytes:
    return json_response(status, {"error": message}, keep_alive, extra_headers)


def sse_error_event(message: str) -> bytes:
    """The event that ends a stream the backend broke off: the router's error shape.

    The OpenAI SDKs raise ``APIError`` on any event whose JSON has an ``error`` key.
    """
    return b"data: " + encode_json({"error": message}) + b"\n\n"
