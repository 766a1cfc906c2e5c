"""The admin API: register, heartbeat, TTL expiry, deregister, and who may use it."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from conftest import Mock, Router, chat_body, request, wait_until


def _names(router: Router) -> set[str]:
    return set(router.listed())


def _local_address() -> str | None:
    """This machine's own non-loopback address, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_register_route_heartbeat_deregister(spawn):
    backend = spawn(Mock, "live-a", ["Qwen3-32B"])
    router = spawn(Router, "--health-interval", "30")
    registration = {"name": "live-a", "url": backend.url, "weight": 2}
    resp = router.post("/services", registration)
    assert resp.status == 201, resp
    assert resp.json()["origin"] == "admin"
    # Probed at once, not after a health interval: routable within a second or two.
    router.wait_healthy(1, timeout_s=5)
    assert router.post("/v1/chat/completions", chat_body()).status == 200
    listed = router.get("/services").json()["services"]
    assert listed[0]["name"] == "live-a" and listed[0]["weight"] == 2
    assert listed[0]["models"] == ["Qwen3-32B"]  # discovered from the backend

    # Registering again updates in place (200), and keeps it healthy.
    resp = router.post("/services", {**registration, "weight": 5})
    assert resp.status == 200 and resp.json()["weight"] == 5
    assert router.get("/services").json()["services"][0]["healthy"] is True

    assert router.post("/services/live-a/heartbeat").status == 200
    assert router.post("/services/nope/heartbeat").status == 404
    resp = request(router.port, "DELETE", "/services/live-a")
    assert resp.status == 200 and resp.json()["removed"] == "live-a"
    assert _names(router) == set()
    resp = router.post("/v1/chat/completions", chat_body())
    assert resp.status in (404, 503), resp
    assert request(router.port, "DELETE", "/services/live-a").status == 404


def test_registration_in_the_infinilm_format(spawn):
    backend = spawn(Mock, "svc-9g", ["9g_8b_thinking"])
    router = spawn(Router)
    resp = router.post(
        "/services",
        {
            "name": "service_9g8b",
            "host": "127.0.0.1",
            "port": backend.port,
            "status": "running",
            "metadata": {"type": "openai-api", "models": ["9g_8b_thinking"]},
        },
    )
    assert resp.status == 201, resp
    router.wait_healthy(1, timeout_s=5)
    resp = router.post("/chat/completions", chat_body("9g_8b_thinking"))
    assert resp.status == 200


def test_ttl_expires_without_heartbeats(spawn):
    backend = spawn(Mock, "ttl-a", ["Qwen3-32B"])
    router = spawn(Router)
    resp = router.post("/services", {"name": "ttl-a", "url": backend.url, "ttl": 1.5})
    assert resp.status == 201 and resp.json()["ttl"] == 1.5
    router.wait_healthy(1, timeout_s=5)
    # Heartbeats keep it for twice its ttl.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert router.post("/services/ttl-a/heartbeat").status == 200
        assert "ttl-a" in _names(router)
        time.sleep(0.3)  # the heartbeat's pace, well inside the ttl
    # Without them it goes: within ttl plus the fleet's half-second tick.
    wait_until(lambda: "ttl-a" not in _names(router), 10, "the registration to expire")
    assert "no heartbeat for 1.5s" in router.output


def test_registration_ttl_default_flag(spawn):
    backend = spawn(Mock, "ttl-b", ["Qwen3-32B"])
    router = spawn(Router, "--registration-ttl", "1")
    assert router.post("/services", {"name": "ttl-b", "url": backend.url}).status == 201
    wait_until(lambda: "ttl-b" not in _names(router), 10, "the registration to expire")


def test_removed_service_finishes_its_requests(spawn):
    backend = spawn(Mock, "slow-a", ["Qwen3-32B"], "--ttft", "0.5", "--token-delay", "0.05")
    router = spawn(Router)
    assert router.post("/services", {"name": "slow-a", "url": backend.url}).status == 201
    router.wait_healthy(1, timeout_s=5)
    results = []
    worker = threading.Thread(
        target=lambda: results.append(
            router.post("/v1/chat/completions", chat_body(stream=True), timeout=10)
        )
    )
    worker.start()
    wait_until(lambda: backend.stats()["active"] == 1, 5, "the request to reach the backend")
    assert request(router.port, "DELETE", "/services/slow-a").status == 200
    worker.join(10)
    resp = results[0]
    assert resp.status == 200
    assert resp.body.rstrip().endswith(b"data: [DONE]")
    assert b'"error"' not in resp.body


def test_bad_registrations_say_what_to_change(spawn):
    backend = spawn(Mock, "cfg-a", ["Qwen3-32B"])
    router = spawn(Router, "--backend", backend.backend_arg())
    cases = [
        (b"{not json", 400, "invalid registration"),
        ([1, 2], 400, "expected a JSON object"),
        ({"name": "x"}, 400, "host and port, or url"),
        ({"name": "x", "url": "ftp://a:1"}, 400, "http:// or https://"),
        ({"name": "x", "url": "http://a:1", "ttl": -1}, 400, "ttl"),
        # Another type is kept and listed (tests/test_infinilm.py), but must still be sane.
        ({"name": "x", "url": "http://a:1", "metadata": {"type": 5}}, 400, "metadata.type"),
        ({"name": "x y", "port": 1, "host": "a", "metadata": {"type": "InfiniLM"}}, 400, "name"),
        ({"name": "x", "metadata": {"type": "InfiniLM"}}, 400, "host and port"),
        ({"name": "x", "url": "http://a:1", "metadata": {"type": "\n"}}, 400, "printable"),
        # A configured service cannot be taken over by a registration.
        ({"name": "cfg-a", "url": "http://127.0.0.1:9"}, 409, "defined in the config"),
    ]
    for body, status, words in cases:
        resp = router.post("/services", body)
        assert resp.status == status, (body, resp)
        assert words in resp.json()["error"], (body, resp)
    assert request(router.port, "PUT", "/services/cfg-a").status == 405
    assert router.get("/services/cfg-a").json()["origin"] == "config"
    assert router.get("/services/nope").status == 404


def test_deeply_nested_bodies_are_refused_not_a_500(spawn):
    """JSON nested 1,000 levels deep raised RecursionError: a 500 and a traceback."""
    backend = spawn(Mock, "deep-a", ["Qwen3-32B"])
    router = spawn(Router)
    assert router.post("/services", {"name": "deep-a", "url": backend.url}).status == 201
    deep = b'{"name": "x", "url": "http://a:1", "metadata": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    for path in ("/services", "/services/deep-a/heartbeat"):
        resp = router.post(path, deep)
        assert resp.status == 400, (path, resp)
        assert "nested more than 64 levels deep" in resp.json()["error"]
    assert "Traceback" not in router.output
    assert router.post("/services/deep-a/heartbeat").status == 200


def test_admin_token(spawn):
    backend = spawn(Mock, "tok-a", ["Qwen3-32B"])
    router = spawn(Router, "--admin-token", "s3cret", "--api-key", "user-key")
    body = {"name": "tok-a", "url": backend.url}
    assert router.post("/services", body).status == 401
    resp = router.post("/services", body, headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401 and "--admin-token" in resp.json()["error"]
    # An API key is not an admin token, nor the other way round.
    user = {"Authorization": "Bearer user-key"}
    assert router.post("/services", body, headers=user).status == 401
    resp = router.post("/services", body, headers={"Authorization": "Bearer s3cret"})
    assert resp.status == 201
    assert router.get("/services", headers={"Authorization": "Bearer s3cret"}).status == 401
    assert router.get("/services", headers={"Authorization": "Bearer user-key"}).status == 200
    resp = request(
        router.port, "DELETE", "/services/tok-a", headers={"Authorization": "Bearer s3cret"}
    )
    assert resp.status == 200


def test_admin_token_from_the_environment(spawn):
    router = spawn(Router, env={"LMPROXY_ADMIN_TOKEN": "from-env"})
    body = {"name": "env-a", "url": "http://127.0.0.1:9"}
    assert router.post("/services", body).status == 401
    resp = router.post("/services", body, headers={"Authorization": "Bearer from-env"})
    assert resp.status == 201
    # Nothing listens there: the log says so at once, not only /stats.
    wait_until(lambda: "service env-a is not healthy yet" in router.output, 5, "the warning")


def test_without_a_token_only_loopback_may_register(spawn):
    address = _local_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to connect from")
    router = spawn(Router, "--host", "0.0.0.0")
    body = {"name": "outsider", "url": "http://169.254.169.254:80"}
    resp = request(router.port, "POST", "/services", body, host=address)
    assert resp.status == 403, resp
    assert "--admin-token" in resp.json()["error"]
    assert request(router.port, "DELETE", "/services/x", host=address).status == 403
    assert "outsider" not in _names(router)
    # The API itself stays open to that client (no API keys are set).
    assert request(router.port, "GET", "/health", host=address).status in (200, 503)
