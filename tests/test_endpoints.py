"""The router's own endpoints, in the shapes of the InfiniLM-SVC API document."""

from __future__ import annotations

import datetime
import socket

from conftest import Mock, Router, chat_body, router_over, wait_until


def test_health_reports_healthy_services(shared_router):
    resp = shared_router.get("/health")
    assert resp.status == 200
    body = resp.json()
    assert body["status"] == "healthy"
    assert body["router"] == "running"
    assert body["healthy_services"] == "2/2"
    datetime.datetime.fromisoformat(body["timestamp"])


def test_health_is_200_and_readiness_503_while_no_service_is_healthy(spawn):
    backend = spawn(Mock, "sick", ["m"], "--fault", "unhealthy")
    router = spawn(Router, "--backend", backend.backend_arg(), "--health-interval", "0.2")
    wait_until(lambda: router.get("/stats").json()["services"][0]["last_check"], what="a check")
    # /health answers 200 while the router runs (InfiniLM's launch scripts wait on it
    # before any service exists); its body tells the truth.
    resp = router.get("/health")
    assert resp.status == 200
    assert resp.json()["healthy_services"] == "0/1"
    assert resp.json()["status"] == "unhealthy"
    ready = router.get("/readiness")
    assert ready.status == 503
    body = ready.json()
    assert body["status"] == "not ready"
    assert (body["healthy_services"], body["total_services"]) == (0, 1)
    # It says why: the service's own failed check.
    assert "sick" in body["error"] and "answered 503" in body["error"], body
    live = router.get("/liveness")
    assert live.status == 200 and live.json()["status"] == "alive"
    # ...and readiness turns 200 as soon as the backend passes its check.
    backend.set_fault("none")
    router.wait_healthy(1)
    ready = router.get("/readiness")
    assert ready.status == 200 and ready.json()["status"] == "ready", ready
    assert "error" not in ready.json()


def test_readiness_is_503_while_draining():
    """Shutting down, the router is out of rotation even with healthy services."""
    from types import SimpleNamespace

    from lmproxy import api
    from lmproxy.config import Config, ServiceSpec
    from lmproxy.fleet.roster import Roster

    roster = Roster()
    roster.probe_passed(roster.add(ServiceSpec(url="http://127.0.0.1:9", name="a")), None)
    router = SimpleNamespace(roster=roster, draining=False, config=Config())
    assert api.readiness(router)[0] == 200  # type: ignore[arg-type]
    router.draining = True
    status, body = api.readiness(router)  # type: ignore[arg-type]
    assert status == 503 and "shutting down" in body["error"]
    assert api.health(router)[0] == 200  # type: ignore[arg-type]
    assert api.health(router)[1]["router"] == "stopping"  # type: ignore[arg-type]
    assert api.liveness(router) == (200, {"status": "alive", "router": "stopping"})  # type: ignore[arg-type]


def test_models_is_deduplicated_union_of_healthy_services(spawn):
    a = spawn(Mock, "a", ["Qwen3-32B", "shared"])
    b = spawn(Mock, "b", ["9g_8b_thinking", "shared"])
    router = router_over(spawn, [a, b])
    for path in ("/models", "/v1/models"):
        body = router.get(path).json()
        assert body["object"] == "list"
        ids = [m["id"] for m in body["data"]]
        assert sorted(ids) == ["9g_8b_thinking", "Qwen3-32B", "shared"]
        for model in body["data"]:
            assert model["object"] == "model"
            assert isinstance(model["created"], int)
            assert isinstance(model["owned_by"], str)
    one = router.get("/v1/models/shared")
    assert one.status == 200 and one.json()["id"] == "shared"
    assert router.get("/v1/models/nope").status == 404


def test_models_leaves_out_unhealthy_services(spawn):
    a = spawn(Mock, "a", ["alpha"])
    b = spawn(Mock, "b", ["beta"])
    router = router_over(spawn, [a, b], "--health-interval", "0.2")
    b.set_fault("unhealthy")
    router.wait_healthy(1)
    assert [m["id"] for m in router.get("/v1/models").json()["data"]] == ["alpha"]


def test_services_lists_every_service(spawn, two_backends):
    a, b = two_backends
    router = spawn(Router, "--backend", a.backend_arg(), "--backend", b.backend_arg("weight=3"))
    router.wait_healthy(2)
    body = router.get("/services").json()
    assert body["total"] == 2
    by_name = {s["name"]: s for s in body["services"]}
    lmproxy_fields = {
        "name": "svc-qwen",
        "url": a.url,
        "healthy": True,
        "models": ["Qwen3-32B"],
        "weight": 1,
        "max_in_flight": 0,
        "origin": "config",
        "type": "openai-api",
        "routable": True,
        "role": "both",
        "circuit": "closed",
    }
    # lmproxy's fields as ever; the InfiniLM routers' are added (tests/test_infinilm.py).
    qwen = by_name["svc-qwen"]
    assert {k: qwen[k] for k in lmproxy_fields} == lmproxy_fields
    assert by_name["svc-9g"]["weight"] == 3


def test_stats_count_real_proxied_requests(spawn, two_backends):
    a, b = two_backends
    router = router_over(spawn, [a, b])
    for _ in range(3):
        assert router.post("/v1/chat/completions", chat_body("Qwen3-32B")).status == 200
    assert (
        router.post(
            "/v1/chat/completions", chat_body("Qwen3-32B"), headers={"X-Mock-Fault": "500"}
        ).status
        == 500
    )
    body = router.get("/stats").json()
    assert body["total_services"] == 2
    assert body["healthy_services"] == 2
    qwen = router.stats_of("svc-qwen")
    assert qwen["request_count"] == 4
    assert qwen["error_count"] == 1
    assert qwen["response_time"] > 0
    assert qwen["in_flight"] == 0
    assert isinstance(qwen["last_check"], float) and qwen["last_check"] > 0  # epoch seconds
    idle = router.stats_of("svc-9g")
    assert idle["request_count"] == 0 and idle["response_time"] == 0


def test_router_endpoints_answer_get_only(shared_router):
    resp = shared_router.post("/health", {})
    assert resp.status == 405
    assert "GET" in resp.json()["error"]


def test_a_path_not_the_routers_is_forwarded_and_a_forward_proxys_refused(spawn, two_backends):
    a, _ = two_backends
    router = router_over(spawn, [a])
    resp = router.get("/nowhere")
    assert resp.status == 404  # the simulator's own answer, not the router's
    assert resp.json() == {"error": "no route GET /nowhere"}
    assert a.stats()["paths"][-1] == "/nowhere"
    # An absolute URL asks for a forward proxy: the router's 404, with a hint.
    with socket.create_connection(("127.0.0.1", router.port), timeout=5) as sock:
        sock.sendall(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
        answer = b""
        while b"}" not in answer:  # the whole error body
            piece = sock.recv(65536)
            assert piece, answer
            answer += piece
    assert answer.startswith(b"HTTP/1.1 404") and b"not a forward proxy" in answer


def test_api_keys_guard_everything_but_health(spawn, two_backends):
    a, _ = two_backends
    router = router_over(spawn, [a], "--api-key", "sekrit")
    assert router.get("/health").status == 200
    denied = router.post("/v1/chat/completions", chat_body())
    assert denied.status == 401
    assert "Authorization: Bearer" in denied.json()["error"]
    assert router.get("/v1/models").status == 401
    auth = {"Authorization": "Bearer sekrit"}
    assert router.post("/v1/chat/completions", chat_body(), headers=auth).status == 200
    assert router.get("/v1/models", headers=auth).status == 200
    wrong = {"Authorization": "Bearer nope"}
    assert router.post("/v1/chat/completions", chat_body(), headers=wrong).status == 401
