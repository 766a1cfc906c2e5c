"""Byte-level cases, in process: parsing, pipelining, limits, and the relay of odd
backend framings, through a real Router with in-memory transports (``inproc.py``)."""

from __future__ import annotations

import json
import re

from inproc import BODY, MODEL, Harness, MemoryTransport, chat_request

from lmproxy.backend.upstream import UpstreamConnection

OK_BODY = b'{"id":"x","object":"chat.completion"}'


def ok_response(body: bytes = OK_BODY, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
        % (
            len(body),
            extra,
            body,
        )
    )


def statuses(data: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


async def test_pipelined_requests_are_forwarded_one_at_a_time_and_answered_in_order():
    h = Harness()
    backend, upstream = h.backend()
    client, downstream = h.client()
    bodies = [BODY.replace(b"16", str(n).encode()) for n in (1, 2, 3)]
    client.data_received(b"".join(chat_request(b) for b in bodies))  # one read, three requests
    for n, body in enumerate(bodies, 1):
        forwarded = upstream.take()
        # Only the request being answered reached the backend, with its original body.
        assert forwarded.count(b"POST /v1/chat/completions") == 1, forwarded
        assert forwarded.endswith(body)
        backend.data_received(ok_response(b'{"n":%d}' % n))
        await h.turn()
    answers = downstream.take()
    assert statuses(answers) == [200, 200, 200]
    assert [json.loads(m) for m in re.findall(rb'\{"n":\d\}', answers)] == [
        {"n": 1},
        {"n": 2},
        {"n": 3},
    ]
    assert not downstream.closing and h.idle_backends() == 1  # both connections live on


async def test_a_body_over_the_limit_is_refused_from_its_content_length():
    h = Harness(max_body_size=1000)
    client, downstream = h.client()
    client.data_received(chat_request(b"x" * 2000)[:300])  # the head, and a little body
    answer = downstream.take()
    assert statuses(answer) == [413]
    assert b"2000 bytes is over the limit of 1000" in answer and b"--max-body-size" in answer
    assert downstream.eof_written  # the lingering close: the answer is not destroyed


async def test_headers_over_64_kib_get_431():
    h = Harness()
    client, downstream = h.client()
    client.data_received(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    for _ in range(70):
        client.data_received(b"X-Pad: " + b"p" * 1000 + b"\r\n")
        if downstream.written:
            break
    answer = downstream.take()
    assert statuses(answer) == [431] and b"over 65536 bytes" in answer


async def test_a_transfer_coding_other_than_chunked_gets_501():
    h = Harness()
    client, downstream = h.client()
    client.data_received(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    )
    answer = downstream.take()
    assert statuses(answer) == [501] and b"only 'Transfer-Encoding: chunked'" in answer


async def test_head_gets_the_backends_head_and_no_body():
    h = Harness()
    backend, upstream = h.backend()
    client, downstream = h.client()
    client.data_received(chat_request(method=b"HEAD", path=b"/v1/responses"))
    assert upstream.take().startswith(b"HEAD /v1/responses HTTP/1.1")
    # A HEAD answer announces a body it does not send.
    backend.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    await h.turn()
    answer = downstream.take()
    assert statuses(answer) == [200] and answer.endswith(b"\r\n\r\n")
    assert b"Content-Length: 1234" in answer
    assert not downstream.closing  # the client may go on
    # httptools cannot be told a response answers HEAD: that backend connection is
    # closed rather than trusted with the next request.
    assert upstream.closing and h.idle_backends() == 0


async def test_an_interim_1xx_is_not_relayed():
    h = Harness()
    backend, _ = h.backend()
    client, downstream = h.client()
    client.data_received(chat_request())
    backend.data_received(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
    backend.data_received(ok_response())
    await h.turn()
    answer = downstream.take()
    assert statuses(answer) == [200] and b"Link:" not in answer
    assert answer.endswith(OK_BODY)


async def test_bytes_after_a_chunked_answer_are_dropped_and_the_connection_not_reused():
    h = Harness(max_errors=0)
    backend, upstream = h.backend()
    client, downstream = h.client()
    client.data_received(chat_request())
    backend.data_received(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\nJUNK AFTER THE ANSWER"
    )
    await h.turn()
    answer = downstream.take()
    assert statuses(answer) == [200] and answer.endswith(b"5\r\nhello\r\n0\r\n\r\n")
    assert b"JUNK" not in answer
    assert upstream.aborted and h.idle_backends() == 0  # never handed to another request


async def test_a_close_delimited_body_is_sent_chunked_and_ends_with_the_close():
    h = Harness()
    backend, _ = h.backend()
    client, downstream = h.client()
    client.data_received(chat_request())
    backend.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n")
    backend.data_received(b"data: 2\n\n")
    backend.connection_lost(None)  # the end of the body
    await h.turn()
    answer = downstream.take()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert statuses(head) == [200] and b"Transfer-Encoding: chunked" in head
    assert body == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n"
    assert not downstream.closing  # a complete answer: the client connection lives on


EVENT = b'data: {"choices":[{"delta":{"content":"tok "}}]}\n\n'
WHOLE = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)  # one chunk holding one event


def start_stream(h: Harness, chunks: int) -> tuple[UpstreamConnection, MemoryTransport]:
    """A streamed request whose backend has sent its head and ``chunks`` whole events."""
    backend, _ = h.backend()
    client, downstream = h.client()
    client.data_received(chat_request(BODY.replace(b"}", b',"stream":true}')))
    backend.data_received(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        + WHOLE * chunks
    )
    return backend, downstream


async def test_a_stream_cut_inside_a_chunk_is_relayed_as_cut_and_the_client_closed():
    """No event of the router's own can follow half a chunk: the client gets what came,
    and a close, so its chunked body is visibly incomplete; the service is blamed."""
    h = Harness()
    backend, downstream = start_stream(h, 2)
    half = b"%x\r\n%s" % (len(EVENT), EVENT[:10])
    backend.data_received(half)
    backend.connection_lost(None)
    await h.turn()
    answer = downstream.take()
    assert answer.endswith(WHOLE * 2 + half)
    assert b'"error"' not in answer and not answer.endswith(b"0\r\n\r\n")
    assert downstream.closing
    assert h.service.error_count == 1


async def test_a_stream_cut_between_chunks_ends_with_an_error_event():
    h = Harness()
    backend, downstream = start_stream(h, 1)
    backend.connection_lost(None)
    await h.turn()
    answer = downstream.take()
    tail = answer[answer.index(WHOLE) + len(WHOLE) :]
    size, _, rest = tail.partition(b"\r\n")
    error_event = rest[: int(size, 16)]
    assert error_event.startswith(b'data: {"error":"the backend failed mid-stream'), answer
    assert rest[int(size, 16) :] == b"\r\n0\r\n\r\n"
    assert downstream.closing


SERVER_ERROR = b'{"error":"the engine died"}'
ANSWER_500 = (
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(SERVER_ERROR), SERVER_ERROR)
)


async def test_a_500_head_is_dropped_unrelayed_and_another_service_answers():
    h = Harness(("a", "b"), strategy="round-robin", cb_failure_threshold=2)
    backend_a, upstream_a = h.backend("a")
    backend_b, upstream_b = h.backend("b")
    client, downstream = h.client()
    client.data_received(chat_request())  # round-robin: a first
    assert upstream_a.take().endswith(BODY)
    backend_a.data_received(ANSWER_500)
    await h.turn()
    assert downstream.take() == b""  # not a byte of it reached the client
    assert upstream_a.closing  # its connection goes, unread: never pooled
    assert upstream_b.take().endswith(BODY)  # the same request, as sent, to b
    backend_b.data_received(ok_response())
    await h.turn()
    answer = downstream.take()
    assert statuses(answer) == [200] and answer.endswith(OK_BODY)
    assert b"engine" not in answer
    roster = h.router.roster
    a, b = roster.services["a"], roster.services["b"]
    assert a.error_count == 1 and a.breaker.failures == 1 and a.consecutive_errors == 0
    assert a.in_flight == 0 and b.in_flight == 0  # every slot came back
    assert roster.candidates(MODEL) == [a, b]  # one of two: still closed


async def test_without_a_retry_left_the_500_is_relayed_as_it_came_and_counted():
    h = Harness(("a", "b"), strategy="round-robin", retries=0, cb_failure_threshold=1)
    backend_a, _ = h.backend("a")
    client, downstream = h.client()
    client.data_received(chat_request())
    backend_a.data_received(ANSWER_500)
    await h.turn()
    answer = downstream.take()
    assert statuses(answer) == [500] and answer.endswith(SERVER_ERROR)
    roster = h.router.roster
    a = roster.services["a"]
    assert a.breaker.state_name == "open"
    assert roster.candidates(MODEL) == [roster.services["b"]]
    assert a.healthy  # its checks decide health; the breaker, routing


async def test_a_200_after_failures_ends_the_streak_and_a_4xx_counts_as_working():
    h = Harness(("a",), cb_failure_threshold=3)
    for answer in (
        ANSWER_500,
        ANSWER_500,
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    ):
        backend, _ = h.backend()
        client, downstream = h.client()
        client.data_received(chat_request())
        backend.data_received(answer)
        await h.turn()
        assert statuses(downstream.take()) == [int(answer[9:12])]
    assert h.service.breaker.failures == 0 and h.service.breaker.clean
