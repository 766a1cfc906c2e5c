"""Drop-in for InfiniLM-SVC: its launch order, its babysitter's registrations and its
client's calls, run against the router as real processes.

``tests/babysitter.py`` replays what InfiniLM's babysitter sends a registry;
``tests/infinilm_registry.py`` is its registry. Both are stand-ins that speak the
real protocol (InfiniLM itself needs GPUs and its own packages).
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from conftest import (
    ROOT,
    Mock,
    Process,
    Registry,
    Router,
    free_port,
    request,
    router_over,
    wait_until,
)

HELLO = [{"role": "user", "content": "Hello"}]


class Babysitter(Process):
    """``tests/babysitter.py`` registering ``server`` into ``registry_url``."""

    def __init__(self, registry_url: str, name: str, server: Mock, interval: float = 0.2) -> None:
        super().__init__(
            [
                "tests/babysitter.py",
                "--registry",  # enhanced_babysitter.py's flag
                registry_url,
                "--name",
                name,
                "--port",
                str(server.port),
                "--heartbeat-interval",
                str(interval),
            ]
        )

    def count(self, line: str) -> int:
        return self.output.count(line + "\n")


def test_infinilm_start_up_order(spawn):
    """launch_all.sh's order: router first, then each babysitter with its server."""
    # 1. The router starts with no services, and /health is 200 at once: the launch
    # script waits on `curl -f /health` before it starts anything else.
    router = spawn(Router)
    health = router.get("/health")
    assert health.status == 200, health
    assert health.json()["healthy_services"] == "0/0"
    assert router.get("/readiness").status == 503
    assert router.get("/liveness").status == 200

    # 2. A server comes up, and its babysitter registers both entries, then heartbeats.
    server = spawn(Mock, "infinilm-a", ["9g_8b_thinking"])
    sitter = spawn(Babysitter, f"http://127.0.0.1:{router.port}", "service_9g8b", server)
    wait_until(lambda: sitter.count("registered service_9g8b-server 201"), 10, "registrations")
    assert sitter.count("registered service_9g8b 201") == 1
    listed = router.listed()
    assert listed["service_9g8b"]["routable"] is False
    assert listed["service_9g8b"]["type"] == "InfiniLM"
    assert listed["service_9g8b"]["url"] == f"http://127.0.0.1:{server.port + 1}"
    assert listed["service_9g8b-server"]["routable"] is True
    router.wait_healthy(1)
    for name in ("service_9g8b", "service_9g8b-server"):
        wait_until(lambda n=name: sitter.count(f"heartbeat {n} 200") >= 2, 10, "heartbeats")
    assert "heartbeat service_9g8b 404" not in sitter.output
    # The babysitter entry is never probed, nor routed to: only the server is a service.
    assert router.get("/health").json()["healthy_services"] == "1/1"
    assert [s["name"] for s in router.get("/stats").json()["services"]] == ["service_9g8b-server"]
    own = router.get("/services/service_9g8b/health").json()
    assert own["service"] == "service_9g8b" and own["is_healthy"] is True
    assert own["health_status"] == "healthy"

    # 3. A chat with no model, as InfiniLM's RouterClient.chat_completions() sends it.
    resp = router.post("/chat/completions", {"messages": HELLO, "max_tokens": 8})
    assert resp.status == 200, resp
    assert resp.json()["model"] == "9g_8b_thinking"
    assert resp.headers["x-mock-server"] == "infinilm-a"
    # /models carries what the registration's models_list said.
    (card,) = router.get("/models").json()["data"]
    listing = request(server.port, "GET", "/v1/models").json()["data"][0]
    assert (card["id"], card["created"], card["owned_by"]) == (
        "9g_8b_thinking",
        listing["created"],
        "infinilm-a",
    )

    # 4. The babysitter stops: it unregisters both.
    sitter.signal(signal.SIGTERM)
    assert sitter.proc.wait(10) == 0
    assert sitter.count("unregistered service_9g8b 200") == 1
    assert sitter.count("unregistered service_9g8b-server 200") == 1

    # 5. The router forgets it.
    assert router.listed() == {}
    assert router.get("/health").json()["healthy_services"] == "0/0"
    assert router.get("/readiness").status == 503
    message = router.post("/chat/completions", {"messages": HELLO}).json()["error"]
    assert "no backend service is configured or registered yet" in message


def test_babysitter_entries_are_kept_listed_and_heartbeated(spawn):
    router = spawn(Router, "--registration-ttl", "0")
    entry = {
        "name": "sitter",
        "host": "127.0.0.1",
        "hostname": "127.0.0.1",
        "port": 9,
        "url": "http://127.0.0.1:9",
        "status": "running",
        "metadata": {"type": "InfiniLM-Rust", "babysitter": "enhanced"},
    }
    resp = router.post("/services", entry)
    assert resp.status == 201, resp
    assert resp.json()["routable"] is False
    assert router.post("/services", entry).status == 200  # registered again: updated
    one = router.get("/services/sitter")
    assert one.status == 200 and one.json()["metadata"]["babysitter"] == "enhanced"
    # A heartbeat may carry a status, as the InfiniLM registry allows.
    assert router.post("/services/sitter/heartbeat", {"status": "stopped"}).status == 200
    health = router.get("/services/sitter/health").json()
    assert health["is_healthy"] is False and health["health_status"] == "unhealthy"
    assert router.post("/services/sitter/heartbeat", {"status": "running"}).status == 200
    assert router.get("/services/sitter/health").json()["is_healthy"] is True
    bad = router.post("/services/sitter/heartbeat", b"{not json")
    assert bad.status == 400 and "heartbeat" in bad.json()["error"]
    # Nothing is ever sent there, and it is not a service of /health or /stats.
    assert router.get("/health").json()["healthy_services"] == "0/0"
    assert router.get("/stats").json()["services"] == []
    # The name is taken over by an openai-api registration, and back.
    server = spawn(Mock, "srv", ["m"])
    assert router.post("/services", {"name": "sitter", "url": server.url}).status == 201
    assert router.listed()["sitter"]["routable"] is True
    router.wait_healthy(1)
    assert router.post("/services", entry).status == 201
    assert router.listed()["sitter"]["routable"] is False
    assert router.get("/health").json()["healthy_services"] == "0/0"
    assert request(router.port, "DELETE", "/services/sitter").status == 200
    assert request(router.port, "DELETE", "/services/sitter").status == 404
    missing = router.get("/services/sitter/health")
    assert missing.status == 404 and "not found" in missing.json()["error"]


def test_babysitter_entries_follow_the_ttl(spawn):
    router = spawn(Router, "--registration-ttl", "1")
    entry = {"name": "sitter", "url": "http://127.0.0.1:9", "metadata": {"type": "InfiniLM"}}
    assert router.post("/services", entry).status == 201
    wait_until(lambda: "sitter" not in router.listed(), 5, "the entry to expire")
    assert "entry sitter removed: no heartbeat for 1s" in router.output


def test_service_health_in_the_registry_shape(spawn):
    server = spawn(Mock, "srv", ["m"])
    router = spawn(Router, "--backend", server.backend_arg())
    router.wait_healthy(1)
    body = router.get("/services/srv/health").json()
    assert set(body) == {"service", "health_status", "is_healthy", "last_heartbeat", "timestamp"}
    assert body["service"] == "srv" and body["is_healthy"] is True
    assert body["health_status"] == "healthy" and body["last_heartbeat"] > 0
    # Read-only, so as open as GET /services: API keys, not the admin token.
    keyed = spawn(Router, "--backend", server.backend_arg(), "--api-key", "k")
    assert keyed.get("/services/srv/health").status == 401
    ok = keyed.get("/services/srv/health", headers={"Authorization": "Bearer k"})
    assert ok.status == 200


def test_the_infinilm_registry_with_registry_url_keeps_working(spawn):
    """The babysitter registers into InfiniLM's own registry; the router follows it."""
    registry = spawn(Registry)
    server = spawn(Mock, "infinilm-b", ["Qwen3-32B"])
    sitter = spawn(Babysitter, f"http://127.0.0.1:{registry.port}", "service_qwen", server)
    wait_until(lambda: sitter.count("registered service_qwen-server 201"), 10, "registrations")
    router = spawn(
        Router,
        "--registry-url",
        f"http://127.0.0.1:{registry.port}",
        "--registry-sync-interval",
        "0.2",
    )
    router.wait_healthy(1)
    # From a registry, only openai-api entries matter to routing.
    assert list(router.listed()) == ["service_qwen-server"]
    resp = router.post("/chat/completions", {"messages": HELLO})
    assert resp.status == 200 and resp.json()["model"] == "Qwen3-32B"
    sitter.signal(signal.SIGTERM)
    assert sitter.proc.wait(10) == 0


def test_router_client_calls(spawn):
    """What InfiniLM's RouterClient asks, answered as it expects (200 and JSON)."""
    a = spawn(Mock, "a", ["Qwen3-32B"])
    b = spawn(Mock, "b", ["9g_8b_thinking"])
    router = spawn(Router, "--backend", a.backend_arg(), "--backend", b.backend_arg())
    router.wait_healthy(2)
    assert router.get("/health").json()["healthy_services"] == "2/2"  # check_router_health
    assert router.get("/stats").status == 200  # get_router_stats
    assert len(router.get("/models").json()["data"]) == 2  # get_models
    for model in (None, "Qwen3-32B", "9g_8b_thinking"):  # chat_completions(model=...)
        body = {"messages": HELLO, "max_tokens": 4}
        if model:
            body["model"] = model
        resp = router.post("/chat/completions", body)
        assert resp.status == 200, (model, resp)


# --- InfiniLM's surface, read from its code (Ceng23333/InfiniLM-SVC) ---------------------

# python/distributed_router.py: health_handler, services_handler, get_service_stats;
# infini-router's ServiceInfo (src/router/service_instance.rs) has the same fields.
INFINILM_HEALTH = {"status", "router", "healthy_services", "registry_url", "message", "timestamp"}
INFINILM_SERVICE = {
    "name", "host", "port", "url", "babysitter_url", "healthy", "request_count",
    "error_count", "response_time", "weight", "models", "metadata",
}  # fmt: skip
INFINILM_STAT = INFINILM_SERVICE - {"models"} | {"last_check"}


def test_health_services_and_stats_carry_infinilm_fields(spawn):
    """What InfiniLM's routers answer on /health, /services and /stats, from a registry
    entry with metadata; lmproxy's own fields and /v1/models are as they were."""
    started = time.time()
    registry = spawn(Registry)
    server = spawn(Mock, "srv", ["Qwen3-32B"])
    metadata = {"type": "openai-api", "models": ["Qwen3-32B"], "cache_type": "paged", "gpu": 3}
    registry_url = f"http://127.0.0.1:{registry.port}"
    router = spawn(Router, "--registry-url", registry_url, "--registry-sync-interval", "0.2")
    empty = router.get("/health").json()
    assert set(empty) == INFINILM_HEALTH
    assert empty["message"] == "No healthy services available"
    assert empty["registry_url"] == registry_url
    registry.register("service_qwen-server", server, metadata=metadata)
    router.wait_healthy(1)
    chat = router.post("/v1/chat/completions", {"model": "Qwen3-32B", "messages": HELLO})
    assert chat.status == 200, chat

    health = router.get("/health").json()
    assert set(health) == INFINILM_HEALTH and health["message"] is None
    listing = router.get("/services").json()
    assert listing["registry_url"] == registry_url and listing["total"] == 1
    (entry,) = listing["services"]
    assert set(entry) >= INFINILM_SERVICE
    assert (entry["host"], entry["port"]) == ("127.0.0.1", server.port)
    assert entry["babysitter_url"] == f"http://127.0.0.1:{server.port + 1}"  # port + 1, as both
    assert entry["metadata"] == metadata
    assert entry["request_count"] == 1 and entry["error_count"] == 0
    # lmproxy's own fields, as OpenAI-style users and tools read them, unchanged.
    assert (entry["url"], entry["healthy"], entry["models"]) == (server.url, True, ["Qwen3-32B"])
    assert (entry["origin"], entry["routable"], entry["role"]) == ("registry", True, "both")

    stats = router.get("/stats").json()
    assert stats["registry_url"] == registry_url
    (stat,) = stats["services"]
    assert set(stat) >= INFINILM_STAT
    assert stat["metadata"] == metadata and stat["babysitter_url"] == entry["babysitter_url"]
    # Epoch seconds, as InfiniLM's routers give it (lmproxy gave an ISO string).
    assert isinstance(stat["last_check"], float) and stat["last_check"] >= int(started)
    assert stat["in_flight"] == 0 and stat["last_error"] is None
    (card,) = router.get("/v1/models").json()["data"]
    assert set(card) == {"id", "object", "created", "owned_by"}


def _static_file(tmp_path, services: list[tuple[str, Mock, str]]) -> str:
    path = tmp_path / "services.json"
    entries = [
        {
            "name": name,
            "host": "127.0.0.1",
            "port": backend.port,
            "weight": 1,
            "metadata": {"type": "openai-api", "models": ["9g_8b_thinking"], "cache_type": kind},
        }
        for name, backend, kind in services
    ]
    path.write_text(json.dumps({"services": entries}))
    return str(path)


def _chats(backend: Mock) -> int:
    return sum(p == "/chat/completions" for p in backend.stats()["paths"])


def test_large_prompts_go_to_the_static_service(spawn, tmp_path):
    """infini-router's size-based routing (src/proxy/handler.rs): prompt text over
    CACHE_TYPE_ROUTING_THRESHOLD (51,200 bytes) goes to cache_type "static", the rest
    to the others. Round-robin alone would split them 4 and 4."""
    paged = spawn(Mock, "paged", ["9g_8b_thinking"])
    static = spawn(Mock, "static", ["9g_8b_thinking"])
    services = _static_file(tmp_path, [("paged", paged, "paged"), ("static", static, "static")])
    router = spawn(Router, "--static-services", services, "--strategy", "round-robin")
    router.wait_healthy(2)
    large = [{"role": "user", "content": "x" * 60_000}]
    for _ in range(8):
        resp = router.post("/chat/completions", {"model": "9g_8b_thinking", "messages": large})
        assert resp.status == 200, resp
    assert (_chats(static), _chats(paged)) == (8, 0)
    assert "size-based routing on" in router.output  # said once, not per request
    assert router.output.count("size-based routing on") == 1
    # Small prompts, and a large body whose prompt text is small (infini-router counts
    # the text of messages[].content, not the body), go to the paged one.
    tools = [{"type": "function", "function": {"name": "f", "description": "d" * 60_000}}]
    for body in ({"messages": HELLO}, {"messages": HELLO, "tools": tools}) * 4:
        resp = router.post("/chat/completions", {"model": "9g_8b_thinking", **body})
        assert resp.status == 200, resp
    assert (_chats(static), _chats(paged)) == (8, 8)
    # Text in content parts counts, as infini-router's ContentPart.text does.
    parts = [{"role": "user", "content": [{"type": "text", "text": "y" * 30_000}] * 2}]
    resp = router.post("/chat/completions", {"model": "9g_8b_thinking", "messages": parts})
    assert resp.status == 200, resp
    assert _chats(static) == 9

    # The threshold is a flag (and infini-router's environment variable).
    raised = spawn(
        Router,
        "--static-services",
        services,
        "--strategy",
        "round-robin",
        env={"CACHE_TYPE_ROUTING_THRESHOLD": "100000"},
    )
    raised.wait_healthy(2)
    for _ in range(4):
        resp = raised.post("/chat/completions", {"model": "9g_8b_thinking", "messages": large})
        assert resp.status == 200, resp
    assert (_chats(static), _chats(paged)) == (9, 8 + 4)  # under it now: small ones


def _recovering_post(port: int, body: dict, max_retries: int, attempts: list[int]) -> int:
    """test_timeout_recovery.py's make_request_with_retry: retry on a failed connection
    (status 0) and on 503, on nothing else; the last status."""
    for _ in range(max_retries + 1):
        try:
            status = request(port, "POST", "/chat/completions", body, timeout=60).status
        except OSError:
            status = 0
        attempts.append(status)
        if status == 200 or status not in (0, 503):
            return status
        time.sleep(0.05)  # its --retry-delay: the poll's pace, shortened
    return attempts[-1]


def test_compat_infinilm_gives_503_for_an_unreachable_backend_and_an_unknown_model(spawn):
    """distributed_router.py answers 503 to ClientConnectorError and to a model no healthy
    service lists; infini-router too (e.is_connect(), and its "No healthy services
    available for model"). lmproxy's own are 502 and 404, unchanged by default."""
    server = spawn(Mock, "srv", ["Qwen3-32B"])
    # Long checks, no ejection: the router still believes in the service when it dies.
    flags = ("--health-interval", "30", "--max-errors", "0")
    plain = router_over(spawn, [server], *flags)
    compat = router_over(spawn, [server], *flags, "--compat", "infinilm")
    for router, status in ((plain, 404), (compat, 503)):
        unknown = router.post("/chat/completions", {"model": "nope", "messages": HELLO})
        assert unknown.status == status, unknown
        assert "model 'nope' not found" in unknown.json()["error"]
    server.kill()
    for router, status in ((plain, 502), (compat, 503)):
        down = router.post("/chat/completions", {"model": "Qwen3-32B", "messages": HELLO})
        assert down.status == status, down
        assert "is unreachable" in down.json()["error"]


def test_timeout_recovery_path_under_compat_infinilm(spawn):
    """InfiniLM's test_timeout_recovery.py: a request that hangs past the timeout gets
    504 (not retried); its server restarts meanwhile, and the other requests, refused,
    get 503 and are retried until the server is back. Without --compat they get 502,
    which that script does not retry: it counts them as failures."""
    port = free_port()
    server = spawn(Mock, "infinilm", ["test-model"], port=port)
    flags = ("--request-timeout", "1", "--health-interval", "30", "--max-errors", "0")
    plain = router_over(spawn, [server], *flags)
    compat = router_over(spawn, [server], *flags, "--compat", "infinilm")
    body = {"model": "test-model", "messages": [{"role": "user", "content": "Say hello."}]}
    hung = request(
        compat.port, "POST", "/chat/completions", {**body, "test_hang_seconds": 35},
        headers={"X-Mock-Fault": "hang"},
    )  # fmt: skip
    assert hung.status == 504, hung  # "Timeout Errors (504)": not retried, not a failure
    server.kill()  # the server restarts, as its babysitter restarts it after a hang

    seen: list[int] = []
    assert _recovering_post(plain.port, body, 10, seen) == 502
    assert seen == [502]  # not retried: the script's exit status counts it as failed

    attempts: list[int] = []
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(_recovering_post, compat.port, body, 1000, attempts)
        wait_until(lambda: attempts, 10, "the first refused attempt")
        server = spawn(Mock, "infinilm", ["test-model"], port=port)  # back
        assert outcome.result(30) == 200
    assert attempts[-1] == 200 and set(attempts[:-1]) == {503}, attempts
    assert len(attempts) > 1  # "Retried Requests (>1 attempt)"


def test_docs_give_each_babysitter_its_own_registry_flag():
    """enhanced_babysitter.py takes --registry (its argparse), the Rust babysitter
    --registry-url (src/babysitter/config.rs); the stand-in takes both."""
    text = (ROOT / "docs" / "operations.md").read_text()
    assert "`--registry http://router:8000` for InfiniLM's Python\n`enhanced_babysitter.py`" in text
    assert "`--registry-url http://router:8000` for its Rust babysitter" in text
    config = (ROOT / "docs" / "configuration.md").read_text()
    assert "`enhanced_babysitter.py` takes the registry as\n  `--registry URL`" in config


def _services(*kinds: str) -> list:
    from lmproxy.config import ServiceSpec
    from lmproxy.fleet.roster import Service

    return [
        Service(ServiceSpec(url=f"http://127.0.0.1:{9000 + i}", metadata={"cache_type": kind}))
        for i, kind in enumerate(kinds)
    ]


def _route(body: dict):
    from lmproxy.client.request import RouteRequest, decode_head

    raw = json.dumps(body).encode()
    return RouteRequest(b"/v1/chat/completions", "m", decode_head(b"/v1/x", raw), raw, [])


def test_size_rule_edges_as_infini_router_draws_them():
    """Over the threshold, not at it (its `message_size > threshold`); the side with no
    service falls back to all; a body it cannot measure, and a fleet with no static
    service, are left to the strategy."""
    from strategies.size import by_cache_type

    paged, static, plain = _services("paged", "static", "")
    both = [paged, static, plain]
    at = _route({"messages": [{"role": "user", "content": "é" * 50}]})  # 100 bytes of UTF-8
    assert by_cache_type(both, at, 100) == [paged, plain]
    assert by_cache_type(both, at, 99) == [static]
    assert by_cache_type([paged, plain], at, 99) == [paged, plain]  # no static: unchanged
    assert by_cache_type([static], _route({"messages": HELLO}), 99) == [static]  # fallback
    ids = _route({"prompt": list(range(100))})  # token ids: infini-router cannot read them
    assert by_cache_type(both, ids, 10) == both
    listed = _route({"prompt": ["ab" * 30, "c" * 50]})  # 110 bytes over two prompts
    assert by_cache_type(both, listed, 100) == [static]
    assert by_cache_type(both, _route({"input": "x" * 500}), 100) == [paged, plain]  # counts 0


def test_threshold_from_infini_routers_environment_variable(monkeypatch):
    import pytest

    from lmproxy.config import ConfigError, build_config

    monkeypatch.setenv("CACHE_TYPE_ROUTING_THRESHOLD", "1000")
    assert build_config({}, {}).cache_type_routing_threshold == 1000
    flag = build_config({}, {"cache_type_routing_threshold": 5})
    assert flag.cache_type_routing_threshold == 5  # the flag wins
    monkeypatch.setenv("CACHE_TYPE_ROUTING_THRESHOLD", "50KB")
    with pytest.raises(ConfigError, match="CACHE_TYPE_ROUTING_THRESHOLD"):
        build_config({}, {})
    monkeypatch.delenv("CACHE_TYPE_ROUTING_THRESHOLD")
    assert build_config({}, {}).cache_type_routing_threshold == 51200


def test_error_settings_reach_prebuilt_answers_and_stream_events():
    """configure() runs before the gate builds its answers once; the stream's error
    event takes the shape too; the statuses are InfiniLM's only under --compat."""
    from lmproxy import errors
    from lmproxy.client.accept import Gate
    from lmproxy.errors import Fault

    try:
        errors.configure("infinilm", "openai")
        assert (Fault.BACKEND_UNREACHABLE.status, Fault.MODEL_NOT_FOUND.status) == (503, 503)
        assert Fault.BACKEND_CLOSED.status == 502 and Fault.BACKEND_TIMEOUT.status == 504
        refusal = Gate(4, 0, 0).at_limit
        head, _, body = refusal.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        error = json.loads(body)["error"]
        assert (error["code"], error["type"]) == ("at_connection_limit", "server_error")
        event = json.loads(errors.sse_error_event("cut")[len(b"data: ") :])
        assert event["error"]["message"] == "cut" and event["error"]["code"] == "backend_broken"
    finally:
        errors.configure()
    assert (Fault.BACKEND_UNREACHABLE.status, Fault.MODEL_NOT_FOUND.status) == (502, 404)
    assert json.loads(errors.sse_error_event("cut")[len(b"data: ") :]) == {"error": "cut"}


def test_metadata_kept_is_bounded():
    from lmproxy.config import MAX_METADATA, spec_from_entry
    from lmproxy.errors import encode_json

    small = {"type": "openai-api", "models": ["m"], "cache_type": "static"}
    entry = {"name": "a", "host": "127.0.0.1", "port": 9, "metadata": small}
    assert spec_from_entry(entry).metadata == small
    cards = [{"id": f"m{i}", "object": "model", "owned_by": "x" * 100} for i in range(500)]
    big = {**small, "models_list": cards, "note": "n" * 300}
    spec = spec_from_entry({**entry, "metadata": big})
    assert len(spec.models) == 501  # the models are all taken
    assert spec.metadata == {"type": "openai-api", "cache_type": "static"}
    assert len(encode_json(spec.metadata)) <= MAX_METADATA


def test_services_counts_are_the_whole_routers_with_workers(spawn):
    """With --workers the supervisor answers /services: its counts are gathered from the
    workers first, as for /stats (InfiniLM's /services carries them)."""
    server = spawn(Mock, "srv", ["m"])
    router = router_over(spawn, [server], "--workers", "2")
    for _ in range(4):
        assert router.post("/v1/chat/completions", {"model": "m", "messages": HELLO}).status == 200
    (entry,) = router.get("/services").json()["services"]
    assert entry["request_count"] == 4 and entry["error_count"] == 0
    assert entry["response_time"] > 0
