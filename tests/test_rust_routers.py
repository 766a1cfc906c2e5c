"""sglang-router's and vllm-router's interfaces: their launcher flags, their worker API,
the random policy, the router-wide concurrency limit and any model name."""

from __future__ import annotations

import collections
import http.client
import json
import socket
import threading
from urllib.parse import quote

import openai
import pytest
from conftest import Mock, Router, chat_body, free_port, request, wait_until
from test_strategies import route, services

from lmproxy import launchers
from lmproxy.cli import build_parser, load_config, parse
from lmproxy.config import ConfigError
from strategies.random import Random

# --- every flag: mapped, without effect, or refused (in process) --------------------


def test_the_launchers_flags_map_onto_lmproxys_settings():
    """What sglang-router's launcher passes (its test fixture's flags), setting for setting."""
    argv = [
        "--host", "127.0.0.1", "--port", "30000",
        "--worker-urls", "http://10.0.0.1:8000", "http://10.0.0.2:8000",
        "--policy", "round_robin",
        "--retry-max-retries", "3",
        "--cb-failure-threshold", "5", "--cb-success-threshold", "2",
        "--cb-timeout-duration-secs", "7",
        "--max-payload-size", "1000000",
        "--request-timeout-secs", "30",
        "--max-concurrent-requests", "4", "--queue-size", "2", "--queue-timeout-secs", "9",
        "--prometheus-port", "29001", "--prometheus-host", "127.0.0.2",
        "--health-check-interval-secs", "11", "--health-check-timeout-secs", "3",
        "--health-check-endpoint", "/ping",
        "--shutdown-grace-period-secs", "12",
        "--log-level", "warn",
        "--cache-threshold", "0.5",
    ]  # fmt: skip
    config = load_config(argv)
    assert config is not None
    assert (config.host, config.port) == ("127.0.0.1", 30000)
    assert [s.url for s in config.services] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert {s.health_path for s in config.services} == {"/ping"}
    # --policy is the prefill's and decode's too, as in sglang-router.
    assert (config.strategy, config.prefill_strategy, config.decode_strategy) == (
        "round-robin",
        "round-robin",
        "round-robin",
    )
    assert config.retries == 2  # 3 attempts: the first and 2 retries
    assert (
        config.cb_failure_threshold,
        config.cb_success_threshold,
        config.cb_timeout_duration_secs,
    ) == (5, 2, 7)
    assert config.max_body_size == 1_000_000
    assert config.request_timeout == 30
    assert (config.max_concurrent_requests, config.max_queue, config.queue_timeout) == (4, 2, 9)
    assert (config.prometheus_port, config.prometheus_host) == (29001, "127.0.0.2")
    assert (config.health_interval, config.health_timeout) == (11, 3)
    assert config.shutdown_timeout == 12
    assert config.log_level == "warning"
    assert config.any_model  # on: Rust launcher flags were given
    # --cache-threshold tunes cache_aware, not round_robin: named at start-up instead.
    assert "min_match" not in config.strategy_options
    assert parse(argv)[1] == ["--cache-threshold"]


@pytest.mark.parametrize(
    ("argv", "setting", "value"),
    [
        (["--disable-retries"], "retries", 0),
        (["--retry-max-retries", "1"], "retries", 0),
        (["--disable-circuit-breaker"], "cb_failure_threshold", 0),
        (["--max-concurrent-requests", "-1"], "max_concurrent_requests", 0),
        (["--queue-size", "0"], "queue_timeout", 0),  # no queue: 429 at once
        (["--policy", "random"], "strategy", "random"),
        (["--policy", "cache_aware"], "strategy", "cache-aware"),
        (["--policy", "power_of_two"], "strategy", "power-of-two"),
        (["--policy", "consistent_hash"], "strategy", "affinity"),
        (
            ["--policy", "random", "--prefill-policy", "cache_aware"],
            "prefill_strategy",
            "cache-aware",
        ),
        (["--decode-policy", "power_of_two"], "decode_strategy", "power-of-two"),
        (["--policy", "random", "--decode-strategy", "weighted"], "decode_strategy", "weighted"),
        (["--cache-threshold", "0.4"], "strategy_options", {"min_match": "0.4"}),
        (["--balance-abs-threshold", "32"], "strategy_options", {"balance_abs": "32"}),
        (["--balance-rel-threshold", "2"], "strategy_options", {"balance_rel": "2"}),
        (["--ca-cert-paths", "/ca.pem"], "backend_ca_certs", "/ca.pem"),
        (["--client-cert-path", "/c.pem"], "backend_certfile", "/c.pem"),
        (["--client-key-path", "/k.pem"], "backend_keyfile", "/k.pem"),
        (["--tls-cert-path", "/s.pem"], "ssl_certfile", "/s.pem"),
        (["--tls-key-path", "/sk.pem"], "ssl_keyfile", "/sk.pem"),
        (["--queue-timeout-secs", "3"], "queue_timeout", 3),
        (["--worker-urls", "http://h:1", "--no-any-model"], "any_model", False),
        (["--backend", "http://h:1"], "any_model", False),  # lmproxy's own flags: off
        (["--any-model"], "any_model", True),
        (["--log-level", "critical"], "log_level", "error"),
    ],
)
def test_each_alias_sets_its_setting(argv, setting, value):
    config = load_config(argv)
    assert config is not None
    assert getattr(config, setting) == value


def test_flags_without_effect_are_accepted_and_named(spawn):
    argv = ["--retry-initial-backoff-ms", "10", "--retry-max-backoff-ms", "50", "--enable-igw"]
    config, notes = parse(argv)
    assert config is not None
    assert notes == ["--retry-initial-backoff-ms", "--retry-max-backoff-ms", "--enable-igw"]
    router = spawn(Router, *argv)
    wait_until(lambda: "has no effect in lmproxy" in router.output, 10, "the warnings")
    assert (
        "--retry-initial-backoff-ms has no effect in lmproxy: lmproxy retries at once, on "
        "another service, not after a backoff" in router.output
    )
    assert router.output.count("has no effect in lmproxy") == 3


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--dp-aware"], "--dp-aware (sglang-router / vllm-router) is not supported"),
        (["--model-path", "meta-llama/Llama-3.1-8B"], "no gRPC workers or tokenizer"),
        (["--history-backend", "oracle"], "keeps no conversation history"),
        (["--rate-limit-tokens-per-second", "5"], "--max-concurrent-requests counts requests"),
        (["--policy", "manual"], "the nearest is --policy consistent_hash"),
        (["--policy", "kv_aware"], "the nearest is --policy cache_aware"),
        (["--retry-max-retries", "0"], "give 1 or more (1: no retry)"),
        (["--ca-cert-paths", "/a.pem", "/b.pem"], "concatenate them"),
        (["--prometheus-port", "9100", "--workers", "2"], "scrape /metrics on --port"),
    ],
)
def test_flags_lmproxy_has_no_counterpart_for_are_refused_saying_what_to_do(argv, said):
    with pytest.raises(ConfigError, match=None) as caught:
        load_config(argv)
    assert said in str(caught.value)


def test_a_refused_flag_stops_the_command_with_its_message(spawn):
    from test_config import run_cli

    done = run_cli("--worker-urls", "http://127.0.0.1:9", "--enable-trace")
    assert done.returncode == 2
    assert "lmproxy: error: --enable-trace (sglang-router / vllm-router) is not supported" in (
        done.stderr
    )
    assert "--otlp-endpoint" in done.stderr
    done = run_cli("--backend", "sglang")
    assert done.returncode == 2
    assert "sglang-router's --backend (the runtime: sglang, openai) has no counterpart" in (
        done.stderr
    )


def test_every_rust_launcher_flag_is_taken():
    """Every flag of sglang-router's and vllm-router's launchers (their router_args.py) is
    lmproxy's, mapped, without effect or refused: none is an unknown argument."""
    theirs = {
        # sglang-router 0.3.2 and vllm-router 0.1.17, router_args.py
        "--host", "--port", "--worker-urls", "--policy", "--prefill-policy",
        "--decode-policy", "--cache-threshold", "--balance-abs-threshold",
        "--balance-rel-threshold", "--bucket-adjust-interval-secs", "--eviction-interval-secs",
        "--max-tree-size", "--max-idle-secs", "--assignment-mode", "--max-payload-size",
        "--dp-aware", "--enable-igw", "--mini-lb", "--pd-disaggregation", "--prefill",
        "--decode", "--worker-startup-timeout-secs", "--worker-startup-check-interval",
        "--log-dir", "--log-level", "--service-discovery", "--selector",
        "--service-discovery-port", "--service-discovery-namespace", "--prefill-selector",
        "--decode-selector", "--prometheus-port", "--prometheus-host",
        "--prometheus-duration-buckets", "--request-id-headers", "--request-timeout-secs",
        "--shutdown-grace-period-secs", "--cors-allowed-origins", "--max-concurrent-requests",
        "--queue-size", "--queue-timeout-secs", "--rate-limit-tokens-per-second",
        "--retry-max-retries", "--retry-initial-backoff-ms", "--retry-max-backoff-ms",
        "--retry-backoff-multiplier", "--retry-jitter-factor", "--disable-retries",
        "--cb-failure-threshold", "--cb-success-threshold", "--cb-timeout-duration-secs",
        "--cb-window-duration-secs", "--disable-circuit-breaker", "--health-failure-threshold",
        "--health-success-threshold", "--health-check-timeout-secs",
        "--health-check-interval-secs", "--health-check-endpoint", "--disable-health-check",
        "--model-path", "--tokenizer-path", "--chat-template", "--tokenizer-cache-enable-l0",
        "--tokenizer-cache-l0-max-entries", "--tokenizer-cache-enable-l1",
        "--tokenizer-cache-l1-max-memory", "--reasoning-parser", "--tool-call-parser",
        "--mcp-config-path", "--backend", "--history-backend", "--oracle-wallet-path",
        "--oracle-tns-alias", "--oracle-connect-descriptor", "--oracle-username",
        "--oracle-password", "--oracle-pool-min", "--oracle-pool-max",
        "--oracle-pool-timeout-secs", "--postgres-db-url", "--postgres-pool-max", "--redis-url",
        "--redis-pool-max", "--redis-retention-days", "--client-cert-path", "--client-key-path",
        "--ca-cert-paths", "--tls-cert-path", "--tls-key-path", "--enable-trace",
        "--otlp-traces-endpoint", "--api-key", "--control-plane-api-keys",
        "--control-plane-audit-enabled", "--jwt-issuer", "--jwt-audience", "--jwt-jwks-uri",
        "--jwt-role-mapping", "--vllm-pd-disaggregation", "--pd-kv-events",
        "--router-temperature", "--kv-penalty-host", "--kv-penalty-external",
        "--kv-penalty-disk", "--kv-aware-session-affinity-ttl-secs", "--kv-event-source",
        "--kv-event-replay-source", "--kv-event-block-size", "--kv-event-model",
        "--intra-node-data-parallel-size", "--vllm-discovery-address", "--kv-connector",
        "--enable-program-scheduling", "--program-scheduling-config-json", "--wasm-middleware",
        "--wasm-middleware-sha256", "--wasm-middleware-route",
    }  # fmt: skip
    ours = {o for a in build_parser()._actions for o in a.option_strings}
    assert sorted(theirs - ours) == []
    assert not set(launchers.REFUSED) & set(launchers.NO_EFFECT)


# --- random ----------------------------------------------------------------------


def test_random_spreads_evenly_and_a_seed_makes_it_reproducible():
    candidates = services(4)
    request = route()
    strategy = Random({"seed": "7"})
    picks = collections.Counter(strategy.choose(candidates, request).name for _ in range(8000))
    # 2000 expected each; a binomial's sd is ~39, so 1800-2200 is over five of them.
    assert set(picks) == {"s0", "s1", "s2", "s3"}
    assert all(1800 <= n <= 2200 for n in picks.values()), picks
    one, two = Random({"seed": "7"}), Random({"seed": "7"})
    assert [one.choose(candidates, request) for _ in range(50)] == [
        two.choose(candidates, request) for _ in range(50)
    ]


def test_random_is_a_registered_strategy():
    import strategies

    assert "random" in strategies.available()
    assert isinstance(strategies.load("random", {"seed": "1"}), Random)


# --- through the router -----------------------------------------------------------


def test_sglang_routers_launcher_flags_serve_the_openai_sdk(spawn):
    """lmproxy started as sglang-router's launcher starts its router (the flags its test
    fixture passes), then used by the openai SDK."""
    a = spawn(Mock, "worker-a", ["Qwen3-32B"])
    b = spawn(Mock, "worker-b", ["Qwen3-32B"])
    metrics_port = free_port()
    router = spawn(
        Router,
        "--worker-urls", a.url, b.url,
        "--policy", "round_robin",
        "--retry-max-retries", "2",
        "--cb-failure-threshold", "5",
        "--max-payload-size", "1000000",
        "--request-timeout-secs", "30",
        "--retry-initial-backoff-ms", "10",
        "--prometheus-port", str(metrics_port), "--prometheus-host", "127.0.0.1",
    )  # fmt: skip
    router.wait_healthy(2)
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{router.port}/v1", api_key="x", max_retries=0, timeout=10
    ) as client:
        for _ in range(4):
            completion = client.completions.create(model="Qwen3-32B", prompt="hi", max_tokens=2)
            assert completion.choices[0].text
    assert _proxied(a, "/v1/completions") == _proxied(b, "/v1/completions") == 2  # round-robin
    assert "--any-model is on" in router.output
    metrics = request(metrics_port, "GET", "/metrics")
    assert metrics.status == 200 and b"lmproxy_requests_total" in metrics.body
    other = request(metrics_port, "POST", "/v1/completions", chat_body())
    assert other.status == 404 and "serves GET /metrics only" in other.json()["error"]
    big = router.post("/v1/completions", {"model": "m", "prompt": "x" * 1_000_001})
    assert big.status == 413  # --max-payload-size


def _proxied(backend: Mock, path: str = "/v1/chat/completions") -> int:
    """Requests of ``path`` the backend saw (its health checks and scrapes left out)."""
    return backend.stats()["paths"].count(path)


def test_any_model_routes_an_unknown_name_and_without_it_404(spawn):
    backend = spawn(Mock, "only", ["Qwen3-32B"])
    body = chat_body("gpt-4o")
    plain = spawn(Router, "--backend", backend.backend_arg())
    plain.wait_healthy(1)
    resp = plain.post("/v1/chat/completions", body)
    assert resp.status == 404 and "model 'gpt-4o' not found" in resp.json()["error"]
    assert _proxied(backend) == 0  # the router's own 404
    for flags in (
        ["--backend", backend.backend_arg(), "--any-model"],
        ["--worker-urls", backend.url],
    ):
        router = spawn(Router, *flags)
        router.wait_healthy(1)
        before = _proxied(backend)
        # The simulator serves only its own model's name, and says so: the answer is the
        # backend's, and the body reached it as the client sent it.
        resp = router.post("/v1/chat/completions", body)
        assert resp.json() == {"error": "model 'gpt-4o' is not served here"}
        assert _proxied(backend) == before + 1
        assert json.loads(backend.stats()["last_body"]) == body
    assert "--any-model is on" in router.output  # the --worker-urls one says why, once
    off = spawn(Router, "--worker-urls", backend.url, "--no-any-model")
    off.wait_healthy(1)
    before = _proxied(backend)
    assert "not found; available models" in off.post("/v1/chat/completions", body).json()["error"]
    assert _proxied(backend) == before
    # Invented names are not kept: no metric label, however many are sent.
    for i in range(5):
        router.post("/v1/chat/completions", chat_body(f"made-up-{i}"))
    assert _proxied(backend) == before + 5
    assert b"made-up" not in router.get("/metrics").body


def _models(router: Router) -> set[str]:
    return {m["id"] for m in router.get("/v1/models").json()["data"]}


def test_the_worker_api_adds_lists_and_removes_what_v1_models_serves(spawn):
    qwen = spawn(Mock, "qwen", ["Qwen3-32B"])
    nine = spawn(Mock, "nine", ["9g_8b_thinking"])
    router = spawn(Router, "--worker-urls", qwen.url)
    router.wait_healthy(1)
    assert _models(router) == {"Qwen3-32B"}
    added = router.post("/workers", {"url": nine.url})
    assert added.status == 202, added.body
    assert added.json()["status"] == "accepted" and added.json()["url"] == nine.url
    wait_until(lambda: "9g_8b_thinking" in _models(router), 10, "the added worker's model")
    listing = router.get("/workers").json()
    assert {w["url"] for w in listing["workers"]} == {qwen.url, nine.url}
    assert listing["total"] == 2 and listing["stats"]["regular_count"] == 2
    again = router.post("/workers", {"url": nine.url})
    assert again.status == 409 and again.json()["code"] == "WORKER_ALREADY_EXISTS"
    one = router.get(f"/workers/{quote(nine.url, safe='')}")
    assert one.status == 200 and one.json()["model_id"] == "9g_8b_thinking"
    gone = request(router.port, "DELETE", f"/workers/{quote(nine.url, safe='')}")
    assert gone.status == 202, gone.body
    assert _models(router) == {"Qwen3-32B"}
    # The older API: the URL in the query.
    assert router.post(f"/add_worker?url={quote(nine.url)}").status == 200
    wait_until(lambda: "9g_8b_thinking" in _models(router), 10, "the re-added worker's model")
    assert set(router.get("/list_workers").json()["urls"]) == {qwen.url, nine.url}
    assert router.post(f"/remove_worker?url={quote(nine.url)}").status == 200
    assert _models(router) == {"Qwen3-32B"}
    missing = router.post(f"/remove_worker?url={quote(nine.url)}")
    assert missing.status == 404 and missing.json()["code"] == "WORKER_NOT_FOUND"


def test_the_worker_api_takes_the_admin_token(spawn):
    backend = spawn(Mock, "b", ["Qwen3-32B"])
    router = spawn(Router, "--admin-token", "s3cret")
    refused = router.post("/workers", {"url": backend.url})
    assert refused.status == 401
    assert router.post(f"/add_worker?url={backend.url}").status == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert router.post("/workers", {"url": backend.url}, headers=auth).status == 202
    assert router.get("/workers").status == 200  # reading is as open as /services


def _send(port: int, body: dict, results: dict, name: str, ttft: float = 0.0) -> socket.socket:
    """Send a request on a connection of its own; its status lands in ``results``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if ttft:
        headers["X-Mock-TTFT"] = str(ttft)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)

    def read() -> None:
        try:
            resp = conn.getresponse()
            results[name] = (resp.status, resp.read())
        except OSError:
            results[name] = (0, b"")

    threading.Thread(target=read, daemon=True).start()
    assert conn.sock is not None
    return conn.sock


def test_max_concurrent_requests_queues_then_429_when_full_and_408_after_the_timeout(spawn):
    backend = spawn(Mock, "slow", ["Qwen3-32B"])
    router = spawn(
        Router,
        "--backend", backend.backend_arg(),
        "--max-concurrent-requests", "1", "--queue-size", "1", "--queue-timeout-secs", "1",
    )  # fmt: skip
    router.wait_healthy(1)
    results: dict[str, tuple[int, bytes]] = {}
    first = _send(router.port, chat_body(), results, "first", ttft=30)
    wait_until(lambda: router.stats_of("slow")["in_flight"] == 1, 10, "the first under way")
    _send(router.port, chat_body(), results, "second")
    wait_until(lambda: router.get("/stats").json()["queue_length"] == 1, 10, "the second queued")
    _send(router.port, chat_body(), results, "third")
    wait_until(lambda: "third" in results, 10, "the third refused")
    status, body = results["third"]
    assert status == 429 and b"queue is full" in body
    wait_until(lambda: "second" in results, 10, "the second timed out")
    status, body = results["second"]
    assert status == 408 and b"--max-concurrent-requests" in body
    assert "first" not in results  # still under way: the limit held it alone
    first.shutdown(socket.SHUT_RDWR)  # its client hangs up
    router.wait_idle()


def test_a_request_waiting_for_the_router_wide_limit_is_served_when_a_slot_frees(spawn):
    backend = spawn(Mock, "slow", ["Qwen3-32B"])
    router = spawn(
        Router,
        "--backend", backend.backend_arg(),
        "--max-concurrent-requests", "1", "--queue-size", "1", "--queue-timeout-secs", "60",
    )  # fmt: skip
    router.wait_healthy(1)
    results: dict[str, tuple[int, bytes]] = {}
    first = _send(router.port, chat_body(), results, "first", ttft=60)
    wait_until(lambda: router.stats_of("slow")["in_flight"] == 1, 10, "the first under way")
    _send(router.port, chat_body(), results, "second")
    wait_until(lambda: router.get("/stats").json()["queue_length"] == 1, 10, "the second queued")
    assert _proxied(backend) == 1  # it waits in the router, not at the backend
    first.shutdown(socket.SHUT_RDWR)  # the first's client hangs up: its slot frees
    wait_until(lambda: "second" in results, 10, "the second served")
    assert results["second"][0] == 200
    router.wait_idle()
