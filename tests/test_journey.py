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
import time
from typing import Any

import pytest
from conftest import free_port
from inproc import BODY, MODEL, Harness, MemoryTransport, chat_request, spec

from lmproxy.backend.upstream import UpstreamConnection
from lmproxy.config import KeySpec, ModelSettings, ServiceSpec
from lmproxy.keys.limits import Key, Refusal
from strategies import BaseStrategy, Option

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


async def settle(h: Harness) -> None:
    """Let the loop run what the router scheduled: more turns than today's request path
    takes (three), so that a path with a step or two more still settles."""
    await h.turn(10)


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
    return {name: s.in_flight for name, s in h.router.roster.services.items()}


def counts(h: Harness) -> dict[str, tuple[int, int]]:
    """Each service's (request_count, error_count)."""
    return {name: (s.request_count, s.error_count) for name, s in h.router.roster.services.items()}


def sent(backends: Backends, prefix: str) -> list[str]:
    """The services named ``prefix``... whose backend was sent something since the last
    look (each such transport's writes are taken)."""
    return [n for n, (_, t) in backends.items() if n.startswith(prefix) and t.take()]


def metrics(h: Harness) -> str:
    return h.router.metrics.render().decode()


# --- disaggregation: a vLLM or SGLang fleet of two prefills and two decodes -------------

PD_NAMES = ("p1", "p2", "d1", "d2")
PD_SPECS = [
    spec("p1", 0, role="prefill", bootstrap_port=8998),
    spec("p2", 1, role="prefill", bootstrap_port=8998),
    spec("d1", 2, role="decode"),
    spec("d2", 3, role="decode"),
]
PREFILL_OK = response(
    b'{"id":"p","choices":[],"kv_transfer_params":{"remote_engine_id":"e1","remote_block_ids":[1]}}'
)


def decode_ok(name: str) -> bytes:
    return response(b'{"id":"%s","object":"chat.completion"}' % name.encode())


def pd_harness(mode: str, **settings: Any) -> tuple[Harness, Backends]:
    """Prefills p1, p2 and decodes d1, d2 of MODEL, each side chosen in turn, each with
    one pooled connection; the access log in JSON."""
    settings.setdefault("prefill_strategy", "round-robin")
    settings.setdefault("decode_strategy", "round-robin")
    h = Harness(specs=PD_SPECS, pd_mode=mode, access_log="json", **settings)
    return h, {name: h.backend(name) for name in PD_NAMES}


async def start_pair(h: Harness, backends: Backends, mode: str) -> tuple[str, str]:
    """After the client's request: the pair it was given, (prefill, decode). vLLM's
    decode is sent once the prefill answered (here: at once, with PREFILL_OK)."""
    await settle(h)
    (prefill,) = sent(backends, "p")
    if mode == "vllm":
        assert sent(backends, "d") == []  # the decode waits for the prefill's answer
        backends[prefill][0].data_received(PREFILL_OK)
        await settle(h)
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
    await settle(h)
    assert downstream.take() == b""  # nothing of it reached the client
    assert backends[decode][1].closing
    prefill2, decode2 = await start_pair(h, backends, mode)
    assert decode2 != decode  # the failed decode is not tried again
    if mode == "sglang":
        # The first pair's prefill, still running, is given up with its pair.
        assert backends[prefill][1].closing
        backends[prefill2][0].data_received(PREFILL_OK)
    backends[decode2][0].data_received(decode_ok(decode2))
    await settle(h)
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
    await settle(h)
    (prefill,) = sent(backends, "p")
    decodes = sent(backends, "d")
    backends[prefill][0].data_received(PREFILL_400)
    await settle(h)
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
    assert h.router.roster.services[prefill].breaker.failures == 0
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
    await settle(h)
    (prefill,) = sent(backends, "p")
    first_decodes = sent(backends, "d")
    backends[prefill][0].data_received(
        response(b'{"error":"engine died"}', b"500 Internal Server Error")
    )
    await settle(h)
    assert downstream.take() == b""
    prefill2, decode = await start_pair(h, backends, mode)
    assert prefill2 != prefill
    if mode == "sglang":
        backends[prefill2][0].data_received(PREFILL_OK)
    backends[decode][0].data_received(decode_ok(decode))
    await settle(h)
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
    assert h.router.roster.services[prefill].breaker.failures == 1  # a 5xx: its step
    (line,) = access(caplog)
    assert (line["status"], line["service"]) == (200, f"prefill={prefill2},decode={decode}")


async def test_a_client_gone_while_the_vllm_prefill_runs_closes_it(caplog):
    caplog.set_level(logging.INFO, "lmproxy.access")
    h, backends = pd_harness("vllm")
    client, downstream = h.client()
    client.data_received(chat_request())
    await settle(h)
    (prefill,) = sent(backends, "p")
    client.connection_lost(None)
    await settle(h)
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
    await settle(h)
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


FALLBACKS = {MODEL: ModelSettings(fallbacks=[BACKUP])}


def fallback_specs(first_url: str | None = None) -> list[ServiceSpec]:
    """MODEL on service ``a`` (at ``first_url``, if given), BACKUP on service ``b``."""
    first = spec("a", 0) if first_url is None else spec("a", 0, url=first_url)
    return [first, spec("b", 1, models=[BACKUP])]


def fallback_harness(first_url: str | None = None) -> Harness:
    return Harness(specs=fallback_specs(first_url), models=FALLBACKS, access_log="json")


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
        await settle(h)
        assert a_sent.take().endswith(BODY)
        a.data_received(response(b'{"error":"overloaded"}', b"503 Service Unavailable"))
        await settle(h)
        assert a_sent.closing  # its answer is dropped, unread
    await until(lambda: b_sent.written, "the fallback's request")
    forwarded = b_sent.take()
    assert json.loads(body_of(forwarded))["model"] == BACKUP  # the body names it
    b.data_received(response(b'{"id":"from-b"}'))
    await settle(h)
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


# --- a [[keys]] key's grant: ended once, whatever the end ------------------------------

KEY = b"Authorization: Bearer sk-k\r\n"
TPM = 60  # a token a second: a charge of T tokens puts the bucket T seconds ahead
USAGE = b'{"id":"x","object":"chat.completion","usage":{"prompt_tokens":7,"completion_tokens":3}}'
USED = (7, 3)
STREAM = BODY.replace(b"}", b',"stream":true}')
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
EVENT = b'data: {"choices":[{"delta":{"content":"tok "}}]}\n\n'
CHUNK = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)


def keyed(max_in_flight: int = 1, **settings: Any) -> Harness:
    """A Harness whose requests carry KEY: key k, with max_in_flight, rpm and tpm."""
    key = KeySpec(name="k", key="sk-k", max_in_flight=max_in_flight, rpm=1000, tpm=TPM)
    return Harness(keys=[key], **settings)


def estimate(body: bytes) -> int:
    """The prompt tokens charged for ``body`` when no usage came: its bytes / 4."""
    return len(body) // 4


def assert_ended_once(h: Harness, tokens: tuple[int, int]) -> None:
    """The key's grant came back exactly once (a second end would leave -1 under way,
    a slot more than max_in_flight), charged ``tokens`` once."""
    limits = h.router.limits
    assert limits.under_way("k") == 0
    figures = h.router.metrics.key_counts()["k"]
    assert (figures["prompt_tokens"], figures["completion_tokens"]) == tokens
    full_at = limits.counts["k"].tokens_full_at  # type: ignore[attr-defined]
    if sum(tokens) == 0:
        assert full_at == 0.0
    else:
        # Filled T seconds ahead at the charge, less the time since; twice would be 2T.
        ahead = full_at - time.monotonic()
        assert sum(tokens) / 2 < ahead <= sum(tokens), ahead


async def one_request(h: Harness, body: bytes = BODY) -> tuple[Any, MemoryTransport]:
    client, downstream = h.client()
    client.data_received(chat_request(body, extra=KEY))
    await settle(h)
    return client, downstream


async def sweep_until(h: Harness, downstream: MemoryTransport) -> bytes:
    """Run the router's sweep until ``downstream`` has an answer."""

    def answered() -> bool:
        h.sweep()
        return bool(downstream.written)

    await until(answered, "the sweep's answer")
    return downstream.take()


async def key_done() -> tuple[Harness, tuple[int, int]]:
    h = keyed()
    backend, _ = h.backend()
    _, downstream = await one_request(h)
    backend.data_received(response(USAGE))
    await settle(h)
    assert statuses(downstream.take()) == [200]
    return h, USED


async def key_gone_before_the_head() -> tuple[Harness, tuple[int, int]]:
    h = keyed()
    _, upstream = h.backend()
    client, _ = await one_request(h)
    assert upstream.take().endswith(BODY)
    client.connection_lost(None)
    await settle(h)
    assert upstream.closing
    return h, (estimate(BODY), 0)  # the prompt's estimate: the backend had it


async def key_gone_mid_stream() -> tuple[Harness, tuple[int, int]]:
    h = keyed()
    backend, upstream = h.backend()
    client, downstream = await one_request(h, STREAM)
    forwarded = body_of(upstream.take())  # with stream_options: a tpm key's stream
    assert b'"include_usage":true' in forwarded
    backend.data_received(STREAM_HEAD + CHUNK * 2)
    await settle(h)
    assert downstream.take().endswith(CHUNK * 2)
    client.connection_lost(None)
    await settle(h)
    assert upstream.closing
    return h, (estimate(forwarded), 2)  # and one token per event relayed


async def key_drop_then_retry() -> tuple[Harness, tuple[int, int]]:
    h = keyed(names=("a", "b"), strategy="round-robin")
    a, _ = h.backend("a")
    b, _ = h.backend("b")
    _, downstream = await one_request(h)
    a.data_received(b"HTTP/1.1 2")  # a byte or two, then the close: dropped
    a.connection_lost(None)
    await settle(h)
    b.data_received(response(USAGE))
    await settle(h)
    assert statuses(downstream.take()) == [200]
    assert counts(h) == {"a": (1, 1), "b": (1, 0)}
    return h, USED


async def key_drop_without_retry() -> tuple[Harness, tuple[int, int]]:
    h = keyed(retries=0)
    backend, _ = h.backend()
    _, downstream = await one_request(h)
    backend.data_received(b"HTTP/1.1 2")
    backend.connection_lost(None)
    await settle(h)
    assert statuses(downstream.take()) == [502]
    return h, (0, 0)


async def key_timeout() -> tuple[Harness, tuple[int, int]]:
    h = keyed(request_timeout=0.001)
    _, upstream = h.backend()
    _, downstream = await one_request(h)
    assert statuses(await sweep_until(h, downstream)) == [504]
    assert upstream.closing
    return h, (0, 0)


async def key_queue_timeout() -> tuple[Harness, tuple[int, int]]:
    """The second request waits for the service's one slot, and waits too long."""
    h = keyed(2, specs=[spec("a", 0, max_in_flight=1)], queue_timeout=0.001)
    backend, _ = h.backend()
    _, first = await one_request(h)
    _, second = await one_request(h)
    assert statuses(await sweep_until(h, second)) == [429]
    assert h.router.limits.under_way("k") == 1  # the first's
    backend.data_received(response(USAGE))
    await settle(h)
    assert statuses(first.take()) == [200]
    return h, USED


async def key_queue_shed_and_left() -> tuple[Harness, tuple[int, int]]:
    """With --max-queue 1: the third request is shed; the second's client hangs up
    while it waits; the fourth waits its turn and is served."""
    h = keyed(4, specs=[spec("a", 0, max_in_flight=1)], max_queue=1)
    backend, _ = h.backend()
    _, first = await one_request(h)
    second, _ = await one_request(h)
    _, third = await one_request(h)
    assert statuses(third.take()) == [429]
    second.connection_lost(None)
    await settle(h)
    assert h.router.limits.under_way("k") == 1
    _, fourth = await one_request(h)
    backend.data_received(response(USAGE))
    await settle(h)
    assert statuses(first.take()) == [200] and fourth.take() == b""
    backend.data_received(response(USAGE))
    await settle(h)
    assert statuses(fourth.take()) == [200]
    return h, (14, 6)


def raising(method: str, **settings: Any) -> Harness:
    return keyed(
        strategy="raising_strategy:Raising",
        strategy_options={"raise_in": method, "times": 1},
        **settings,
    )


async def key_strategy_raises_on_start() -> tuple[Harness, tuple[int, int]]:
    h = raising("on_start")
    h.backend()
    _, downstream = await one_request(h)
    assert statuses(downstream.take()) == [502]
    return h, (0, 0)


async def key_strategy_raises_on_first_byte() -> tuple[Harness, tuple[int, int]]:
    h = raising("on_first_byte")
    backend, _ = h.backend()
    _, downstream = await one_request(h)
    backend.data_received(response(USAGE))
    await settle(h)
    assert statuses(downstream.take()) == [502]
    return h, (0, 0)


async def key_strategy_raises_on_end_after_the_answer() -> tuple[Harness, tuple[int, int]]:
    h = raising("on_end")
    backend, _ = h.backend()
    _, downstream = await one_request(h)
    backend.data_received(response(USAGE))
    await settle(h)
    assert statuses(downstream.take()) == [200]  # complete before on_end raised
    return h, USED


async def key_fallback() -> tuple[Harness, tuple[int, int]]:
    h = keyed(specs=fallback_specs(), models=FALLBACKS)
    a, _ = h.backend("a")
    b, _ = h.backend("b")
    _, downstream = await one_request(h)
    a.data_received(response(b"{}", b"503 Service Unavailable"))
    await settle(h)
    b.data_received(response(USAGE))
    await settle(h)
    answer = downstream.take()
    assert statuses(answer) == [200] and header(answer, b"X-LMProxy-Model") == BACKUP.encode()
    return h, USED


async def key_disaggregated(mode: str) -> tuple[Harness, tuple[int, int]]:
    h = keyed(specs=PD_SPECS, pd_mode=mode, prefill_strategy="round-robin")
    backends = {name: h.backend(name) for name in PD_NAMES}
    _, downstream = await one_request(h)
    prefill, decode = await start_pair(h, backends, mode)
    if mode == "sglang":
        backends[prefill][0].data_received(PREFILL_OK)
    backends[decode][0].data_received(response(USAGE))
    await settle(h)
    assert statuses(downstream.take()) == [200]
    return h, USED  # the decode's usage; the prefill's answer is not charged


async def key_disaggregated_vllm() -> tuple[Harness, tuple[int, int]]:
    return await key_disaggregated("vllm")


async def key_disaggregated_sglang() -> tuple[Harness, tuple[int, int]]:
    return await key_disaggregated("sglang")


async def key_disaggregated_pair_retry() -> tuple[Harness, tuple[int, int]]:
    h = keyed(specs=PD_SPECS, prefill_strategy="round-robin", decode_strategy="round-robin")
    backends = {name: h.backend(name) for name in PD_NAMES}
    _, downstream = await one_request(h)
    _, decode = await start_pair(h, backends, "vllm")
    backends[decode][0].data_received(b"HTTP/1.1 2")
    backends[decode][0].connection_lost(None)
    await settle(h)
    _, decode = await start_pair(h, backends, "vllm")
    backends[decode][0].data_received(response(USAGE))
    await settle(h)
    assert statuses(downstream.take()) == [200]
    return h, USED


async def key_disaggregated_gone_in_prefill() -> tuple[Harness, tuple[int, int]]:
    h = keyed(specs=PD_SPECS)
    backends = {name: h.backend(name) for name in PD_NAMES}
    client, _ = await one_request(h)
    assert sent(backends, "p")
    client.connection_lost(None)
    await settle(h)
    return h, (estimate(BODY), 0)  # the prefill had the prompt


async def key_disaggregated_prefill_4xx() -> tuple[Harness, tuple[int, int]]:
    h = keyed(specs=PD_SPECS)
    backends = {name: h.backend(name) for name in PD_NAMES}
    _, downstream = await one_request(h)
    (prefill,) = sent(backends, "p")
    backends[prefill][0].data_received(PREFILL_400)
    await settle(h)
    assert statuses(downstream.take()) == [400]
    return h, (0, 0)


@pytest.mark.parametrize(
    "scenario",
    [
        key_done,
        key_gone_before_the_head,
        key_gone_mid_stream,
        key_drop_then_retry,
        key_drop_without_retry,
        key_timeout,
        key_queue_timeout,
        key_queue_shed_and_left,
        key_strategy_raises_on_start,
        key_strategy_raises_on_first_byte,
        key_strategy_raises_on_end_after_the_answer,
        key_fallback,
        key_disaggregated_vllm,
        key_disaggregated_sglang,
        key_disaggregated_pair_retry,
        key_disaggregated_gone_in_prefill,
        key_disaggregated_prefill_4xx,
    ],
    ids=lambda scenario: scenario.__name__.removeprefix("key_"),
)
async def test_a_keys_grant_ends_once_on_every_exit(scenario):
    h, tokens = await scenario()
    assert_ended_once(h, tokens)
    assert all(n == 0 for n in slots(h).values())
    # Its max_in_flight slots are all there again, and not one more.
    key = Key(h.router.config.keys[0])
    verdicts = [h.router.limits.check(key) for _ in range(key.max_in_flight + 1)]
    assert [isinstance(v, Refusal) for v in verdicts] == [False] * key.max_in_flight + [True]


# --- a strategy plugin written against docs/strategies.md --------------------------------


class FewestTokens(BaseStrategy):
    """docs/strategies.md's example plugin, as the doc writes it (with the doc's
    on_first_byte beside it), keeping a record of the calls it gets. Loaded as
    ``test_journey:FewestTokens``, the way a plugin in a plain file is."""

    summary = "fewest outstanding max_tokens"
    OPTIONS = {"default_tokens": Option(int, 256, "tokens assumed when max_tokens is unset")}

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.owed: dict[str, int] = {}  # service url -> tokens still owed
        self.calls: list[tuple[str, str]] = []

    def choose(self, candidates: Any, request: Any) -> Any:
        return min(candidates, key=lambda s: self.owed.get(s.url, 0))

    def on_start(self, service: Any, request: Any) -> None:
        tokens = (request.head and request.head.max_tokens) or self.opt["default_tokens"]
        request.memo = tokens  # scratch space that travels with the request
        self.owed[service.url] = self.owed.get(service.url, 0) + tokens
        self.calls.append(("start", service.name))

    def on_first_byte(self, service: Any, request: Any, ttfb_s: float) -> None:
        self.calls.append(("first_byte", service.name))

    def on_end(self, service: Any, request: Any, latency_s: float, ok: bool) -> None:
        self.owed[service.url] -= request.memo
        self.calls.append(("end", service.name))


PLUGIN = "test_journey:FewestTokens"


def starts_and_ends(strategy: Any) -> list[tuple[str, str]]:
    """The plugin's on_start and on_end calls, in order; each start is followed by its
    end before that service's next start, and nothing is left owed."""
    assert isinstance(strategy, FewestTokens)
    calls = [c for c in strategy.calls if c[0] != "first_byte"]
    open_: set[str] = set()
    for kind, name in calls:
        if kind == "start":
            assert name not in open_, calls
            open_.add(name)
        else:
            assert name in open_, calls  # an end without its start
            open_.remove(name)
    assert not open_, calls  # a start without its end
    assert all(owed == 0 for owed in strategy.owed.values()), strategy.owed
    return calls


async def test_the_docs_plugin_routes_and_is_told_each_start_and_end_once():
    h = Harness(("a", "b"), strategy=PLUGIN)
    strategy = h.router.strategy
    assert isinstance(strategy, FewestTokens) and strategy.opt["default_tokens"] == 256
    a, _ = h.backend("a")
    b, _ = h.backend("b")
    # A stream under way on a: the next request goes where less is owed, b.
    first, first_out = h.client()
    first.data_received(chat_request(STREAM))
    a.data_received(STREAM_HEAD + CHUNK)
    second, second_out = h.client()
    second.data_received(chat_request())
    b.data_received(response(USAGE))
    await settle(h)
    assert statuses(second_out.take()) == [200]
    a.data_received(b"0\r\n\r\n")
    await settle(h)
    assert first_out.take().endswith(b"0\r\n\r\n")
    assert starts_and_ends(strategy) == [("start", "a"), ("start", "b"), ("end", "b"), ("end", "a")]
    assert [c for c in strategy.calls if c[0] == "first_byte"] == [
        ("first_byte", "a"),
        ("first_byte", "b"),
    ]
    # A 500 dropped for another service's answer: each try is started and ended once.
    strategy.calls.clear()
    a, _ = h.backend("a")
    client, downstream = h.client()
    client.data_received(chat_request())
    a.data_received(response(b'{"error":"engine died"}', b"500 Internal Server Error"))
    await settle(h)
    b.data_received(response(USAGE))
    await settle(h)
    assert statuses(downstream.take()) == [200]
    assert starts_and_ends(strategy) == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b")]
    # A client gone mid-stream: one start, one end.
    strategy.calls.clear()
    a, _ = h.backend("a")
    client, downstream = h.client()
    client.data_received(chat_request(STREAM))
    a.data_received(STREAM_HEAD + CHUNK)
    await settle(h)
    client.connection_lost(None)
    await settle(h)
    assert starts_and_ends(strategy) == [("start", "a"), ("end", "a")]
    assert slots(h) == {"a": 0, "b": 0}


@pytest.mark.parametrize("mode", ["vllm", "sglang"])
async def test_the_docs_plugin_on_each_side_of_a_disaggregated_request(mode):
    h, spares = pd_harness(mode, prefill_strategy=PLUGIN, decode_strategy=PLUGIN)
    # A second pooled connection each (taken after these): the plugin may choose a
    # service again whose connection went with the first pair.
    backends = {name: h.backend(name) for name in PD_NAMES}
    prefills, decodes = h.router.prefill_strategy, h.router.decode_strategy
    assert prefills is not decodes
    client, downstream = h.client()
    client.data_received(chat_request())
    prefill, decode = await start_pair(h, backends, mode)
    # The decode fails before its head: a new pair, each side started and ended again.
    backends[decode][0].data_received(b"HTTP/1.1 2")
    backends[decode][0].connection_lost(None)
    await settle(h)
    for name, (_, transport) in list(backends.items()):
        if transport.closing:
            backends[name] = spares[name]
    prefill2, decode2 = await start_pair(h, backends, mode)
    if mode == "sglang":
        backends[prefill2][0].data_received(PREFILL_OK)
    backends[decode2][0].data_received(decode_ok(decode2))
    await settle(h)
    assert statuses(downstream.take()) == [200]
    assert starts_and_ends(prefills) == [
        ("start", prefill),
        ("end", prefill),
        ("start", prefill2),
        ("end", prefill2),
    ]
    assert starts_and_ends(decodes) == [
        ("start", decode),
        ("end", decode),
        ("start", decode2),
        ("end", decode2),
    ]
    assert ("first_byte", decode2) in decodes.calls
    # The prefill's head reaches no on_first_byte today; that is left unasserted.
    assert slots(h) == dict.fromkeys(PD_NAMES, 0)


def test_a_plugin_may_still_import_route_request_where_the_docs_named_it():
    """docs/strategies.md named ``lmproxy.request.RouteRequest`` before the modules moved."""
    from lmproxy.client.request import RouteRequest as Moved
    from lmproxy.request import RouteRequest

    assert RouteRequest is Moved
