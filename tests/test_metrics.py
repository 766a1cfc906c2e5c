"""/metrics in Prometheus format, the access log, and request ids."""

from __future__ import annotations

import json

from conftest import Mock, Router, chat_body, router_over, wait_until
from prometheus_client.parser import text_string_to_metric_families


def samples(router: Router) -> dict[tuple[str, tuple], float]:
    resp = router.get("/metrics")
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_tokens_errors_and_health(spawn):
    a = spawn(Mock, "a", ["Qwen3-32B"])
    b = spawn(Mock, "b", ["other"], "--fault", "unhealthy")
    router = spawn(
        Router, "--backend", a.backend_arg(), "--backend", b.backend_arg(), "--max-errors", "0"
    )
    router.wait_healthy(1)
    for _ in range(3):
        assert router.post("/v1/chat/completions", chat_body(max_tokens=7)).status == 200
    stream = router.post(
        "/v1/chat/completions",
        chat_body(max_tokens=5, stream=True, stream_options={"include_usage": True}),
    )
    assert stream.status == 200
    assert (
        router.post("/v1/chat/completions", chat_body(), headers={"X-Mock-Fault": "500"}).status
        == 500
    )
    assert (
        router.post("/v1/chat/completions", chat_body(), headers={"X-Mock-Fault": "garbage"}).status
        == 502
    )
    found = samples(router)
    labels = {"service": "a", "model": "Qwen3-32B"}
    assert value(found, "lmproxy_requests_total", status="2xx", **labels) == 4
    assert value(found, "lmproxy_requests_total", status="5xx", **labels) == 1
    assert value(found, "lmproxy_errors_total", service="a", kind="status_500") == 1
    assert value(found, "lmproxy_errors_total", service="a", kind="broken") == 1
    assert value(found, "lmproxy_tokens_total", kind="completion", **labels) == 3 * 7 + 5
    assert value(found, "lmproxy_tokens_total", kind="prompt", **labels) > 0
    assert value(found, "lmproxy_request_duration_seconds_count", **labels) == 5
    assert value(found, "lmproxy_time_to_first_byte_seconds_count", **labels) == 5
    assert value(found, "lmproxy_added_latency_seconds_count") == 6
    assert value(found, "lmproxy_service_healthy", service="a") == 1
    assert value(found, "lmproxy_service_healthy", service="b") == 0
    assert value(found, "lmproxy_in_flight_requests", service="a") == 0


def test_metrics_need_the_api_key_when_keys_are_set(spawn):
    router = spawn(Router, "--api-key", "k")
    assert router.get("/metrics").status == 401
    assert router.get("/metrics", headers={"Authorization": "Bearer k"}).status == 200


def test_access_log_json_and_request_ids(spawn):
    backend = spawn(Mock, "a", ["Qwen3-32B"])
    router = router_over(spawn, [backend], "--access-log", "json")
    resp = router.post(
        "/v1/chat/completions", chat_body(max_tokens=2), headers={"X-Request-ID": "given-123"}
    )
    assert resp.status == 200
    assert backend.stats()["last_headers"]["x-request-id"] == "given-123"
    # Without one, the router makes an id, forwards it and returns it.
    resp = router.post("/v1/chat/completions", chat_body(max_tokens=2))
    made = resp.headers["x-request-id"]
    assert made and backend.stats()["last_headers"]["x-request-id"] == made
    assert router.post("/v1/chat/completions", chat_body("nope")).status == 404

    def lines() -> list[dict]:
        found = []
        for line in router.output.splitlines():
            start = line.find("{")
            if "lmproxy.access" in line and start >= 0:
                found.append(json.loads(line[start:]))
        return found

    entries = wait_until(lambda: len(lines()) >= 3 and lines(), 5, "three access lines")
    first, second, third = entries[:3]
    assert first["request_id"] == "given-123"
    assert first["model"] == "Qwen3-32B" and first["service"] == "a"
    assert first["status"] == 200 and first["bytes"] > 0
    assert 0 < first["ttfb_s"] <= first["total_s"]
    assert second["request_id"] == made
    assert third["status"] == 404 and third["service"] == ""


def test_access_log_text(spawn):
    backend = spawn(Mock, "a", ["Qwen3-32B"])
    router = router_over(spawn, [backend], "--access-log", "text")
    router.post("/chat/completions", chat_body(), headers={"X-Request-ID": "r1"})
    line = wait_until(
        lambda: next((ln for ln in router.output.splitlines() if "lmproxy.access" in ln), None),
        5,
        "the line",
    )
    assert 'r1 "POST /chat/completions" 200' in line
    assert "model=Qwen3-32B service=a" in line


def test_no_access_log_by_default(spawn):
    backend = spawn(Mock, "a", ["Qwen3-32B"])
    router = router_over(spawn, [backend])
    assert router.post("/chat/completions", chat_body()).status == 200
    # The request is finished and counted before the log is read, so its line would be there.
    labels = {"service": "a", "model": "Qwen3-32B", "status": "2xx"}
    wait_until(
        lambda: value(samples(router), "lmproxy_requests_total", **labels) == 1,
        5,
        "the request counted",
    )
    assert "lmproxy.access" not in router.output
    assert "lmproxy listening on" in router.output  # the log itself is there
