"""The engines' own load: scraped from their /metrics, weighed with the router's count."""

from __future__ import annotations

import collections
import json
import socket

from conftest import Mock, Router, request, router_over, wait_until

from lmproxy.config import ServiceSpec
from lmproxy.load import parse
from lmproxy.registry import Registry
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
    # A page cannot grow the registry without bound: at most MAX_MODELS models are kept.
    flood = "".join(f'vllm:num_requests_running{{model_name="m{i}"}} 1\n' for i in range(500))
    figures = parse(flood)
    assert figures is not None and figures.running == 500 and len(figures.models) == 64
    assert parse("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 3\n") is None
    assert parse("") is None


async def test_a_page_that_does_not_parse_costs_one_scrape_not_the_loop(monkeypatch):
    from lmproxy import load

    registry = Registry()
    service = registry.add(ServiceSpec(url="http://127.0.0.1:1", name="odd"))
    pages = iter([b'vllm:num_requests_running{model_name="a" 3\n', VLLM.encode()])

    async def fake_get(*args: object, **kwargs: object) -> tuple[int, bytes]:
        return 200, next(pages)

    monkeypatch.setattr(load, "probe", fake_get)
    scraper = load.LoadScraper(registry, 1.0, 1.0)
    await scraper.scrape(service)  # garbage: no figure, no exception, asked again later
    assert service.engine_at is None and not service.metrics_missing
    await scraper.scrape(service)
    assert (service.engine_running, service.engine_waiting) == (4, 7)


def test_the_engines_other_traffic_counts_only_while_fresh():
    registry = Registry()
    busy = registry.add(ServiceSpec(url="http://127.0.0.1:1", name="busy"))
    idle = registry.add(ServiceSpec(url="http://127.0.0.1:2", name="idle"))
    busy.in_flight = 2  # the router's own: the engine counts them among its 2 + 50
    registry.engine_load(busy, 2, 50, 0.9, at=0.0)
    assert busy.engine_extra == 50
    strategy = LeastOutstanding()
    busy.in_flight, idle.in_flight = 0, 3
    assert strategy.choose([busy, idle], None) is idle  # type: ignore[arg-type]
    registry.engine_stale(busy)  # too old to trust: the router's own count decides
    assert busy.engine_extra == 0
    assert strategy.choose([busy, idle], None) is busy  # type: ignore[arg-type]


def test_a_full_engine_is_passed_over_by_miss_placement():
    from strategies.placement import Rendezvous

    registry = Registry()
    pool = [registry.add(ServiceSpec(url=f"http://127.0.0.1:{i}", name=f"s{i}")) for i in (1, 2, 3)]
    keys = range(300)
    owners = {k: Rendezvous().choose(pool, k, 0.25) for k in keys}
    full = owners[0]
    registry.engine_load(full, 8, 2, None, at=0.0)  # its batch is full: 2 wait
    assert full.engine_full
    assert all(Rendezvous().choose(pool, k, 0.25) is not full for k in keys)
    # Keys it did not own stay where they were.
    kept = [k for k in keys if owners[k] is not full]
    assert all(Rendezvous().choose(pool, k, 0.25) is owners[k] for k in kept)
    registry.engine_stale(full)
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
