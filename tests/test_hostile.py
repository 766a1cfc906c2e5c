"""Hostile and broken client input over raw sockets, and a property-based fuzz.

Whatever a client sends, the router answers with the right 4xx (or passes the
request on), never a 500 of its own making, and keeps serving everyone else.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator

import h11
import pytest
from conftest import Mock, Router, chat_body
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

READ_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    backend = Mock("fuzz-backend", ["Qwen3-32B"])
    router = Router(
        "--backend", backend.backend_arg(), "--max-body-size", "64KiB", "--header-timeout", "1"
    )
    router.wait_healthy(1)
    yield router
    router.stop()
    backend.stop()


def exchange(port: int, raw: bytes) -> tuple[bytes, bool]:
    """Send ``raw``; return (what came back until close or timeout, closed?)."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as sock:
        # The router may close on us mid-send: what it answered still counts.
        with contextlib.suppress(OSError):
            sock.sendall(raw)
        data = b""
        deadline = time.monotonic() + READ_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return data, False
            except ConnectionResetError:
                return data, True
            if not chunk:
                return data, True
            data += chunk
        return data, False


def first_answer_head(port: int, raw: bytes) -> bytes:
    """Send ``raw``; return what came back until the first answer's head is whole, or
    the close. A kept-alive connection is not waited out: only that status counts."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                return data
            if not chunk:
                return data
            data += chunk
        return data


def status_of(data: bytes) -> int:
    assert data.startswith(b"HTTP/1.1 "), data[:100]
    return int(data[9:12])


def assert_still_serving(router: Router) -> None:
    resp = router.get("/health")
    assert resp.status == 200, resp


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
        b"GET / HTTP/1.1\r\nNo-Colon-Here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n Folded: continuation\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/7.7\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    ],
)
def test_malformed_request_is_400_and_close(router, raw):
    data, closed = exchange(router.port, raw)
    assert status_of(data) == 400
    assert closed
    assert b'"error"' in data
    assert_still_serving(router)


def test_bad_chunked_encoding_is_400(router):
    data, closed = exchange(
        router.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n",
    )
    assert status_of(data) == 400 and closed


def test_unsupported_transfer_coding_is_refused(router):
    data, closed = exchange(
        router.port,
        b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    )
    assert status_of(data) == 501 and closed


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 10\r\n",
        b"Content-Length: 10\r\nContent-Length: 11\r\n",
        b"Content-Length: 10\r\nContent-Length: 10\r\n",
    ],
    ids=["cl-then-te", "te-then-cl", "two-lengths", "same-length-twice"],
)
def test_request_smuggling_is_400_and_close(router, headers):
    body = b'{"model":"Qwen3-32B","messages":[{"role":"user","content":"x"}]}'
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + headers
        + b"\r\n"
        + b"a\r\n"
        + body[:10]
        + b"\r\n0\r\n\r\n"
        + smuggled
    )
    data, closed = exchange(router.port, raw)
    assert status_of(data) == 400 and closed
    assert data.count(b"HTTP/1.1 ") == 1  # the smuggled request was never answered


def test_trickled_headers_are_cut_off_at_the_header_timeout(router):
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        started = time.monotonic()
        closed_after = None
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - started
                break
            time.sleep(0.05)
            sock.setblocking(False)
            try:
                if sock.recv(65536) is not None:
                    closed_after = time.monotonic() - started
                    break
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
    # Bytes kept coming, but the headers as a whole took too long (--header-timeout 1):
    # cut off before the trickle's end (more than 5 s of it), and not before the deadline.
    assert closed_after is not None and closed_after > 0.9


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b'{"model": "\xff\xfe", "messages": [{"role": "user"}]}', "UTF-8"),
        (b'\xef\xbb\xbf{"model": "Qwen3-32B"}', "not valid JSON"),
        (
            b'{"model": "Qwen3-32B", "messages": [1], "max_tokens": 1' + b"0" * 40 + b"}",
            "$.max_tokens",
        ),
        (b'{"model": "Qwen3-32B", "messages": [1], "temperature": 1e999}', "$.temperature"),
        (b'{"model": "Qwen3-32B", "messages": [1], "top_k": 99999999999999}', "$.top_k"),
        (b'{"model": ["Qwen3-32B"], "messages": [1]}', "$.model"),
        (b'{"model": "Qwen3-32B", "messages": "hi"}', "'messages' must be a list"),
        (b'{"model": "Qwen3-32B", "messages": [1], "stream": 1}', "$.stream"),
        (b'{"model": "Qwen3-32B", "messages": [1], "top_p": "0.5"}', "$.top_p"),
        (b'{"model": "Qwen3-32B", "messages": [1], "user": 5}', "$.user"),
        (
            b'{"model": "Qwen3-32B", "messages": [1], "repetition_penalty": null, "x": '
            + b"[" * 5000
            + b"]" * 5000
            + b"}",
            "nested too deeply",
        ),
        (b'{"model": "Qwen3-32B", "messages": [1]', "not valid JSON"),
        (b"null", "Expected `object`"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_bodies_are_400_with_a_clear_message(router, body, names):
    resp = router.post("/v1/chat/completions", body)
    assert resp.status == 400, resp
    assert names in resp.json()["error"]


# --- property-based fuzz ----------------------------------------------------------

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
bodies = st.dictionaries(
    st.sampled_from(
        [
            "model",
            "messages",
            "prompt",
            "stream",
            "temperature",
            "top_p",
            "top_k",
            "max_tokens",
            "repetition_penalty",
            "user",
            "input",
            "n",
        ]
    ),
    json_values,
    max_size=8,
)


@FUZZ
@given(
    body=bodies,
    path=st.sampled_from(
        [
            "/v1/chat/completions",
            "/v1/completions",
            "/chat/completions",
            "/v1/embeddings",
            "/v1/other",
        ]
    ),
)
def test_fuzz_json_bodies_never_500(router, body, path):
    resp = router.post(path, json.dumps(body).encode())
    assert resp.status != 500 or resp.headers.get("x-mock-server"), resp
    assert resp.status in (200, 400, 404, 503) or resp.headers.get("x-mock-server"), resp


@FUZZ
@given(raw=st.binary(max_size=400))
def test_fuzz_raw_bodies_never_500(router, raw):
    resp = router.post("/v1/chat/completions", raw)
    assert resp.status in (200, 400), resp


header_names = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
    min_size=1,
    max_size=20,
)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@FUZZ
@given(headers=st.dictionaries(header_names, header_values, max_size=6))
def test_fuzz_headers_never_500(router, headers):
    lines = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items())
    body = json.dumps(chat_body(max_tokens=1)).encode()
    raw = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        + lines
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )
    data, _ = exchange(router.port, raw)
    if data:
        assert status_of(data) != 500 or b"X-Mock-Server" in data, data[:300]


@FUZZ
@given(
    raw=st.binary(min_size=1, max_size=300)
    | st.builds(
        lambda prefix, junk: prefix + junk,
        st.sampled_from(
            [
                b"GET / HTTP/1.1\r\n",
                b"POST /v1/chat/completions HTTP/1.1\r\n",
                b"GET /health HTTP/1.1\r\nHost: x\r\n",
            ]
        ),
        st.binary(max_size=200),
    )
)
def test_fuzz_byte_streams_never_500_and_never_stop_the_router(router, raw):
    data = first_answer_head(router.port, raw + b"\r\n\r\n")
    if data:
        assert status_of(data) != 500, data[:300]
    assert_still_serving(router)


# --- fuzz with the invariants as the oracle -------------------------------------------

GOOD = {
    "health": (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    "missing": (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    "dots": (b"GET /v1/../x HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # refused; still keep-alive
    "chat": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s"
        % (len(_CHAT := json.dumps(chat_body(max_tokens=1)).encode()), _CHAT),
        200,
    ),
    "chunked-chat": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(_CHAT), _CHAT),
        200,
    ),
}
BAD = {
    "garbage": b"GARBAGE\r\n\r\n",
    "smuggle": b"POST /v1/x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    "bad-chunk": b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
}
LAST = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _send_in_pieces(port: int, raw: bytes, cuts: list[int]) -> bytes:
    """Send ``raw`` cut at ``cuts`` (separate writes, so mostly separate reads)."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        previous = 0
        for cut in [*sorted(set(cuts)), len(raw)]:
            with contextlib.suppress(OSError):
                sock.sendall(raw[previous:cut])
            previous = cut
            time.sleep(0.001)
        data = b""
        deadline = time.monotonic() + READ_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
        return data


@FUZZ
@given(
    kinds=st.lists(st.sampled_from([*GOOD, *BAD]), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=8),
)
def test_fuzz_pipelined_mixtures_split_anywhere_get_one_answer_each_in_order(router, kinds, cuts):
    raw = b"".join(GOOD[k][0] if k in GOOD else BAD[k] for k in kinds) + LAST
    data = _send_in_pieces(router.port, raw, [c for c in cuts if c < len(raw)])
    expected = []
    for kind in kinds:
        if kind in BAD:
            expected.append(400)  # then the connection closes: nothing after it
            break
        expected.append(GOOD[kind][1])
    else:
        expected.append(200)
    statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
    assert statuses == expected, (kinds, data[-300:])
    router.wait_idle(5)


# A backend's answer: a status, a framing honest or not, a body, and what may follow it.
backend_answers = st.builds(
    lambda status, framing, body, after, close: (status, framing, body, after, close),
    st.sampled_from([200, 201, 204, 304, 404, 500, 503]),
    st.sampled_from(["length", "short", "long", "chunked", "bad-chunk", "until-close", "none"]),
    st.binary(max_size=40),
    st.sampled_from([b"", b"junk", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nSEC"]),
    st.booleans(),
)


def _backend_bytes(status: int, framing: str, body: bytes, after: bytes) -> bytes:
    head = b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n" % status
    if framing == "length":
        return head + b"Content-Length: %d\r\n\r\n%s%s" % (len(body), body, after)
    if framing == "short":
        return head + b"Content-Length: %d\r\n\r\n%s" % (len(body) + 5, body)
    if framing == "long":
        return head + b"Content-Length: %d\r\n\r\n%s" % (len(body) // 2, body)
    if framing == "chunked":
        chunk = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
        return head + b"Transfer-Encoding: chunked\r\n\r\n%s0\r\n\r\n%s" % (chunk, after)
    if framing == "bad-chunk":
        return head + b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n%s" % body
    if framing == "until-close":
        return head + b"\r\n" + body
    return head + b"\r\n"  # no framing: a body until the close, or none for 204/304


def _until_close(status: int, framing: str) -> bool:
    """Whether the body ends only with the connection (or never, if it stays open)."""
    unframed = framing == "none" and status not in (204, 304)
    return unframed or framing in ("until-close", "short")


@pytest.fixture(scope="module")
def lenient_router() -> Iterator[Router]:
    """A router that never ejects its backend: the fuzz sends it broken answers on purpose."""
    backend = Mock("framing-backend", ["Qwen3-32B"])
    router = Router("--backend", backend.backend_arg(), "--max-errors", "0")
    router.wait_healthy(1)
    yield router
    router.stop()
    backend.stop()


@FUZZ
@given(answer=backend_answers)
def test_fuzz_backend_framings_never_corrupt_the_client_connection(lenient_router, answer):
    router = lenient_router
    status, framing, body, after, close = answer
    raw = _backend_bytes(status, framing, body, after)
    payload = json.dumps(chat_body(max_tokens=1)).encode()
    first = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Mock-Raw: %s\r\n%sContent-Length: %d\r\n\r\n%s"
        % (
            base64.b64encode(raw),
            # A backend that stalls mid-body is the fault suite's; here it closes.
            b"X-Mock-Raw-Close: 1\r\n" if close or _until_close(status, framing) else b"",
            len(payload),
            payload,
        )
    )
    conn = h11.Connection(h11.CLIENT)
    with socket.create_connection(("127.0.0.1", router.port), timeout=READ_TIMEOUT_S) as sock:
        sock.sendall(first)
        conn.send(
            h11.Request(
                method="POST",
                target="/v1/chat/completions",
                headers=[("Host", "x"), ("Content-Length", str(len(payload)))],
            )
        )
        conn.send(h11.Data(data=payload))
        conn.send(h11.EndOfMessage())
        # The client's byte stream must parse as HTTP, whatever the backend sent:
        # one response (the backend's, or the router's 502/504), or one cut short.
        events = _read_response(conn, sock)
        response = events[0]
        assert isinstance(response, h11.Response), events
        assert response.status_code != 500 or status == 500
        if response.status_code not in (502, 504):
            assert response.status_code == status
        if not isinstance(events[-1], h11.EndOfMessage):
            return  # cut short: the router closed the connection, nothing more came
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()
        sock.sendall(
            conn.send(h11.Request(method="GET", target="/health", headers=[("Host", "x")]))
            + conn.send(h11.EndOfMessage())
        )
        follow = _read_response(conn, sock)
        # Nothing of the backend's first answer was left in the connection.
        assert isinstance(follow[0], h11.Response) and follow[0].status_code == 200, follow
    router.wait_idle(5)


def _read_response(conn: h11.Connection, sock: socket.socket) -> list[object]:
    events: list[object] = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            # Only one error is acceptable: the router closed a body it could not complete.
            assert "incomplete" in str(exc) or "without sending complete" in str(exc), exc
            events.append("cut")
            return events
        if event is h11.NEED_DATA:
            try:
                data = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                data = b""
            conn.receive_data(data)
            continue
        if isinstance(event, h11.ConnectionClosed):
            events.append("cut")
            return events
        events.append(event)
        if isinstance(event, h11.EndOfMessage):
            return events
