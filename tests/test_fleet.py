"""Fleet membership from outside the process: an InfiniLM-SVC registry, and SIGHUP reloads."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import logging
import signal
import threading
import time
from pathlib import Path

from conftest import Mock, Registry, Router, chat_body, request, wait_until


def test_registry_decides_membership_and_the_router_decides_health(spawn):
    a = spawn(Mock, "reg-a", ["Qwen3-32B"])
    sick = spawn(Mock, "reg-sick", ["Qwen3-32B"], "--fault", "unhealthy")
    other = spawn(Mock, "reg-other", ["Qwen3-32B"])
    registry = spawn(Registry)
    registry.register("service_a", a)
    registry.register("service_sick", sick)
    registry.register("service_other", other, kind="supervisor")  # not an openai-api
    router = spawn(
        Router,
        "--registry-url",
        f"http://127.0.0.1:{registry.port}",
        "--registry-sync-interval",
        "0.2",
        "--service-removal-grace-period",
        "1.5",
    )
    wait_until(lambda: len(router.listed()) == 2, 5, "the registry's services")
    router.wait_healthy(1, timeout_s=5)
    services = router.listed()
    assert services["service_a"]["origin"] == "registry"
    assert services["service_a"]["healthy"] is True
    assert services["service_sick"]["healthy"] is False  # the registry said running
    assert "service_other" not in services
    assert router.post("/v1/chat/completions", chat_body()).status == 200

    # Gone from the registry: kept for the grace period, then removed.
    registry.delete("service_sick")
    left = time.monotonic()
    wait_until(lambda: "service_sick" not in router.listed(), 5, "removal after the grace")
    assert time.monotonic() - left >= 1.2
    assert "gone from the registry for 1.5s" in router.output

    # A registry that goes away takes nothing with it.
    registry.kill()
    wait_until(lambda: "unreachable" in router.output, 5, "the failed poll to be logged")
    time.sleep(2.0)  # longer than the grace period: nothing may be removed meanwhile
    assert "service_a" in router.listed()
    assert router.post("/v1/chat/completions", chat_body()).status == 200


def test_a_service_back_in_the_registry_within_the_grace_is_kept(spawn):
    a = spawn(Mock, "flap-a", ["Qwen3-32B"])
    registry = spawn(Registry)
    registry.register("flap", a)
    router = spawn(
        Router,
        "--registry-url",
        f"http://127.0.0.1:{registry.port}/",
        "--registry-sync-interval",
        "0.2",
        "--service-removal-grace-period",
        "2",
    )
    router.wait_healthy(1, timeout_s=5)
    registry.delete("flap")
    time.sleep(0.6)  # a few polls without it
    registry.register("flap", a)
    time.sleep(2.5)  # past the grace period it would have had
    assert router.listed()["flap"]["healthy"] is True


def test_a_registry_answering_too_deep_is_logged_once_and_its_services_kept(spawn):
    """A listing nested 1,000 levels deep raised RecursionError in every poll: a
    traceback each time. It is an unreadable answer, logged once; services stay."""
    a = spawn(Mock, "deep-reg-a", ["Qwen3-32B"])
    registry = spawn(Registry)
    registry.register("service_a", a)
    router = spawn(
        Router,
        "--registry-url", f"http://127.0.0.1:{registry.port}",
        "--registry-sync-interval", "0.1",
        "--service-removal-grace-period", "0.5",
    )  # fmt: skip
    router.wait_healthy(1)
    assert request(registry.port, "POST", "/fault", {"deep": 1000}).status == 200
    polls = registry.output.count("listed")
    wait_until(lambda: registry.output.count("listed") >= polls + 10, 10, "polls, past the grace")
    assert "service_a" in router.listed()
    said = "unreachable or unreadable (JSON nested more than 64 levels deep)"
    assert router.output.count(said) == 1
    assert "Traceback" not in router.output
    assert request(registry.port, "POST", "/fault", {"deep": 0}).status == 200
    wait_until(lambda: "is readable again" in router.output, 5, "the registry readable again")


def test_a_wrong_registry_entry_is_logged_once_not_per_poll(spawn):
    a = spawn(Mock, "wrong-reg-a", ["Qwen3-32B"])
    registry = spawn(Registry)
    registry.register("service_a", a)
    registry.register("service_ftp", a, url="ftp://127.0.0.1:21")
    router = spawn(
        Router, "--registry-url", f"http://127.0.0.1:{registry.port}",
        "--registry-sync-interval", "0.1",
    )  # fmt: skip
    router.wait_healthy(1)
    polls = registry.output.count("listed")
    wait_until(lambda: registry.output.count("listed") >= polls + 10, 10, "more polls")
    assert router.output.count("registry entry 1 skipped: ") == 1
    assert list(router.listed()) == ["service_a"]


def _write_config(path: Path, backends: list[Mock], strategy: str) -> None:
    lines = [f'strategy = "{strategy}"', "health_interval = 0.5", ""]
    for backend in backends:
        lines += ["[[services]]", f'name = "{backend.name}"', f'url = "{backend.url}"', ""]
    path.write_text("\n".join(lines))


def test_sighup_reload_under_load_fails_no_request(spawn, tmp_path):
    a = spawn(Mock, "hup-a", ["Qwen3-32B"])
    b = spawn(Mock, "hup-b", ["Qwen3-32B"])
    config = tmp_path / "lmproxy.toml"
    _write_config(config, [a], "round-robin")
    router = spawn(Router, "--config", str(config))
    router.wait_healthy(1)

    stop = threading.Event()
    statuses: list[int] = []
    sockets: list[set[int]] = []
    body = json.dumps(chat_body()).encode()

    def load() -> None:
        # One keep-alive connection each: a reload must not close it.
        conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
        seen: set[int] = set()
        deadline = time.monotonic() + 30
        for _ in range(5000):
            if stop.is_set() or time.monotonic() > deadline:
                break
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            seen.add(id(conn.sock))
            statuses.append(resp.status)
        conn.close()
        sockets.append(seen)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(statuses) > 50, 10, "load to start")
        _write_config(config, [a, b], "least-outstanding")
        router.signal(signal.SIGHUP)
        wait_until(lambda: b.stats()["completed"] > 20, 10, "traffic to reach the new service")
        assert "reloaded: 2 services, strategy least-outstanding" in router.output

        _write_config(config, [b], "least-outstanding")
        router.signal(signal.SIGHUP)
        wait_until(lambda: "hup-a" not in router.listed(), 5, "the old service to go")
        served_by_a = a.stats()["completed"]
        count = len(statuses)
        wait_until(lambda: len(statuses) > count + 50, 10, "more load after the reload")
        assert a.stats()["completed"] == served_by_a

        # A broken config is refused; the router runs on as it was.
        config.write_text("strategy = [not toml")
        router.signal(signal.SIGHUP)
        wait_until(lambda: "reload failed" in router.output, 5, "the refusal to be logged")
        count = len(statuses)
        wait_until(lambda: len(statuses) > count + 20, 10, "more load after the refusal")
    finally:
        stop.set()
        for thread in threads:
            thread.join(15)
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert [len(seen) for seen in sockets] == [1] * 4  # no connection was dropped
    assert "hup-b" in router.listed()


async def test_a_loop_whose_step_fails_logs_once_backs_off_and_goes_on(caplog):
    """The registry poll, DNS discovery and the expiry of registrations each run as
    ``repeat``: whatever a step raises, the loop logs it once with its traceback,
    waits twice as long after each failure in a row, and goes on."""
    from lmproxy.fleet.sources import repeat

    caplog.set_level(logging.INFO, "lmproxy")
    loop = asyncio.get_running_loop()
    calls: list[float] = []
    done = asyncio.Event()

    async def step() -> None:
        calls.append(loop.time())
        if len(calls) <= 4:
            raise KeyError("injected by the test")
        if len(calls) == 6:
            done.set()

    task = asyncio.create_task(repeat(step, lambda: 0.0, "the test's loop", backoff_min_s=0.02))
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        task.cancel()
    waits = [later - earlier for earlier, later in itertools.pairwise(calls)]
    for waited, backoff in zip(waits, [0.02, 0.04, 0.08, 0.16], strict=False):
        assert waited >= backoff * 0.99  # asyncio's sleeps never end early
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages == [
        (logging.ERROR, "the test's loop failed (KeyError: 'injected by the test'); retrying "
         "with backoff"),
        (logging.INFO, "the test's loop works again"),
    ]  # fmt: skip
    assert caplog.records[0].exc_info is not None


async def test_the_fleet_holds_its_sources_in_rank_order_and_each_says_what_it_found():
    """Each source is one object in the fleet's list: what it lists, its fields in
    /stats, and its rank, the first source holding a name keeping it."""
    import msgspec

    from lmproxy.config import Config, ServiceSpec
    from lmproxy.fleet.membership import Fleet
    from lmproxy.fleet.roster import Roster as Services

    config = msgspec.convert(
        {
            "services": [{"name": "a", "url": "http://127.0.0.1:9", "models": ["m"]}],
            "registry_url": "http://user:secret@127.0.0.1:9",
        },
        Config,
    )
    services = Services(max_errors=config.max_errors)
    fleet = Fleet(services, config)
    assert [s.origin for s in fleet.sources] == ["config", "admin", "registry", "dns", "k8s"]
    assert fleet.status() == {"registry_url": "http://user:***@127.0.0.1:9"}
    config_source, admin, polled, dns = fleet.sources[:4]
    assert config_source.found() == {"a"}
    # A polled source cannot take a name another source holds, nor a registration
    # a configured one; a registration takes a polled source's name over.
    fleet.members.claim(ServiceSpec(url="http://127.0.0.2:9", name="a"), "dns")
    fleet.members.claim(ServiceSpec(url="http://127.0.0.3:9", name="b"), "dns")
    assert services.services["a"].origin == "config" and services.services["b"].origin == "dns"
    taken = b'{"name": "b", "url": "http://127.0.0.4:9", "models": ["m"]}'
    assert fleet.admin(b"POST", b"/services", taken)[0] == 201
    refused = b'{"name": "a", "url": "http://127.0.0.4:9", "models": ["m"]}'
    assert fleet.admin(b"POST", b"/services", refused)[0] == 409
    assert services.services["b"].origin == "admin" and admin.found() == {"b"}
    assert polled.found() == set() and dns.found() == set()
    await fleet.stop()
