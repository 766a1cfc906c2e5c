"""A backend's 5xx counts: retried on another service, and a circuit breaker per service.

The state machine (``lmproxy/fleet/breaker.py``) and the registry's routing of it are tested
without a network first; then real processes: a simulator answering 500 to every
request while its /health says 200, beside a good one.
"""

from __future__ import annotations

import re

import pytest
from conftest import Mock, chat_body, router_over, wait_until
from test_pd import CHAT, MODEL, decode, pd_router, prefill

from lmproxy.cli import load_config
from lmproxy.config import ConfigError, ServiceSpec
from lmproxy.fleet.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from lmproxy.fleet.roster import Roster

# --- the state machine -------------------------------------------------------------


def test_closed_opens_after_the_threshold_of_failures_in_a_row():
    breaker = Breaker(3, 2, 10.0)
    assert not breaker.failed(0.0) and not breaker.failed(0.0)
    assert breaker.succeeded() is False  # a success ends the streak
    assert breaker.state == CLOSED and breaker.clean
    assert not breaker.failed(1.0) and not breaker.failed(1.0)
    assert breaker.routable and not breaker.clean
    assert breaker.failed(1.0)  # the third in a row
    assert breaker.state == OPEN and not breaker.routable and breaker.opened_total == 1
    assert not breaker.failed(2.0)  # a late failure of a request sent before: no change
    assert breaker.opened_total == 1


def test_open_becomes_half_open_after_its_timeout_and_lets_one_request_through():
    breaker = Breaker(1, 2, 10.0)
    breaker.failed(100.0)
    assert not breaker.due(109.9) and breaker.state == OPEN
    assert breaker.due(110.0) and breaker.state == HALF_OPEN and breaker.routable
    assert breaker.begin_trial()  # the one request let through
    assert not breaker.routable and not breaker.begin_trial()
    assert breaker.end_trial() and breaker.routable
    assert not breaker.end_trial()


def test_half_open_closes_after_the_success_threshold_and_a_failure_reopens_it():
    breaker = Breaker(1, 2, 10.0)
    breaker.failed(0.0)
    breaker.due(10.0)
    assert not breaker.succeeded() and breaker.state == HALF_OPEN  # 1 of 2
    assert breaker.succeeded() and breaker.state == CLOSED and breaker.clean
    breaker.failed(20.0)
    breaker.due(30.0)
    breaker.succeeded()
    assert breaker.failed(31.0)  # half-open: one failure reopens, the timeout anew
    assert breaker.state == OPEN and breaker.opened_total == 3
    assert not breaker.due(40.9) and breaker.due(41.0)
    assert breaker.successes == 0  # the success before the failure does not carry over


def test_a_late_success_while_open_proves_nothing():
    breaker = Breaker(1, 1, 10.0)
    breaker.failed(0.0)
    assert not breaker.succeeded() and breaker.state == OPEN


def test_a_threshold_of_0_never_opens_and_turning_it_off_closes_an_open_one():
    off = Breaker(0, 1, 10.0)
    for _ in range(100):
        assert not off.failed(0.0)
    assert off.state == CLOSED and off.clean  # the success path stays free
    on = Breaker(1, 1, 10.0)
    on.failed(0.0)
    assert on.configure(0, 1, 10.0)  # --cb-failure-threshold 0 on a reload
    assert on.state == CLOSED and on.routable and on.clean


def _registry(*names: str) -> Roster:
    roster = Roster()
    roster.configure_breakers(2, 1, 5.0)
    for name in names:
        roster.add(ServiceSpec(url=f"http://127.0.0.1:9/{name}", name=name, models=["m"]))
        roster.probe_passed(roster.services[name], None)
    return roster


def test_an_open_breaker_takes_a_healthy_service_out_of_routing():
    roster = _registry("a", "b")
    a, b = roster.services["a"], roster.services["b"]
    roster.answered_error(a, 500)
    assert roster.candidates("m") == [a, b]
    roster.request_failed(a, "connection refused")  # a connect failure counts the same
    assert roster.candidates("m") == [b] and a.healthy  # healthy: its checks pass
    assert a.consecutive_errors == 1  # only the connect failure counts for --max-errors
    # All out: the 503 says why.
    roster.answered_error(b, 503)
    roster.answered_error(b, 503)
    assert roster.candidates("m") == []
    why = roster.why_unavailable("m")
    assert "a: circuit breaker open (last: connection refused)" in why
    assert "b: circuit breaker open (last: answered 503)" in why


def test_half_open_routes_one_request_at_a_time_and_its_verdict_decides():
    roster = _registry("a", "b")
    a, b = roster.services["a"], roster.services["b"]
    roster.answered_error(a, 500)
    roster.answered_error(a, 500)
    roster.recover_circuits(a.breaker.opened_at + 4.9)
    assert roster.candidates("m") == [b] and roster.open_circuits == {a}
    roster.recover_circuits(a.breaker.opened_at + 5.0)
    assert roster.candidates("m") == [a, b] and not roster.open_circuits
    a.acquire()  # the trial: no other request beside it
    assert roster.candidates("m") == [b]
    a.release()  # back in, until its verdict...
    assert roster.candidates("m") == [a, b]
    roster.answered_error(a, 502)  # ... which reopens it
    assert roster.candidates("m") == [b] and a.breaker.opened_total == 2
    roster.recover_circuits(a.breaker.opened_at + 5.0)
    a.acquire()
    a.release()
    roster.request_succeeded(a)  # success threshold 1: closed
    assert a.breaker.state == CLOSED and roster.candidates("m") == [a, b]


def test_the_flags_and_their_checks():
    config = load_config(["--cb-failure-threshold", "4", "--cb-success-threshold", "2"])
    assert config is not None
    assert config.breaker_settings == (4, 2, 60.0) and config.retry_on_5xx
    config = load_config(["--disable-circuit-breaker", "--no-retry-on-5xx"])
    assert config is not None
    assert config.breaker_settings[0] == 0 and not config.retry_on_5xx
    with pytest.raises(ConfigError, match="--cb-timeout-duration-secs must be >= 0"):
        load_config(["--cb-timeout-duration-secs", "-1"])


# --- real processes ------------------------------------------------------------------


def _sent(mock: Mock) -> int:
    return mock.stats()["paths"].count(CHAT)


def _metric(router, name: str, service: str) -> float:
    page = router.get("/metrics").body.decode()
    found = re.search(rf'^{name}{{service="{service}"}} (\S+)$', page, re.M)
    assert found is not None, name
    return float(found.group(1))


def test_a_service_answering_500_loses_no_request_and_its_breaker_opens_then_closes(spawn):
    broken = spawn(Mock, "broken", [MODEL], "--fault", "500")  # /health still 200
    good = spawn(Mock, "good", [MODEL])
    router = router_over(
        spawn, [broken, good], "--strategy", "round-robin", "--health-interval", "60",
        "--load-interval", "0", "--cb-failure-threshold", "3", "--cb-success-threshold", "2",
        "--cb-timeout-duration-secs", "1", "--max-errors", "1",
    )  # fmt: skip
    for _ in range(12):
        reply = router.post(CHAT, chat_body())
        assert reply.status == 200, reply  # retried on good: the 500 was dropped
        assert reply.headers["x-mock-server"] == "good"
    stats = router.stats_of("broken")
    assert stats["healthy"] is True  # its health path passes; --max-errors ignores 5xx
    opened = stats["circuit_opened"]
    assert opened >= 1 and stats["error_count"] == _sent(broken)
    # Three 500s opened it; each later opening cost one half-open trial, no more.
    assert _sent(broken) == 3 + (opened - 1)
    assert _sent(good) == 12
    # Half-open after the timeout (and so until a request comes): its trial is the
    # next request it is chosen for; it fails, and it opens again.
    wait_until(lambda: router.stats_of("broken")["circuit"] == "half-open", 10, "half-open")
    assert router.listed()["broken"]["circuit"] == "half-open"
    assert _metric(router, "lmproxy_circuit_state", "broken") == 2
    sent = _sent(broken)
    for _ in range(10):
        assert router.post(CHAT, chat_body()).headers["x-mock-server"] == "good"
        if _sent(broken) > sent:
            break
    assert _sent(broken) == sent + 1  # one request let through, and only one
    assert router.stats_of("broken")["circuit_opened"] == opened + 1
    assert _metric(router, "lmproxy_circuit_opened_total", "broken") == opened + 1
    # Mended: two successful trials close it, and it serves its share again.
    broken.set_fault("none")
    wait_until(lambda: router.stats_of("broken")["circuit"] == "half-open", 10, "half-open")
    served = set()
    for _ in range(40):
        reply = router.post(CHAT, chat_body())
        assert reply.status == 200
        served.add(reply.headers["x-mock-server"])
        if router.stats_of("broken")["circuit"] == "closed":
            break
    assert router.stats_of("broken")["circuit"] == "closed"
    assert router.listed()["broken"]["circuit"] == "closed"
    assert _metric(router, "lmproxy_circuit_state", "broken") == 0
    servers = {router.post(CHAT, chat_body()).headers["x-mock-server"] for _ in range(4)}
    assert servers == {"broken", "good"}
    assert "circuit breaker open" in router.output and "circuit breaker closed" in router.output


def test_without_retry_on_5xx_the_500_is_relayed_and_the_breaker_still_counts(spawn):
    broken = spawn(Mock, "broken", [MODEL], "--fault", "500")
    good = spawn(Mock, "good", [MODEL])
    router = router_over(
        spawn, [broken, good], "--strategy", "round-robin", "--health-interval", "60",
        "--no-retry-on-5xx", "--cb-failure-threshold", "2", "--cb-timeout-duration-secs", "60",
    )  # fmt: skip
    statuses = [router.post(CHAT, chat_body()) for _ in range(8)]
    failed = [r for r in statuses if r.status != 200]
    assert len(failed) == 2  # the two that opened the breaker; then good alone
    assert all(r.status == 500 and r.json() == {"error": "simulated 500"} for r in failed)
    assert router.stats_of("broken")["circuit"] == "open" and _sent(broken) == 2
    assert _metric(router, "lmproxy_circuit_state", "broken") == 1
    assert _metric(router, "lmproxy_circuit_opened_total", "broken") == 1
    assert _metric(router, "lmproxy_circuit_state", "good") == 0
    assert router.listed()["broken"]["circuit"] == "open"


def test_a_lone_service_s_500_is_relayed_then_its_open_breaker_is_a_503_naming_it(spawn):
    broken = spawn(Mock, "broken", [MODEL], "--fault", "500")
    router = router_over(
        spawn, [broken], "--cb-failure-threshold", "2", "--cb-timeout-duration-secs", "60"
    )
    for _ in range(2):  # nowhere else to go: the answer as it was
        reply = router.post(CHAT, chat_body())
        assert reply.status == 500 and reply.json() == {"error": "simulated 500"}
    reply = router.post(CHAT, chat_body())
    assert reply.status == 503
    assert "broken: circuit breaker open (last: answered 500)" in reply.json()["error"]
    assert _sent(broken) == 2


def test_a_4xx_is_never_retried_and_never_counts_against_the_service(spawn):
    refusing = spawn(Mock, "refusing", [MODEL], "--fault", "400")
    good = spawn(Mock, "good", [MODEL])
    router = router_over(
        spawn, [refusing, good], "--strategy", "round-robin", "--health-interval", "60",
        "--cb-failure-threshold", "1",
    )  # fmt: skip
    replies = [router.post(CHAT, chat_body()) for _ in range(6)]
    assert sorted(r.status for r in replies) == [200] * 3 + [400] * 3
    assert _sent(refusing) == 3 and _sent(good) == 3  # the 400s went nowhere else
    assert router.stats_of("refusing")["circuit"] == "closed"


def test_a_429_is_retried_elsewhere_but_never_opens_the_breaker(spawn):
    busy = spawn(Mock, "busy", [MODEL], "--fault", "429")
    good = spawn(Mock, "good", [MODEL])
    router = router_over(
        spawn, [busy, good], "--strategy", "round-robin", "--health-interval", "60",
        "--cb-failure-threshold", "1",
    )  # fmt: skip
    for _ in range(6):
        reply = router.post(CHAT, chat_body())
        assert reply.status == 200 and reply.headers["x-mock-server"] == "good"
    stats = router.stats_of("busy")
    assert stats["circuit"] == "closed" and stats["circuit_opened"] == 0
    assert _sent(busy) >= 3  # busy, not broken: still asked (a 5xx would have opened it)
    assert stats["error_count"] == _sent(busy)


def test_a_stream_cut_after_its_first_byte_is_not_retried_but_counts(spawn):
    cutting = spawn(Mock, "cutting", [MODEL], "--fault", "close-mid-stream")
    good = spawn(Mock, "good", [MODEL])
    router = router_over(
        spawn, [cutting, good], "--strategy", "round-robin", "--health-interval", "60",
        "--cb-failure-threshold", "1", "--max-errors", "0",
    )  # fmt: skip
    reply = router.post(CHAT, chat_body(stream=True))  # round-robin: cutting first
    assert reply.status == 200 and reply.headers["x-mock-server"] == "cutting"
    assert b"the backend failed mid-stream" in reply.body
    assert _sent(good) == 0  # nothing is retried once a byte reached the client
    assert router.stats_of("cutting")["circuit"] == "open"
    assert router.post(CHAT, chat_body()).headers["x-mock-server"] == "good"


@pytest.mark.parametrize("mode", ["vllm", "sglang"])
def test_a_decode_answering_500_before_its_first_byte_is_retried_with_a_new_pair(spawn, mode):
    p = prefill(spawn, mode)
    bad = decode(spawn, mode, "bad", "--fault", "500")
    good = decode(spawn, mode, "good")
    router = pd_router(
        spawn, mode, [p], [bad, good], "--decode-strategy", "round-robin",
        "--cb-failure-threshold", "2",
    )  # fmt: skip
    for _ in range(4):
        reply = router.post(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert reply.status == 200, reply.body
    assert router.stats_of(f"127.0.0.1:{bad.port}")["circuit"] == "open"
    assert router.stats_of(f"127.0.0.1:{p.port}")["circuit"] == "closed"  # not the prefill's


def test_with_workers_each_has_its_breakers_and_the_router_shows_the_worst(spawn):
    broken = spawn(Mock, "broken", [MODEL], "--fault", "500")
    good = spawn(Mock, "good", [MODEL])
    router = router_over(
        spawn, [broken, good], "--workers", "2", "--strategy", "round-robin",
        "--health-interval", "60", "--cb-failure-threshold", "1",
        "--cb-timeout-duration-secs", "60",
    )  # fmt: skip
    for _ in range(8):
        reply = router.post(CHAT, chat_body())
        assert reply.status == 200 and reply.headers["x-mock-server"] == "good"
    stats = router.stats_of("broken")
    assert stats["circuit"] == "open"
    # Each worker that met broken opened its own breaker at its first 500, and sent it
    # nothing more.
    assert stats["circuit_opened"] == _sent(broken) >= 1
    assert _metric(router, "lmproxy_circuit_state", "broken") == 1
    assert _metric(router, "lmproxy_circuit_opened_total", "broken") == _sent(broken)
    assert router.stats_of("good")["circuit"] == "closed"


def test_with_the_breaker_off_a_500_service_keeps_being_asked_but_nothing_is_lost(spawn):
    broken = spawn(Mock, "broken", [MODEL], "--fault", "500")
    good = spawn(Mock, "good", [MODEL])
    router = router_over(
        spawn, [broken, good], "--strategy", "round-robin", "--health-interval", "60",
        "--disable-circuit-breaker",
    )  # fmt: skip
    for _ in range(6):
        reply = router.post(CHAT, chat_body())
        assert reply.status == 200 and reply.headers["x-mock-server"] == "good"
    assert _sent(broken) == 6  # round-robin offers it each one first: retried each time
    assert router.stats_of("broken")["circuit"] == "closed"


@pytest.mark.parametrize("status", ["502", "503", "504"])
def test_each_server_error_is_retried_and_counted_by_the_breaker(spawn, status):
    broken = spawn(Mock, "broken", [MODEL], "--fault", status)
    good = spawn(Mock, "good", [MODEL])
    router = router_over(
        spawn, [broken, good], "--strategy", "round-robin", "--health-interval", "60",
        "--cb-failure-threshold", "1", "--cb-timeout-duration-secs", "60",
    )  # fmt: skip
    reply = router.post(CHAT, chat_body())  # round-robin: broken first
    assert reply.status == 200 and reply.headers["x-mock-server"] == "good"
    assert _sent(broken) == 1 and router.stats_of("broken")["circuit"] == "open"
    assert router.stats_of("broken")["last_error"] == f"answered {status}"
