"""Active health checks, model discovery, passive ejection and retries."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from conftest import Mock, Router, chat_body, router_over, wait_until


def test_models_are_discovered_from_v1_models(spawn):
    backend = spawn(Mock, "b", ["m-one", "m-two"])
    router = router_over(spawn, [backend])
    assert router.get("/services").json()["services"][0]["models"] == ["m-one", "m-two"]
    assert "/v1/models" in backend.stats()["paths"]
    # One line for the models a check found, however many.
    assert "service b serves m-one, m-two" in router.output


def test_discovery_falls_back_to_models(spawn):
    backend = spawn(Mock, "old", ["legacy"], "--no-v1-models")
    router = router_over(spawn, [backend])
    assert router.get("/services").json()["services"][0]["models"] == ["legacy"]
    assert backend.stats()["paths"][-2:] == ["/v1/models", "/models"]


def test_configured_models_skip_discovery(spawn):
    backend = spawn(Mock, "b", ["real"])
    router = spawn(Router, "--backend", backend.backend_arg("model=real", "model=alias"))
    router.wait_healthy(1)
    assert router.get("/services").json()["services"][0]["models"] == ["real", "alias"]
    assert "/v1/models" not in backend.stats()["paths"]


def test_health_check_uses_the_services_own_health_path(spawn):
    backend = spawn(Mock, "b", ["m"])
    # A path the simulator does not serve: 404 fails the check.
    router = spawn(
        Router,
        "--backend",
        backend.backend_arg("health=/v1/models"),
        "--backend",
        f"broken={backend.url},health=/nope",
        "--health-interval",
        "0.3",
    )
    wait_until(
        lambda: all(s["last_check"] for s in router.get("/stats").json()["services"]),
        what="both checks",
    )
    healthy = {s["name"]: s["healthy"] for s in router.get("/services").json()["services"]}
    assert healthy == {"b": True, "broken": False}
    assert "/nope" in router.stats_of("broken")["last_error"]


def test_a_backend_url_ending_in_v1_works_and_says_so_once(spawn):
    backend = spawn(Mock, "b", ["m"])
    router = spawn(Router, "--backend", f"b={backend.url}/v1", "--health-interval", "0.2")
    router.wait_healthy(1)
    assert router.post("/v1/chat/completions", chat_body("m")).status == 200
    paths = backend.stats()["paths"]
    assert "/v1/chat/completions" in paths and "/health" in paths
    assert not any(p.startswith("/v1/v1") or p == "/v1/health" for p in paths), paths
    assert router.get("/services").json()["services"][0]["url"] == backend.url
    wait_until(lambda: backend.stats()["paths"].count("/health") >= 3, 5, "more checks")
    assert router.output.count("its URL ends in /v1") == 1, router.output


def test_a_failed_check_names_the_path_it_asked(spawn):
    backend = spawn(Mock, "b", ["m"])
    router = spawn(Router, "--backend", f"b={backend.url}/api,health=/ready")
    wait_until(lambda: router.stats_of("b")["last_error"], what="a failed check")
    assert "/api/ready answered 404" in router.stats_of("b")["last_error"]


def test_new_models_are_picked_up_by_the_next_check(spawn):
    backend = spawn(Mock, "b", ["m"])
    router_over(spawn, [backend], "--health-interval", "0.3")
    first = backend.stats()["requests"]
    wait_until(lambda: backend.stats()["requests"] >= first + 4, 5, "two more checks")


def test_passive_ejection_after_max_errors_and_readmission(spawn):
    backend = spawn(Mock, "flaky", ["Qwen3-32B"], "--fault", "garbage")
    spare = spawn(Mock, "spare", ["Qwen3-32B"])
    router = router_over(
        spawn,
        [backend, spare],
        "--max-errors",
        "2",
        "--health-interval",
        "1",
        "--strategy",
        "round-robin",
    )
    statuses = []
    for _ in range(6):
        resp = router.post("/v1/chat/completions", chat_body())
        statuses.append(resp.headers.get("x-mock-server") or resp.status)
    # Round-robin alternates; after two broken answers flaky is out, spare takes all.
    assert statuses[:4] == [502, "spare", 502, "spare"]
    assert statuses[4:] == ["spare", "spare"]
    flaky = router.stats_of("flaky")
    assert flaky["healthy"] is False and flaky["error_count"] == 2
    assert "ejected after 2 consecutive failed requests" in router.output
    # Healthy again once the backend is fixed and its next check passes.
    backend.set_fault("none")
    wait_until(lambda: router.stats_of("flaky")["healthy"], 5, "re-admission")
    servers = {
        router.post("/v1/chat/completions", chat_body()).headers["x-mock-server"] for _ in range(2)
    }
    assert servers == {"flaky", "spare"}


def test_backend_500s_are_counted_but_do_not_eject(spawn):
    backend = spawn(Mock, "b", ["Qwen3-32B"])
    router = router_over(spawn, [backend], "--max-errors", "1")
    for _ in range(3):
        resp = router.post("/v1/chat/completions", chat_body(), headers={"X-Mock-Fault": "500"})
        assert resp.status == 500
    stats = router.stats_of("b")
    assert stats["error_count"] == 3 and stats["healthy"] is True


def test_unreachable_service_is_retried_on_another(spawn):
    dead = spawn(Mock, "dead", ["Qwen3-32B"])
    alive = spawn(Mock, "alive", ["Qwen3-32B"])
    router = router_over(spawn, [dead, alive], "--health-interval", "60")
    dead.kill()  # still "healthy" to the router: its next check is a minute away
    for _ in range(4):
        resp = router.post("/v1/chat/completions", chat_body())
        assert resp.status == 200
        assert resp.headers["x-mock-server"] == "alive"
    assert router.stats_of("dead")["error_count"] >= 1


def test_backend_killed_between_requests_pooled_connection(spawn):
    first = spawn(Mock, "first", ["Qwen3-32B"])
    second = spawn(Mock, "second", ["Qwen3-32B"])
    router = router_over(spawn, [first, second], "--health-interval", "60")
    # Warm both pools with a keep-alive connection each.
    served = {
        router.post("/v1/chat/completions", chat_body()).headers["x-mock-server"] for _ in range(2)
    }
    assert served == {"first", "second"}
    first.kill()
    for _ in range(4):
        resp = router.post("/v1/chat/completions", chat_body())
        assert resp.status == 200 and resp.headers["x-mock-server"] == "second"


def test_request_dropped_before_the_answer_is_retried(spawn):
    closer = spawn(Mock, "closer", ["Qwen3-32B"], "--fault", "close")
    good = spawn(Mock, "good", ["Qwen3-32B"])
    router = router_over(spawn, [closer, good])
    for _ in range(3):
        resp = router.post("/v1/chat/completions", chat_body())
        assert resp.status == 200 and resp.headers["x-mock-server"] == "good"


def test_retries_are_bounded(spawn):
    backends = [spawn(Mock, f"c{i}", ["Qwen3-32B"], "--fault", "close") for i in range(4)]
    args = [a for b in backends for a in ("--backend", b.backend_arg())]
    router = spawn(Router, *args, "--retries", "1", "--max-errors", "0")
    router.wait_healthy(4)
    resp = router.post("/v1/chat/completions", chat_body())
    assert resp.status == 502
    # One try and one retry: two services saw the request, two did not.
    seen = [b.stats()["paths"].count("/v1/chat/completions") for b in backends]
    assert sorted(seen) == [0, 0, 1, 1]


def test_timeout_is_not_retried(spawn):
    hang = spawn(Mock, "hang", ["Qwen3-32B"], "--fault", "hang")
    other = spawn(Mock, "other", ["Qwen3-32B"])
    router = router_over(spawn, [hang, other], "--request-timeout", "0.3")
    results = [router.post("/v1/chat/completions", chat_body()).status for _ in range(2)]
    assert sorted(results) == [200, 504]  # a retried timeout would be a second 200


async def test_a_probe_answer_in_tiny_chunks_is_refused_past_its_pieces():
    # h11 costs microseconds per chunk: 20,000 one-byte chunks would be a long stretch
    # of Python, so an answer is bounded in pieces too (and yields to the loop meanwhile).
    from lmproxy.backend.probe import MAX_PROBE_PIECES, ProbeError, http_get

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"1\r\nx\r\n" * (MAX_PROBE_PIECES + 10) + b"0\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ProbeError, match=f"in over {MAX_PROBE_PIECES} pieces"):
            await http_get("127.0.0.1", port, "/health", 30.0)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_first_request_finds_the_first_checks_done(spawn, workers):
    """The router accepts clients once every service it starts with has had its first
    health check (bounded by --health-timeout, at most 5 s): before, it listened at
    once, and a client's first request, as sglang-router's tests send one, got a 503
    'not checked yet' for a backend that was up."""
    backend = spawn(Mock, "slow-check", ["Qwen3-32B"])
    backend.set_timing(health_delay=1.5)  # its first check takes 1.5 s
    router = spawn(
        Router, "--backend", backend.backend_arg(), "--workers", workers,
        "--health-timeout", "4",
    )  # fmt: skip
    resp = router.post("/v1/chat/completions", chat_body(max_tokens=2))
    assert resp.status == 200, resp.body
