"""--workers N: processes sharing the port, one fleet, figures of the whole router."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from typing import Any

import pytest
from conftest import Mock, Router, chat_body, router_over, wait_until
from prometheus_client.parser import text_string_to_metric_families


def _worker_pids(router: Router) -> dict[int, int]:
    """slot -> pid, the latest start of each."""
    return {
        int(slot): int(pid)
        for slot, pid in re.findall(r"worker (\d+) serving \(pid (\d+)\)", router.output)
    }


def _requests_total(router: Router) -> float:
    text = router.get("/metrics").body.decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "lmproxy_requests":
            total += sum(s.value for s in family.samples if s.name == "lmproxy_requests_total")
    return total


def test_workers_share_the_port_and_report_the_whole_router(spawn):
    backend = spawn(Mock, "w-a", ["Qwen3-32B"])
    router = spawn(Router, "--workers", "2", "--backend", backend.backend_arg())
    assert len(_worker_pids(router)) == 2
    router.wait_healthy(1)
    prefixes = set()
    for _ in range(40):  # a fresh connection each: the kernel spreads them
        resp = router.post("/v1/chat/completions", chat_body())
        assert resp.status == 200
        prefixes.add(resp.headers["x-request-id"].split("-")[0])
    assert len(prefixes) == 2  # both workers served
    stats = router.get("/stats").json()
    assert stats["services"][0]["request_count"] == 40
    assert stats["healthy_services"] == 1 and stats["queue_length"] == 0
    assert _requests_total(router) == 40


def test_registration_reaches_every_worker(spawn):
    backend = spawn(Mock, "w-reg", ["9g_8b_thinking"])
    router = spawn(Router, "--workers", "2")
    assert router.post("/services", {"name": "w-reg", "url": backend.url}).status == 201

    def everyone_sees_it() -> bool:
        return all(
            any(s["name"] == "w-reg" for s in router.get("/services").json()["services"])
            for _ in range(10)
        )

    wait_until(everyone_sees_it, 5.0, "every worker to list the registration")
    router.wait_healthy(1, timeout_s=5)
    for _ in range(10):
        assert router.post("/v1/chat/completions", chat_body("9g_8b_thinking")).status == 200
    # An InfiniLM babysitter's entry, never routed to, is listed by every worker too,
    # with the status its last heartbeat set.
    entry = {"name": "w-sitter", "url": "http://127.0.0.1:9", "metadata": {"type": "InfiniLM"}}
    assert router.post("/services", entry).status == 201
    assert router.post("/services/w-sitter/heartbeat", {"status": "stopped"}).status == 200

    def everyone_lists_it() -> bool:
        return all(
            router.listed().get("w-sitter", {}).get("status") == "stopped" for _ in range(10)
        )

    wait_until(everyone_lists_it, 5.0, "every worker to list the entry")
    assert router.get("/health").json()["healthy_services"] == "1/1"


def test_each_service_is_probed_once_per_interval(spawn):
    backend = spawn(Mock, "w-probe", ["Qwen3-32B"])
    router_over(spawn, [backend], "--workers", "2", "--health-interval", "0.5")
    start = time.monotonic()
    before = backend.stats()["paths"].count("/health")
    time.sleep(3.0)  # six intervals
    probes = backend.stats()["paths"].count("/health") - before
    elapsed = time.monotonic() - start
    assert probes <= elapsed / 0.5 + 2, probes  # once per interval, not once per worker


def test_in_flight_is_summed_over_workers(spawn):
    backend = spawn(Mock, "w-slow", ["Qwen3-32B"], "--ttft", "2")
    router = router_over(spawn, [backend], "--workers", "2")
    threads = [
        threading.Thread(target=router.post, args=("/v1/chat/completions", chat_body()))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: backend.stats()["active"] == 6, 5, "six requests under way")
    assert router.get("/stats").json()["services"][0]["in_flight"] == 6
    for thread in threads:
        thread.join(10)
    assert router.get("/stats").json()["services"][0]["in_flight"] == 0


def test_a_dead_worker_is_restarted_and_its_counts_kept(spawn):
    backend = spawn(Mock, "w-kill", ["Qwen3-32B"])
    router = router_over(spawn, [backend], "--workers", "2")
    for _ in range(20):
        assert router.post("/v1/chat/completions", chat_body()).status == 200
    assert router.get("/stats").json()["services"][0]["request_count"] == 20
    victim = _worker_pids(router)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: _worker_pids(router)[0] != victim, 10, "worker 0 to be restarted")
    assert "restarting" in router.output
    for _ in range(20):
        assert router.post("/v1/chat/completions", chat_body()).status == 200
    assert router.get("/stats").json()["services"][0]["request_count"] == 40
    assert _requests_total(router) == 40


def test_sigterm_stops_every_worker(spawn):
    backend = spawn(Mock, "w-stop", ["Qwen3-32B"])
    router = spawn(Router, "--workers", "2", "--backend", backend.backend_arg())
    pids = list(_worker_pids(router).values())
    router.signal(signal.SIGTERM)
    assert router.proc.wait(15) == 0

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_until(lambda: all(gone(p) for p in pids), 5, "the workers to exit")


def test_sighup_reaches_every_worker(spawn, tmp_path):
    a = spawn(Mock, "w-hup-a", ["Qwen3-32B"])
    b = spawn(Mock, "w-hup-b", ["9g_8b_thinking"])
    config = tmp_path / "lmproxy.toml"
    config.write_text(f'[[services]]\nname = "a"\nurl = "{a.url}"\n')
    router = spawn(Router, "--workers", "2", "--config", str(config))
    router.wait_healthy(1)
    config.write_text(
        f'strategy = "round-robin"\n[[services]]\nname = "a"\nurl = "{a.url}"\n'
        f'[[services]]\nname = "b"\nurl = "{b.url}"\n'
    )
    router.signal(signal.SIGHUP)
    router.wait_healthy(2, timeout_s=5)
    for _ in range(20):  # fresh connections: both workers route the new model
        assert router.post("/v1/chat/completions", chat_body("9g_8b_thinking")).status == 200
    assert "reloaded: 2 services, strategy round-robin" in router.output
    assert "error" not in router.output.lower()


def _every_worker_says(router: Router, healthy: str) -> bool:
    # Ten fresh connections: with two workers, each is asked ~5 times.
    return all(router.get("/health").json()["healthy_services"] == healthy for _ in range(10))


def _two_backends_two_workers(spawn, tag: str, *options: str) -> tuple[Mock, Mock, Router]:
    a = spawn(Mock, f"w-{tag}-a", ["Qwen3-32B"])
    b = spawn(Mock, f"w-{tag}-b", ["Qwen3-32B"])
    return a, b, router_over(spawn, [a, b], "--workers", "2", *options)


def test_health_changes_reach_every_worker(spawn):
    a, _, router = _two_backends_two_workers(spawn, "h", "--health-interval", "0.5")
    a.set_fault("unhealthy")
    # The supervisor's probe notices within an interval, and tells every worker; the
    # deadline is the test's patience on a loaded machine, not the design's bound.
    wait_until(lambda: _every_worker_says(router, "1/2"), 10, "every worker to see it")


def test_a_passive_ejection_in_one_worker_reaches_the_others(spawn):
    a, _, router = _two_backends_two_workers(
        spawn,
        "ej",
        "--max-errors",
        "1",
        "--health-interval",
        "60",  # no probe will notice: only requests can
        "--strategy",
        "round-robin",
    )
    a.kill()
    for _ in range(10):  # retried on b: every request still succeeds
        assert router.post("/v1/chat/completions", chat_body()).status == 200
    wait_until(lambda: _every_worker_says(router, "1/2"), 10, "every worker to eject it")
    assert "ejected by a worker" in router.output


def test_a_stopped_worker_is_killed_and_replaced(spawn):
    backend = spawn(Mock, "w-stuck", ["Qwen3-32B"])
    router = router_over(spawn, [backend], "--workers", "2", "--worker-timeout", "2")
    victim = _worker_pids(router)[0]
    os.kill(victim, signal.SIGSTOP)  # its loop stops: no heartbeat, no accept
    try:
        wait_until(
            lambda: f"(pid {victim}) sent no heartbeat" in router.output,
            15,
            "the supervisor to kill the stopped worker",
        )
        wait_until(lambda: _worker_pids(router)[0] != victim, 15, "worker 0 to be replaced")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)  # without the fix, let it go on and stop
    assert re.search(r"worker 0 \(pid \d+\) sent no heartbeat for \d+\.\ds", router.output)
    prefixes = set()
    for _ in range(40):  # fresh connections: none may land in a dead worker's queue
        resp = router.post("/v1/chat/completions", chat_body(), timeout=5)
        assert resp.status == 200
        prefixes.add(resp.headers["x-request-id"].split("-")[0])
    assert len(prefixes) == 2  # the replacement serves its share


def _listing_with(router: Router, name: str) -> dict[str, dict[str, Any]] | None:
    listed = router.listed()
    return listed if name in listed else None


@pytest.mark.parametrize("workers", ["1", "2"])  # one process, and the workers' mirror
def test_a_renamed_service_keeps_its_health_across_reloads(spawn, tmp_path, workers):
    backend = spawn(Mock, "w-rename", ["Qwen3-32B"])
    config = tmp_path / "lmproxy.toml"
    config.write_text(f'[[services]]\nname = "a0"\nurl = "{backend.url}"\n')
    router = spawn(
        Router,
        "--workers",
        workers,
        "--config",
        str(config),
        # No periodic check during the test, and the one each new name starts takes
        # 3 s: only a health carried over can make the renamed service healthy sooner.
        "--health-interval",
        "60",
        "--health-timeout",
        "10",
    )
    router.wait_healthy(1)
    backend.set_timing(health_delay=3)
    statuses: list[int] = []
    done = threading.Event()

    def bystander() -> None:
        while not done.is_set():
            statuses.append(router.post("/v1/chat/completions", chat_body()).status)

    chatting = [threading.Thread(target=bystander) for _ in range(2)]
    for thread in chatting:
        thread.start()
    try:
        for i in range(1, 21):
            config.write_text(f'[[services]]\nname = "a{i}"\nurl = "{backend.url}"\n')
            router.signal(signal.SIGHUP)
            listed = wait_until(lambda i=i: _listing_with(router, f"a{i}"), 5, f"reload {i}")
            assert list(listed) == [f"a{i}"]
            assert listed[f"a{i}"]["healthy"], listed  # before any check of the new name
    finally:
        done.set()
        for thread in chatting:
            thread.join(15)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert "service a20 is a19 renamed" in router.output


def test_a_stopped_supervisor_takes_no_worker_for_silent(spawn):
    backend = spawn(Mock, "w-paused", ["Qwen3-32B"])
    router = router_over(spawn, [backend], "--workers", "2", "--worker-timeout", "2")
    pids = _worker_pids(router)
    router.signal(signal.SIGSTOP)  # a debugger, a suspended host: the workers go on
    try:
        time.sleep(3)  # longer than --worker-timeout: the time is the scenario
    finally:
        router.signal(signal.SIGCONT)
    # /stats is the supervisor's: once it answers, the overdue check has run.
    assert router.get("/stats").json()["services"][0]["healthy"]
    assert "sent no heartbeat" not in router.output
    assert _worker_pids(router) == pids
