"""The engines' own load: scraped from their /metrics, weighed with the router's count."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Mock, Router, request, router_over, wait_until

from lmproxy.config import ServiceSpec
from lmproxy.fleet.load import LoadScraper, PageRefused, PageScan, parse
from lmproxy.fleet.roster import Roster
from strategies.least_outstanding import LeastOutstanding

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="a"} 3.0
vllm:num_requests_running{engine="0",model_name="b"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="a"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="a"} 0.42
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="a"} 5.0
vllm:time_to_first_token_seconds_count{model_name="a"} 9.0
"""


def test_parse_reads_vllm_sglang_and_the_deprecated_name():
    # Summed over model_name (the models share the engine's batch), each model's kept;
    # histograms ignored.
    assert parse(VLLM) == (4, 7, 0.42, {"a": (3, 7), "b": (1, 0)})
    old = "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc 0.5\n"
    assert parse(VLLM.replace("kv_cache_usage_perc", "x_other") + old)[:3] == (4, 7, 0.5)
    sglang = (
        'sglang:num_running_reqs{model_name="m"} 2\n'
        'sglang:num_queue_reqs{model_name="m"} 11\n'
        'sglang:token_usage{model_name="m"} 0.25\n'
    )
    assert parse(sglang) == (2, 11, 0.25, {"m": (2, 11)})

    # A page cannot grow the registry without bound: MAX_SERIES series per family, then
    # the page is refused (summing 500 would take a flood for the engine's load).
    def flood(count: int) -> str:
        return "".join(f'vllm:num_requests_running{{model_name="m{i}"}} 1\n' for i in range(count))

    figures = parse(flood(64))
    assert figures is not None and figures.running == 64 and len(figures.models) == 64
    with pytest.raises(PageRefused, match="vllm:num_requests_running has over 64 series"):
        parse(flood(500))
    assert parse("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3\n") is None
    assert parse("") is None
    # Longer names are other families; escaped label values and a last line without its
    # newline are read as Prometheus writes them.
    page = (
        'sglang:num_running_reqs_offline_batch{model_name="m"} 9\n'
        'vllm:num_requests_running{model_name="a\\"b",engine="0"} 2 1712345678\n'
        "vllm:num_requests_waiting 5"
    )
    assert parse(page) == (2, 5, None, {'a"b': (2, 0)})
    for bad in ("NaN", "-1", "+Inf", "x"):
        with pytest.raises(PageRefused, match="is not a count"):
            parse(f"vllm:num_requests_waiting {bad}\n")


async def test_a_page_that_does_not_parse_costs_one_scrape_not_the_loop():
    roster = Roster()
    service = roster.add(ServiceSpec(url="http://127.0.0.1:1", name="odd"))
    pages = iter([b'vllm:num_requests_running{model_name="a" 3\n', VLLM.encode()])

    async def fetch(*args: object, sink: Callable[[bytes], None]) -> tuple[int, bytes]:
        sink(next(pages))
        return 200, b""

    scraper = LoadScraper(roster, 1.0, 1.0, fetch=fetch)
    await scraper.scrape(service)  # garbage: no figure, no exception, asked again later
    assert service.engine_at is None and not service.metrics_missing
    await scraper.scrape(service)
    assert (service.engine_running, service.engine_waiting) == (4, 7)


def test_the_engines_other_traffic_counts_only_while_fresh():
    roster = Roster()
    busy = roster.add(ServiceSpec(url="http://127.0.0.1:1", name="busy"))
    idle = roster.add(ServiceSpec(url="http://127.0.0.1:2", name="idle"))
    busy.in_flight = 2  # the router's own: the engine counts them among its 2 + 50
    roster.engine_load(busy, 2, 50, 0.9, at=0.0)
    assert busy.engine_extra == 50
    strategy = LeastOutstanding()
    busy.in_flight, idle.in_flight = 0, 3
    assert strategy.choose([busy, idle], None) is idle  # type: ignore[arg-type]
    roster.engine_stale(busy)  # too old to trust: the router's own count decides
    assert busy.engine_extra == 0
    assert strategy.choose([busy, idle], None) is busy  # type: ignore[arg-type]


def test_a_full_engine_is_passed_over_by_miss_placement():
    from strategies.placement import Rendezvous

    roster = Roster()
    pool = [roster.add(ServiceSpec(url=f"http://127.0.0.1:{i}", name=f"s{i}")) for i in (1, 2, 3)]
    keys = range(300)
    owners = {k: Rendezvous().choose(pool, k, 0.25) for k in keys}
    full = owners[0]
    roster.engine_load(full, 8, 2, None, at=0.0)  # its batch is full: 2 wait
    assert full.engine_full
    assert all(Rendezvous().choose(pool, k, 0.25) is not full for k in keys)
    # Keys it did not own stay where they were.
    kept = [k for k in keys if owners[k] is not full]
    assert all(Rendezvous().choose(pool, k, 0.25) is owners[k] for k in kept)
    roster.engine_stale(full)
    assert not full.engine_full and Rendezvous().choose(pool, 0, 0.25) is full


def _flood(port: int, count: int) -> list[socket.socket]:
    """``count`` streamed requests straight to a service, bypassing the router, never read."""
    body = json.dumps(
        {"model": "Qwen3-32B", "messages": [{"role": "user", "content": "x"}], "stream": True}
    ).encode()
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Mock-Token-Delay: 5\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        held.append(sock)
    return held


def test_an_engine_busy_with_traffic_from_elsewhere_is_avoided(spawn):
    idle = spawn(Mock, "idle", ["Qwen3-32B"])
    busy = spawn(Mock, "busy", ["Qwen3-32B"], "--max-batch", "1")
    held = _flood(busy.port, 51)  # 1 running, 50 waiting: none of it through the router
    try:
        wait_until(lambda: busy.stats()["waiting"] == 50, 10, "the direct traffic to queue")
        for strategy in ("least-outstanding", "power-of-two", "cache-aware"):
            router = router_over(
                spawn, [idle, busy], "--strategy", strategy, "--load-interval", "0.2"
            )

            def scraped(router: Router = router) -> bool:
                engine = router.stats_of("busy")["engine"]
                return bool(engine) and engine["waiting"] == 50

            wait_until(scraped, 10, "the scrape")
            served = collections.Counter()
            for i in range(100):
                body = {
                    "model": "Qwen3-32B",
                    "max_tokens": 1,
                    "messages": [{"role": "user", "content": f"question {i} " + "words " * 60}],
                }
                resp = router.post("/v1/chat/completions", body)
                assert resp.status == 200, resp
                served[resp.headers["x-mock-server"]] += 1
            assert served["idle"] >= 90, (strategy, served)
            engine = router.stats_of("busy")["engine"]
            assert engine["running"] == 1 and engine["counted"] >= 50 and engine["age_s"] < 2
            assert engine["models"] == {"Qwen3-32B": {"running": 1, "waiting": 50}}
            metrics = router.get("/metrics").body.decode()
            assert 'lmproxy_engine_waiting_requests{service="busy"} 50.0' in metrics
            router.stop()
    finally:
        for sock in held:
            sock.close()


def test_a_service_without_load_metrics_is_asked_once(spawn):
    plain = spawn(Mock, "plain", ["Qwen3-32B"], "--metrics", "none")
    router = router_over(spawn, [plain], "--load-interval", "0.1", "--health-interval", "0.2")
    wait_until(lambda: "has no engine load figures" in router.output, 5, "the one try")
    asked = plain.stats()["paths"].count("/metrics")
    # About ten load intervals later (five health checks), it was not asked again.
    wait_until(lambda: plain.stats()["paths"].count("/health") >= 6, 10, "more health checks")
    assert plain.stats()["paths"].count("/metrics") == asked == 1
    assert router.stats_of("plain")["engine"] is None
    assert request(router.port, "GET", "/health").status == 200


def _python_calls(work: Callable[[], Any]) -> int:
    """How many Python and builtin function calls ``work`` makes (its own included)."""
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        work()
    except PageRefused:
        pass
    finally:
        sys.setprofile(None)
    return calls


def test_a_page_costs_python_work_for_the_wanted_lines_only_not_for_the_page():
    from lmproxy.sim.metrics import flood_metrics

    flood = flood_metrics()  # what the metrics-flood fault serves: 4 MiB, 200,000 lines
    assert len(flood) > 4_000_000 and flood.count(b"\n") == 200_000
    with pytest.raises(PageRefused, match="over 64 series"):
        parse(flood.decode())
    # Parsing the whole page makes a bounded number of calls: MAX_SERIES lines, not
    # 70,000 (nor 200,000).
    assert _python_calls(lambda: parse(flood.decode())) < 2_000
    # An honest page as large: histograms, and its figures at the end, read in the
    # 64 KiB pieces a probe hands over.
    honest = "".join(f'h_bucket{{le="{i}"}} 5\n' for i in range(200_000)) + VLLM
    scan = PageScan()

    def feed() -> None:
        page = honest.encode()
        for at in range(0, len(page), 65536):
            scan.feed(page[at : at + 65536])

    assert _python_calls(feed) < 2_000
    assert scan.figures() == (4, 7, 0.42, {"a": (3, 7), "b": (1, 0)})
    assert scan.lines == 4  # the four sample lines of the wanted families


def test_a_metrics_flood_is_refused_once_and_bystanders_are_served(spawn):
    # 4 MiB of /metrics, 70,000 vllm:num_requests_running series, every 0.1 s: the
    # supervisor (which scrapes for its workers) and the workers go on serving another
    # service's clients.
    flood = spawn(Mock, "flood", ["other"], "--fault", "metrics-flood")
    calm = spawn(Mock, "calm", ["Qwen3-32B"])
    router = router_over(spawn, [flood, calm], "--load-interval", "0.1", "--workers", "2")
    refusal = "/metrics refused: vllm:num_requests_running has over 64 series"
    wait_until(lambda: refusal in router.output, 10, "the refusal")
    asked = flood.stats()["requests"]  # its scrapes, and a health check now and then
    deadline = time.monotonic() + 20
    while flood.stats()["requests"] < asked + 10:
        assert router.get("/health").status == 200
        resp = router.post(
            "/v1/chat/completions",
            {"model": "Qwen3-32B", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]},
        )
        assert resp.status == 200, resp
        assert time.monotonic() < deadline, "the scrapes stopped"
    # The flood is not taken for the engine's load: it has none the router knows.
    assert router.stats_of("flood")["engine"] is None
    assert router.stats_of("calm")["engine"]["running"] == 0
    assert router.output.count(refusal) == 1


async def test_a_scrape_that_raises_costs_its_service_a_back_off_not_the_loop(caplog):
    roster = Roster()
    good = roster.add(ServiceSpec(url="http://127.0.0.1:1", name="good"))
    bad = roster.add(ServiceSpec(url="http://127.0.0.1:2", name="bad"))
    for service in (good, bad):
        roster.probe_passed(service, None)
    asked = collections.Counter()
    failure: list[Exception | None] = [RuntimeError("the scrape broke")]

    async def fetch(
        service: Any, *args: object, sink: Callable[[bytes], None]
    ) -> tuple[int, bytes]:
        asked[service.name] += 1
        if service is bad and failure[0] is not None:
            raise failure[0]
        sink(VLLM.encode())
        return 200, b""

    async def until(what: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not what():
                await asyncio.sleep(0.01)

    def logged(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)

    caplog.set_level(logging.INFO, "lmproxy")
    scraper = LoadScraper(roster, 0.02, 1.0, fetch=fetch)
    scraper.start()
    try:
        await until(lambda: asked["good"] >= 30)
        # The other service is scraped on; the failing one less and less often (0.02 s,
        # then twice as long each time), and its failure is logged once.
        assert good.engine_running == 4
        assert 2 <= asked["bad"] < 10 and bad.engine_at is None
        assert logged("the scrape broke") == 1
        failure[0] = ValueError("something else")  # another cause: logged too
        await until(lambda: logged("something else") == 1)
        failure[0] = None  # it answers again: retried, read
        await until(lambda: bad.engine_running == 4)
        assert logged("the scrape broke") == 1 and logged("something else") == 1
    finally:
        await scraper.stop()


def test_a_model_list_nested_too_deep_fails_the_check_with_a_reason(spawn):
    deep = spawn(Mock, "deep", ["Qwen3-32B"], "--fault", "models-deep")
    router = spawn(
        Router, "--backend", deep.backend_arg(), "--health-interval", "0.1", "--load-interval", "0"
    )

    def reason() -> str:
        return router.stats_of("deep")["last_error"] or ""

    wait_until(lambda: "nested more than 64 levels deep" in reason(), 10, "the failed check")
    assert "/v1/models is not an OpenAI model list" in reason()
    # The checks go on (the discovery retry), and pass once the listing is sane.
    asked = deep.stats()["paths"].count("/v1/models")
    wait_until(lambda: deep.stats()["paths"].count("/v1/models") >= asked + 2, 10, "more checks")
    deep.set_fault("none")
    router.wait_healthy(1)
    assert "failed unexpectedly" not in router.output and "RecursionError" not in router.output
