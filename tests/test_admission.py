"""Admission control: per-service max_in_flight, the FIFO queue, 429 with Retry-After."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from conftest import Mock, Router, chat_body, wait_until
from prometheus_client.parser import text_string_to_metric_families

from lmproxy.config import build_config, parse_backend


def _queue_gauge(router: Router) -> float:
    text = router.get("/metrics").body.decode()
    for family in text_string_to_metric_families(text):
        if family.name == "lmproxy_queue_length":
            return family.samples[0].value
    raise AssertionError("no lmproxy_queue_length in /metrics")


def test_requests_wait_for_a_slot_in_order(spawn):
    backend, router = _one_slot(spawn, "one-at-a-time", "1")
    finished: list[int] = []
    lock = threading.Lock()

    def call(index: int) -> int:
        status = router.post("/v1/chat/completions", chat_body(), timeout=15).status
        with lock:
            finished.append(index)
        return status

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call, 0)]
        wait_until(lambda: backend.stats()["active"] == 1, 5, "the first request to run")
        for index in range(1, 4):
            futures.append(pool.submit(call, index))
            # Each request in turn joins the queue behind the one before it.
            wait_until(
                lambda i=index: router.get("/stats").json()["queue_length"] == i,
                5,
                f"{index} requests to queue",
            )
        assert _queue_gauge(router) == 3
        assert not finished
        statuses = [f.result(20) for f in futures]
    assert statuses == [200] * 4
    assert finished == [0, 1, 2, 3]  # first come, first served
    assert backend.stats()["peak_active"] == 1
    assert router.get("/stats").json()["queue_length"] == 0
    service = router.get("/stats").json()["services"][0]
    assert service["max_in_flight"] == 1 and service["in_flight"] == 0


def _one_slot(spawn, name: str, ttft: str, *options: str) -> tuple[Mock, Router]:
    """A slow backend that takes one request at a time, behind a router."""
    backend = spawn(Mock, name, ["Qwen3-32B"], "--ttft", ttft)
    router = spawn(Router, "--backend", backend.backend_arg("max_in_flight=1"), *options)
    router.wait_healthy(1)
    return backend, router


def _fill_the_slot(pool: ThreadPoolExecutor, backend: Mock, router: Router) -> Future[Any]:
    first = pool.submit(router.post, "/v1/chat/completions", chat_body(), timeout=15)
    wait_until(lambda: backend.stats()["active"] == 1, 5, "the first request to run")
    return first


def test_queue_timeout_gives_429_with_retry_after(spawn):
    backend, router = _one_slot(spawn, "busy", "2", "--queue-timeout", "0.3")
    with ThreadPoolExecutor(3) as pool:
        first = _fill_the_slot(pool, backend, router)
        started = time.monotonic()
        waiting = [
            pool.submit(router.post, "/v1/chat/completions", chat_body(), timeout=15)
            for _ in range(2)
        ]
        refused = [f.result(10) for f in waiting]
        waited = time.monotonic() - started
        assert first.result(15).status == 200
    for resp in refused:
        assert resp.status == 429, resp
        assert int(resp.headers["retry-after"]) >= 1
        error = resp.json()["error"]
        assert "max_in_flight" in error and "--queue-timeout" in error
    # They did wait (a floor load cannot break), and not for the slow request to finish:
    # that would have freed the slot, and served them.
    assert waited >= 0.3
    assert backend.stats()["peak_active"] == 1


def test_queue_timeout_zero_refuses_at_once(spawn):
    backend, router = _one_slot(spawn, "busy0", "2", "--queue-timeout", "0")
    with ThreadPoolExecutor(1) as pool:
        first = _fill_the_slot(pool, backend, router)
        resp = router.post("/v1/chat/completions", chat_body())
        assert resp.status == 429 and "retry-after" in resp.headers
        assert first.result(15).status == 200


def test_a_full_service_spills_to_another_with_room(spawn):
    a = spawn(Mock, "full", ["Qwen3-32B"], "--ttft", "1")
    b = spawn(Mock, "roomy", ["Qwen3-32B"], "--ttft", "0.2")
    router = spawn(
        Router,
        "--backend",
        a.backend_arg("max_in_flight=1"),
        "--backend",
        b.backend_arg(),
        "--strategy",
        "round-robin",
    )
    router.wait_healthy(2)
    with ThreadPoolExecutor(6) as pool:
        results = list(
            pool.map(lambda _: router.post("/v1/chat/completions", chat_body()), range(6))
        )
    assert [r.status for r in results] == [200] * 6
    assert a.stats()["peak_active"] == 1
    assert b.stats()["completed"] >= 5 - a.stats()["completed"]


def test_a_client_that_hangs_up_leaves_the_queue(spawn):
    backend, router = _one_slot(spawn, "busy2", "3")
    with ThreadPoolExecutor(1) as pool:
        first = _fill_the_slot(pool, backend, router)
        body = b'{"model": "Qwen3-32B", "messages": [{"role": "user", "content": "hi"}]}'
        sock = socket.create_connection(("127.0.0.1", router.port), timeout=5)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        wait_until(lambda: router.get("/stats").json()["queue_length"] == 1, 5, "it to queue")
        sock.close()
        wait_until(lambda: router.get("/stats").json()["queue_length"] == 0, 5, "it to leave")
        assert first.result(15).status == 200
    # The request that left never reached the backend: one chat completion only.
    assert [p for p in backend.stats()["paths"] if "chat" in p] == ["/v1/chat/completions"]


def test_max_in_flight_in_config_and_backend_flag(tmp_path):
    assert parse_backend("a=http://h:1,max_in_flight=4").max_in_flight == 4
    assert parse_backend("http://h:1,max-in-flight=2").max_in_flight == 2
    config = build_config(
        {"services": [{"url": "http://h:1", "max_in_flight": 3}], "queue_timeout": 5}, {}
    )
    assert config.services[0].max_in_flight == 3 and config.queue_timeout == 5
