"""Every error the router answers itself: status, {"error": message}, and what it names."""

from __future__ import annotations

import json
import socket
import time

import pytest
from conftest import (
    ROOT,
    Mock,
    Router,
    chat_body,
    free_port,
    request,
    router_over,
    wait_until,
)
from inproc import Harness


@pytest.fixture
def router(shared_router):
    """The module's router: the 400s, 404s and 405s change nothing in it."""
    return shared_router


@pytest.fixture
def faulty(spawn, two_backends):
    """A router of its own, for a test whose faults count against a service."""
    a, b = two_backends
    return router_over(spawn, [a, b])


def _error(resp, status):
    assert resp.status == status, resp
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


@pytest.mark.parametrize(
    ("body", "names"),
    [
        (b"not json", "not valid JSON"),
        (b"", "body is empty"),
        (b"[1, 2]", "Expected `object`"),
        (b'{"model": 5, "messages": []}', "$.model"),
        (b'{"model": "Qwen3-32B", "messages": [{"role": "user"}], "stream": "yes"}', "$.stream"),
        (
            b'{"model": "Qwen3-32B", "messages": [{"role": "user"}], "temperature": 2.5}',
            "$.temperature",
        ),
        (
            b'{"model": "Qwen3-32B", "messages": [{"role": "user"}], "temperature": -0.1}',
            "$.temperature",
        ),
        (b'{"model": "Qwen3-32B", "messages": [{"role": "user"}], "top_p": 1.5}', "$.top_p"),
        (b'{"model": "Qwen3-32B", "messages": [{"role": "user"}], "top_k": 1.5}', "$.top_k"),
        (
            b'{"model": "Qwen3-32B", "messages": [{"role": "user"}], "max_tokens": 0}',
            "$.max_tokens",
        ),
        (
            b'{"model": "Qwen3-32B", "messages": [{"role": "user"}], "max_tokens": "9"}',
            "$.max_tokens",
        ),
        (
            b'{"model": "Qwen3-32B", "messages": [{"role": "user"}], "repetition_penalty": 2.1}',
            "$.repetition_penalty",
        ),
        (b'{"model": "Qwen3-32B"}', "'messages' is required"),
        (b'{"model": "Qwen3-32B", "messages": []}', "'messages' must not be empty"),
        (b'{"model": "Qwen3-32B", "messages": {"role": "user"}}', "'messages' must be a list"),
        (
            b'{"model": "Qwen3-32B", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "nested too deeply",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else v[:40].decode(errors="replace"),
)
def test_400_names_what_is_wrong(router, body, names):
    message = _error(router.post("/v1/chat/completions", body), 400)
    assert names in message


def test_400_missing_prompt_for_completions(router):
    message = _error(router.post("/v1/completions", {"model": "Qwen3-32B"}), 400)
    assert "'prompt' is required" in message


def test_missing_model_goes_to_any_healthy_service(spawn, two_backends):
    """As the InfiniLM routers do: InfiniLM's RouterClient leaves the model out."""
    a, b = two_backends
    router = router_over(spawn, [a, b], "--strategy", "round-robin")
    served = set()
    for _ in range(4):
        resp = router.post("/chat/completions", chat_body(model=None))
        assert resp.status == 200, resp
        # The body went as sent: each backend answered with its own model.
        served.add((resp.headers["x-mock-server"], resp.json()["model"]))
    assert served == {("svc-qwen", "Qwen3-32B"), ("svc-9g", "9g_8b_thinking")}


def test_require_model_keeps_the_400_and_lists_the_models(spawn, two_backends):
    a, b = two_backends
    router = router_over(spawn, [a, b], "--require-model")
    message = _error(router.post("/v1/chat/completions", chat_body(model=None)), 400)
    assert "'model' is required" in message and "--require-model" in message
    assert "Qwen3-32B" in message and "9g_8b_thinking" in message
    # A named model, or the default one, still goes through.
    assert router.post("/v1/chat/completions", chat_body()).status == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/chat/completions"),
        ("GET", "/chat/completions"),
        ("PUT", "/v1/completions"),
        ("DELETE", "/v1/embeddings"),
        ("OPTIONS", "/v1/chat/completions"),
    ],
)
def test_405_for_a_model_path_without_post(router, method, path):
    resp = request(router.port, method, path)
    assert resp.status == 405, resp
    assert resp.headers["allow"] == "POST"
    assert f"{path} answers POST" in resp.json()["error"]
    head = request(router.port, "HEAD", path)
    assert head.status == 405 and head.headers["allow"] == "POST" and head.body == b""


def test_valid_edges_of_the_ranges_pass(router, shared_backends):
    body = chat_body(temperature=0, top_p=1, top_k=-1, max_tokens=1, repetition_penalty=2)
    resp = router.post("/v1/chat/completions", body)
    assert resp.status == 200, resp
    assert resp.json()["usage"]["completion_tokens"] == 1  # max_tokens reached the backend
    backend = request(shared_backends[0].port, "GET", "/mock/stats").json()
    assert json.loads(backend["last_body"]) == body  # every edge value passed unchanged


def test_missing_model_uses_the_only_served_model(spawn):
    only = spawn(Mock, "only", ["solo"])
    router = router_over(spawn, [only])
    resp = router.post("/v1/chat/completions", chat_body(model=None))
    assert resp.status == 200
    assert resp.json()["model"] == "solo"  # the backend was told the model


def test_missing_model_uses_default_model(spawn, two_backends):
    a, b = two_backends
    router = router_over(spawn, [a, b], "--default-model", "9g_8b_thinking")
    resp = router.post("/chat/completions", chat_body(model=None))
    assert resp.status == 200
    assert resp.headers["x-mock-server"] == "svc-9g"


def test_404_unknown_model_lists_available(router):
    message = _error(router.post("/v1/chat/completions", chat_body("gpt-9")), 404)
    assert "gpt-9" in message and "Qwen3-32B" in message and "9g_8b_thinking" in message


def test_503_known_model_without_healthy_service(spawn):
    backend = spawn(Mock, "a", ["Qwen3-32B"])
    router = router_over(spawn, [backend], "--health-interval", "0.2")
    backend.set_fault("unhealthy")
    router.wait_healthy(0)
    message = _error(router.post("/v1/chat/completions", chat_body()), 503)
    assert "no healthy service" in message and "Qwen3-32B" in message


def test_503_while_discovery_is_pending(spawn):
    # A backend that accepts connections and never answers: its first check is
    # still under way, so the router cannot tell yet whether it serves the model.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        port = silent.getsockname()[1]
        router = spawn(
            Router, "--backend", f"late=http://127.0.0.1:{port}", "--health-timeout", "60"
        )
        message = _error(router.post("/v1/chat/completions", chat_body()), 503)
        assert "discovery is still pending on late" in message and "retry" in message
    finally:
        silent.close()


def test_503_names_the_cause_once_the_first_check_failed(spawn):
    port = free_port()
    router = spawn(Router, "--backend", f"http://127.0.0.1:{port}")
    wait_until(lambda: router.get("/stats").json()["services"][0]["last_check"], what="a check")
    message = _error(router.post("/v1/chat/completions", chat_body()), 503)
    assert message.startswith(f"no healthy service for model 'Qwen3-32B': 127.0.0.1:{port}: ")
    assert "cannot connect" in message and "refused" in message, message
    # Without a model, the same cause.
    message = _error(router.post("/v1/chat/completions", chat_body(model=None)), 503)
    assert message.startswith(f"no healthy service: 127.0.0.1:{port}: ")
    assert "cannot connect" in message, message
    # The backend comes up: its models become routable within seconds, not an interval.
    spawn(Mock, "late", ["Qwen3-32B"], port=port)
    router.wait_healthy(1, timeout_s=10)
    assert router.post("/v1/chat/completions", chat_body()).status == 200


def test_503_with_no_service_at_all_says_how_to_add_one(spawn):
    router = spawn(Router)
    for model in ("Qwen3-32B", None):
        message = _error(router.post("/v1/chat/completions", chat_body(model=model)), 503)
        assert "no backend service is configured or registered yet" in message, message
        assert "POST /services" in message


def test_503_names_each_unhealthy_service_and_bounds_the_list(spawn):
    ports = [free_port() for _ in range(7)]
    args = [
        a for i, p in enumerate(ports) for a in ("--backend", f"s{i}=http://127.0.0.1:{p},model=m")
    ]
    router = spawn(Router, *args)
    wait_until(
        lambda: all(s["last_check"] for s in router.get("/stats").json()["services"]),
        what="every first check",
    )
    message = _error(router.post("/v1/chat/completions", chat_body("m")), 503)
    assert all(f"s{i}: health check failed: cannot connect" in message for i in range(5)), message
    assert "s5:" not in message and "and 2 more (GET /stats" in message


def test_502_when_backend_is_unreachable(spawn):
    backend = spawn(Mock, "a", ["Qwen3-32B"])
    router = router_over(spawn, [backend], "--health-interval", "60")
    backend.kill()  # the router still thinks it healthy: its next check is a minute away
    message = _error(router.post("/v1/chat/completions", chat_body()), 502)
    assert "service a is unreachable" in message
    assert router.stats_of("a")["error_count"] >= 1


def test_502_when_backend_answers_garbage(faulty):
    resp = faulty.post("/v1/chat/completions", chat_body(), headers={"X-Mock-Fault": "garbage"})
    message = _error(resp, 502)
    assert "svc-qwen" in message and "broken HTTP" in message


def test_504_when_backend_hangs(spawn):
    backend = spawn(Mock, "a", ["Qwen3-32B"], "--fault", "hang")
    router = router_over(spawn, [backend], "--request-timeout", "0.5")
    started = time.monotonic()
    message = _error(router.post("/v1/chat/completions", chat_body()), 504)
    assert time.monotonic() - started > 0.4  # not before the deadline (a floor load cannot break)
    assert "--request-timeout" in message


def test_backend_errors_pass_through_unchanged(faulty):
    for fault in ("500", "503", "429"):
        resp = faulty.post("/v1/chat/completions", chat_body(), headers={"X-Mock-Fault": fault})
        assert resp.status == int(fault)
        assert resp.json() == {"error": f"simulated {fault}"}
    assert resp.headers["retry-after"] == "1"


async def test_413_is_sent_without_reading_the_body():
    h = Harness(max_body_size=1024)
    client, downstream = h.client()
    # Announce 10 MB but send none of it: the answer must come anyway.
    client.data_received(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
    )
    data = downstream.take()
    assert data.startswith(b"HTTP/1.1 413")
    assert b"--max-body-size" in data
    assert b"Connection: close" in data


async def test_413_for_chunked_body_over_the_limit():
    h = Harness(max_body_size=1024)
    client, downstream = h.client()
    client.data_received(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n800\r\n" + b"x" * 2048 + b"\r\n"
    )
    assert downstream.take().startswith(b"HTTP/1.1 413")


def test_malformed_request_is_400_and_close(router):
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\x00 / HTTP/9\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400")
    assert b'"error"' in data


def test_every_fault_is_a_member_of_its_own_with_a_documented_row():
    """Fault is the one table of the router's own errors: no two members alias (equal
    enum values would), each has a status, and the documented error table lists every
    status."""
    from lmproxy.errors import Fault

    assert len(Fault.__members__) == len(Fault) == len({f.value for f in Fault})
    assert Fault.BACKEND_BROKEN is not Fault.BACKEND_UNREACHABLE
    assert Fault.AT_CONNECTION_LIMIT is not Fault.NO_HEALTHY_SERVICE
    table = (ROOT / "docs" / "endpoints.md").read_text()
    for fault in Fault:
        assert 400 <= fault.status <= 599, fault
        assert Fault(fault.value) is fault
        assert f"\n| {fault.status} |" in table, f"the error table has no row for {fault}"
