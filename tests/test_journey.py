"""A request's path as its ends show it, in process (``inproc.py``): disaggregated
pairs retried and cancelled, fallbacks, a [[keys]] key's grant ended once on every
exit, and a strategy plugin written against docs/strategies.md. Only what is outside
the request path is read: the bytes each side gets, the services' counters and slots,
the metrics, the access log and the key limits' counts."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import pytest
from conftest import free_port
from inproc import BODY, MODEL, Harness, MemoryTransport, chat_request, spec

from lmproxy.config import ModelSettings
from lmproxy.upstream import UpstreamConnection

Backends = dict[str, tuple[UpstreamConnection, MemoryTransport]]


def response(body: bytes, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        len(body),
        extra,
        body,
    )


def statuses(data: bytes) -> list[int]:
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def body_of(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[2]


def header(data: bytes, name: bytes) -> bytes | None:
    found = re.search(
        rb"\r\n" + name + rb": ([^\r]*)\r\n", data.partition(b"\r\n\r\n")[0] + b"\r\n"
    )
    return found.group(1) if found else None


async def until(predicate: Any, what: str, timeout_s: float = 2.0) -> None:
    """Let the loop run (real sockets' connects too) until ``predicate()``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.001)


def access(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access log's lines (``access_log="json"``) so far."""
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "lmproxy.access"]


def slots(h: Harness) -> dict[str, int]:
    return {name: s.in_flight for name, s in h.router.registry.services.items()}


def counts(h: Harness) -> dict[str, tuple[int, int]]:
    """Each service's (request_count, error_count)."""
    return {
        name: (s.request_count, s.error_count) for name, s in h.router.registry.services.items()
    }


def sent(backends: Backends, prefix: str) -> list[str]:
    """The services named ``prefix``... whose backend was sent something since the last
    look (each such transport's writes are taken)."""
    return [n for n, (_, t) in backends.items() if n.startswith(prefix) and t.take()]


def metrics(h: Harness) -> str:
    return h.router.metrics.render().decode()


# --- disaggregation: a vLLM or SGLang fleet of two prefills and two decodes -------------

PD_NAMES = ("p1", "p2", "d1", "d2")
PREFILL_OK = response(
    b'{"id":"p","choices":[],"kv_transfer_params":{"remote_engine_id":"e1","remote_block_ids":[1]}}'
)


def decode_ok(name: str) -> bytes:
    return response(b'{"id":"%s","object":"chat.completion"}' % name.encode())


def pd_harness(mode: str, **settings: Any) -> tuple[Harness, Backends]:
    """Prefills p1, p2 and decodes d1, d2 of MODEL, each side chosen in turn, each with
    one pooled connection; the access log in JSON."""
    specs = [
        spec("p1", 0, role="prefill", bootstrap_port=8998),
        spec("p2", 1, role="prefill", bootstrap_port=8998),
        spec("d1", 2, role="decode"),
        spec("d2", 3, role="decode"),
    ]
    settings.setdefault("prefill_strategy", "round-robin")
    settings.setdefault("decode_strategy", "round-robin")
    h = Harness(specs=specs, pd_mode=mode, access_log="json", **settings)
    return h, {name: h.backend(name) for name in PD_NAMES}


async def start_pair(h: Harness, backends: Backends, mode: str) -> tuple[str, str]:
    """After the client's request: the pair it was given, (prefill, decode). vLLM's
    decode is sent once the prefill answered (here: at once, with PREFILL_OK)."""
    await h.turn()
    (prefill,) = sent(backends, "p")
    if mode == "vllm":
        assert sent(backends, "d") == []  # the decode waits for the prefill's answer
        backends[prefill][0].data_received(PREFILL_OK)
        await h.turn()
    (decode,) = sent(backends, "d")
    return prefill, decode


@pytest.mark.parametrize("mode", ["vllm", "sglang"])
async def test_a_decode_lost_before_its_first_byte_gets_a_new_pair(mode, caplog):
    caplog.set_level(logging.INFO, "lmproxy.access")
    h, backends = pd_harness(mode)
    client, downstream = h.client()
    client.data_received(chat_request())
    prefill, decode = await start_pair(h, backends, mode)
    # Part of a status line, then the close: the decode failed, before its head.
    backends[decode][0].data_received(b"HTTP/1.1 2")
    backends[decode][0].connection_lost(None)
    await h.turn()
    assert downstream.take() == b""  # nothing of it reached the client
    assert backends[decode][1].closing
    prefill2, decode2 = await start_pair(h, backends, mode)
    assert decode2 != decode  # the failed decode is not tried again
    if mode == "sglang":
        # The first pair's prefill, still running, is given up with its pair.
        assert backends[prefill][1].closing
        backends[prefill2][0].data_received(PREFILL_OK)
    backends[decode2][0].data_received(decode_ok(decode2))
    await h.turn()
    answer = downstream.take()
    assert statuses(answer) == [200] and body_of(answer) == body_of(decode_ok(decode2))
    assert slots(h) == dict.fromkeys(PD_NAMES, 0)
    # The failed decode is counted against it; a prefill given up unanswered (SGLang's)
    # is not counted as a request at all, one that answered (vLLM's) is.
    expected = {prefill: (1 if mode == "vllm" else 0, 0), prefill2: (1, 0)}
    expected |= {decode: (1, 1), decode2: (1, 0)}
    assert counts(h) == expected
    text = metrics(h)
    assert 'lmproxy_pd_requests_total{outcome="failed",role="decode"} 1.0' in text
    assert 'lmproxy_pd_requests_total{outcome="ok",role="decode"} 1.0' in text
    prefills_ok = 2 if mode == "vllm" else 1
    assert f'lmproxy_pd_requests_total{{outcome="ok",role="prefill"}} {prefills_ok}.0' in text
    assert 'outcome="failed",role="prefill"' not in text
    (line,) = access(caplog)
    assert (line["status"], line["service"]) == (200, f"prefill={prefill2},decode={decode2}")


PREFILL_400 = response(b'{"error":"max_tokens is too large"}', b"400 Bad Request")


@pytest.mark.parametrize("mode", ["vllm", "sglang"])
async def test_a_prefill_4xx_is_the_clients_error(mode, caplog):
    caplog.set_level(logging.INFO, "lmproxy.access")
    h, backends = pd_harness(mode)
    client, downstream = h.client()
    client.data_received(chat_request())
    await h.turn()
    (prefill,) = sent(backends, "p")
    decodes = sent(backends, "d")
    backends[prefill][0].data_received(PREFILL_400)
    await h.turn()
    answer = downstream.take()
    assert statuses(answer) == [400], answer
    message = json.loads(body_of(answer))["error"]
    assert (
        message
        == f"prefill service {prefill} answered 400: " + '{"error":"max_tokens is too large"}'
    )
    if mode == "vllm":
        assert decodes == [] and sent(backends, "d") == []  # no decode is sent
    else:
        (decode,) = decodes  # sent beside the prefill, and stopped: not its fault
        assert backends[decode][1].closing
        assert counts(h)[decode] == (1, 0)
    assert sent(backends, "p") == []  # nor another prefill
    assert slots(h) == dict.fromkeys(PD_NAMES, 0)
    assert counts(h)[prefill] == (1, 0)  # the client's error, not the prefill's
    assert h.router.registry.services[prefill].breaker.failures == 0
    assert 'lmproxy_pd_requests_total{outcome="failed",role="prefill"} 1.0' in metrics(h)
    (line,) = access(caplog)
    # Today's line names the prefill alone, SGLang's stopped decode too.
    assert line["status"] == 400 and line["service"] == f"prefill={prefill}"


@pytest.mark.parametrize("mode", ["vllm", "sglang"])
async def test_a_prefill_5xx_is_retried_on_another_prefill(mode, caplog):
    caplog.set_level(logging.INFO, "lmproxy.access")
    h, backends = pd_harness(mode)
    client, downstream = h.client()
    client.data_received(chat_request())
    await h.turn()
    (prefill,) = sent(backends, "p")
    first_decodes = sent(backends, "d")
    backends[prefill][0].data_received(
        response(b'{"error":"engine died"}', b"500 Internal Server Error")
    )
    await h.turn()
    assert downstream.take() == b""
    prefill2, decode = await start_pair(h, backends, mode)
    assert prefill2 != prefill
    if mode == "sglang":
        backends[prefill2][0].data_received(PREFILL_OK)
    backends[decode][0].data_received(decode_ok(decode))
    await h.turn()
    answer = downstream.take()
    assert statuses(answer) == [200] and body_of(answer) == body_of(decode_ok(decode))
    assert slots(h) == dict.fromkeys(PD_NAMES, 0)
    expected = {prefill: (1, 1), prefill2: (1, 0), decode: (1, 0)}
    text = metrics(h)
    assert 'lmproxy_pd_requests_total{outcome="failed",role="prefill"} 1.0' in text
    assert 'lmproxy_pd_requests_total{outcome="ok",role="prefill"} 1.0' in text
    assert 'lmproxy_pd_requests_total{outcome="ok",role="decode"} 1.0' in text
    if mode == "sglang":
        # The first pair's decode, sent beside the failed prefill, was stopped: counted
        # as a request, not as its error, yet as a failed decode step.
        (first_decode,) = first_decodes
        assert backends[first_decode][1].closing and first_decode != decode
        expected[first_decode] = (1, 0)
        assert 'lmproxy_pd_requests_total{outcome="failed",role="decode"} 1.0' in text
    else:
        assert first_decodes == []
        assert 'outcome="failed",role="decode"' not in text
    assert {n: c for n, c in counts(h).items() if c != (0, 0)} == expected
    assert h.router.registry.services[prefill].breaker.failures == 1  # a 5xx: its step
    (line,) = access(caplog)
    assert (line["status"], line["service"]) == (200, f"prefill={prefill2},decode={decode}")


async def test_a_client_gone_while_the_vllm_prefill_runs_closes_it(caplog):
    caplog.set_level(logging.INFO, "lmproxy.access")
    h, backends = pd_harness("vllm")
    client, downstream = h.client()
    client.data_received(chat_request())
    await h.turn()
    (prefill,) = sent(backends, "p")
    client.connection_lost(None)
    await h.turn()
    assert backends[prefill][1].closing  # its work is stopped
    assert downstream.take() == b""
    assert sent(backends, "d") == [] and sent(backends, "p") == []
    assert slots(h) == dict.fromkeys(PD_NAMES, 0)
    # A prefill given up unanswered is not counted as a request (nor as an error).
    assert counts(h) == dict.fromkeys(PD_NAMES, (0, 0))
    (line,) = access(caplog)
    # Today the line reads "prefill=p1,decode=p1": the prefill is named as the decode
    # too, though no decode was chosen. Only the part that is right is held to here.
    assert line["status"] == 499 and line["service"].startswith(f"prefill={prefill}")


async def test_a_client_gone_while_both_sglang_sides_run_closes_both(caplog):
    caplog.set_level(logging.INFO, "lmproxy.access")
    h, backends = pd_harness("sglang")
    client, downstream = h.client()
    client.data_received(chat_request())
    prefill, decode = await start_pair(h, backends, "sglang")
    client.connection_lost(None)
    await h.turn()
    assert backends[prefill][1].closing and backends[decode][1].closing
    assert downstream.take() == b""
    assert sent(backends, "") == []
    assert slots(h) == dict.fromkeys(PD_NAMES, 0)
    # The decode the client left is counted as a request (as a whole request's is);
    # the prefill given up with it is not.
    assert {n: c for n, c in counts(h).items() if c != (0, 0)} == {decode: (1, 0)}
    (line,) = access(caplog)
    assert (line["status"], line["service"]) == (499, f"prefill={prefill},decode={decode}")


# --- fallbacks: a model whose only service cannot answer ------------------------------

BACKUP = "backup-8B"


def fallback_harness(first_url: str | None = None, **settings: Any) -> Harness:
    """MODEL on service ``a`` (at ``first_url``, if given), falling back to BACKUP on
    service ``b``; the access log in JSON."""
    first = spec("a", 0) if first_url is None else spec("a", 0, url=first_url)
    specs = [first, spec("b", 1, models=[BACKUP])]
    models = {MODEL: ModelSettings(fallbacks=[BACKUP])}
    return Harness(specs=specs, models=models, access_log="json", **settings)


@pytest.mark.parametrize("how", ["503", "unreachable"])
async def test_a_fallback_answers_when_the_models_service_cannot(how, caplog):
    caplog.set_level(logging.INFO, "lmproxy.access")
    h = fallback_harness(f"http://127.0.0.1:{free_port()}" if how == "unreachable" else None)
    b, b_sent = h.backend("b")
    if how == "503":
        a, a_sent = h.backend("a")
    # Else a's pool has no connection: it connects, to a port nothing listens on.
    client, downstream = h.client()
    client.data_received(chat_request())
    if how == "503":
        await h.turn()
        assert a_sent.take().endswith(BODY)
        a.data_received(response(b'{"error":"overloaded"}', b"503 Service Unavailable"))
        await h.turn()
        assert a_sent.closing  # its answer is dropped, unread
    await until(lambda: b_sent.written, "the fallback's request")
    forwarded = b_sent.take()
    assert json.loads(body_of(forwarded))["model"] == BACKUP  # the body names it
    b.data_received(response(b'{"id":"from-b"}'))
    await h.turn()
    answer = downstream.take()
    assert statuses(answer) == [200] and body_of(answer) == b'{"id":"from-b"}'
    assert header(answer, b"X-LMProxy-Model") == BACKUP.encode()
    assert b"overloaded" not in answer
    assert f'lmproxy_fallbacks_total{{model="{MODEL}",to="{BACKUP}"}} 1.0' in metrics(h)
    assert slots(h) == {"a": 0, "b": 0}
    # A 503 is an answer (and an error); a refused connect an error only.
    assert counts(h) == {"a": (1, 1) if how == "503" else (0, 1), "b": (1, 0)}
    (line,) = access(caplog)
    assert (line["status"], line["service"], line["model"]) == (200, "b", BACKUP)
    assert line["fallback_from"] == MODEL
