"""Drop-in for InfiniLM-SVC: its launch order, its babysitter's registrations and its
client's calls, run against the router as real processes.

``tests/babysitter.py`` replays what InfiniLM's babysitter sends a registry;
``tests/infinilm_registry.py`` is its registry. Both are stand-ins that speak the
real protocol (InfiniLM itself needs GPUs and its own packages).
"""

from __future__ import annotations

import signal

from conftest import Mock, Process, Registry, Router, request, wait_until

HELLO = [{"role": "user", "content": "Hello"}]


class Babysitter(Process):
    """``tests/babysitter.py`` registering ``server`` into ``registry_url``."""

    def __init__(self, registry_url: str, name: str, server: Mock, interval: float = 0.2) -> None:
        super().__init__(
            [
                "tests/babysitter.py",
                "--registry-url",
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
