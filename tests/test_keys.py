"""API keys with names and limits ([[keys]]), held by one router, by the supervisor of
--workers, and across replicas through a real redis-server; priorities in the
admission queue."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Mock, Router, free_port, request, wait_until

from lmproxy.cli import load_config
from lmproxy.config import ConfigError, KeySpec
from lmproxy.keys import limits as limits_module
from lmproxy.keys.limits import Authority, Key, LocalLimits, Refusal, RemoteLimits

CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "hi"}]


def config_file(tmp_path, text: str) -> str:
    path = tmp_path / "lmproxy.toml"
    path.write_text(text)
    return str(path)


KEYS = """
[[keys]]
name = "team-a"
key = "sk-team-a"
rpm = 2

[[keys]]
name = "tokens"
key_sha256 = "SHA"
tpm = 100

[[keys]]
name = "narrow"
key = "sk-narrow"
models = ["gpt-4o-mini"]
max_in_flight = 1

[aliases]
"gpt-4o-mini" = "Qwen3-32B"
""".replace("SHA", hashlib.sha256(b"sk-tokens").hexdigest())


def client(router: Router, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{router.port}/v1", api_key=key, max_retries=0, timeout=10
    )


def chat(router: Router, key: str, **extra: Any) -> Any:
    with client(router, key) as sdk:
        return sdk.chat.completions.create(model="Qwen3-32B", messages=ASK, **extra)


def post(port: int, key: str, body: dict[str, Any] | None = None, **headers: str) -> Any:
    return request(
        port,
        "POST",
        CHAT,
        body or {"model": "Qwen3-32B", "messages": ASK},
        headers={"Authorization": f"Bearer {key}", **headers},
    )


def under_way(router: Router) -> int:
    stats = router.get("/stats", headers={"Authorization": "Bearer sk-plain"}).json()
    return int(stats["services"][0]["in_flight"])


def metric(router: Router, line: str) -> bool:
    text = router.get("/metrics", headers={"Authorization": "Bearer sk-team-a"}).body.decode()
    return line in text


def assert_rpm_holds(ports: list[int], key: str = "sk-team-a") -> None:
    """rpm = 2: of eight requests on fresh connections, spread over ``ports`` (and the
    workers behind them), the first two are served and the rest get 429."""
    statuses = [post(ports[i % len(ports)], key).status for i in range(8)]
    assert statuses == [200, 200] + [429] * 6, statuses


def assert_tpm_holds(first: int, then: int, backend: Mock) -> None:
    """tpm = 100: a stream that used 120 tokens (its client asked no usage: the router
    asked for it), then a request on ``then`` gets 429."""
    body = {"model": "Qwen3-32B", "messages": ASK, "stream": True, "max_tokens": 112}
    reply = post(first, "sk-tokens", body)
    assert reply.status == 200, reply
    last = json.loads(backend.stats()["last_body"])
    assert last["stream_options"] == {"include_usage": True}
    events = [json.loads(e) for e in reply.body.decode().split("data: ")[1:-1]]
    used = events[-1]["usage"]
    assert used["prompt_tokens"] + used["completion_tokens"] >= 120, used
    # Across processes the tokens reach the counts just after the response's last byte.
    refused = wait_until(
        lambda: (reply := post(then, "sk-tokens")).status == 429 and reply, 3, "a 429"
    )
    assert int(refused.headers["retry-after"]) >= 1
    assert "100 tokens per minute" in refused.json()["error"]


@pytest.fixture
def keyed(spawn, tmp_path):
    backend = spawn(Mock, "svc", ["Qwen3-32B"], "--stream-usage", "asked")

    def start(*args: str, extra: str = "") -> Router:
        router = spawn(
            Router, "--config", config_file(tmp_path, KEYS + extra),
            "--backend", backend.backend_arg(), "--api-key", "sk-plain",
            "--access-log", "json", *args,
        )  # fmt: skip
        router.wait_healthy(1)
        return router

    return backend, start


def test_rpm_gives_429_with_retry_after_to_the_third_request(keyed):
    _, start = keyed
    router = start()
    assert chat(router, "sk-team-a").choices[0].message.content
    assert chat(router, "sk-team-a").choices[0].message.content
    with pytest.raises(openai.RateLimitError) as caught:
        chat(router, "sk-team-a")
    response = caught.value.response
    assert response.status_code == 429 and int(response.headers["retry-after"]) == 30
    assert response.json()["error"] == (
        "API key 'team-a' is over its rate limit, 2 requests per minute; retry after 30 s"
    )
    # Keys of --api-key keep working, with no limits; an unknown key gets 401.
    for _ in range(4):
        assert post(router.port, "sk-plain").status == 200
    assert post(router.port, "sk-unknown").status == 401
    # Figures by name, never the key itself.
    text = router.get("/metrics", headers={"Authorization": "Bearer sk-plain"}).body.decode()
    assert 'lmproxy_key_requests_total{key="team-a"} 2.0' in text
    assert 'lmproxy_key_rejected_total{key="team-a",reason="rpm"} 1.0' in text
    assert 'lmproxy_key_tokens_total{key="team-a",kind="completion"}' in text
    assert "sk-team-a" not in text
    stats = router.get("/stats", headers={"Authorization": "Bearer sk-plain"}).json()
    assert stats["keys"]["team-a"]["requests"] == 2
    assert stats["keys"]["team-a"]["rejected"] == {"rpm": 1}
    logged = [
        json.loads(line.partition("lmproxy.access: ")[2])
        for line in router.output.splitlines()
        if "lmproxy.access" in line
    ]
    assert [entry.get("key") for entry in logged[:3]] == ["team-a"] * 3
    assert [entry["status"] for entry in logged[:3]] == [200, 200, 429]


def test_tpm_counts_a_streamed_response_and_refuses_the_next(keyed):
    backend, start = keyed
    router = start()
    assert_tpm_holds(router.port, router.port, backend)
    assert metric(router, 'lmproxy_key_rejected_total{key="tokens",reason="tpm"} 1.0')
    # A client that asked for usage itself gets its body as sent.
    other = post(router.port, "sk-team-a", {"model": "Qwen3-32B", "messages": ASK, "stream": True})
    assert other.status == 200 and "stream_options" not in backend.stats()["last_body"]


def test_a_key_uses_its_models_and_max_in_flight(keyed):
    backend, start = keyed
    router = start()
    # It sees its models alone; other keys see every model.
    with client(router, "sk-narrow") as sdk:
        assert [m.id for m in sdk.models.list()] == ["gpt-4o-mini"]
        assert sdk.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
        with pytest.raises(openai.NotFoundError):
            sdk.models.retrieve("Qwen3-32B")
    with client(router, "sk-team-a") as sdk:
        assert {m.id for m in sdk.models.list()} == {"Qwen3-32B", "gpt-4o-mini"}
    # Its model, by the alias it may use; the served name itself is not on its list.
    reply = post(router.port, "sk-narrow", {"model": "gpt-4o-mini", "messages": ASK})
    assert reply.status == 200
    refused = post(router.port, "sk-narrow")
    assert refused.status == 403
    assert refused.json()["error"] == (
        "API key 'narrow' may not use model 'Qwen3-32B'; it may use: gpt-4o-mini"
    )
    # max_in_flight 1: a second request while a stream is under way gets 429.
    backend.set_timing(token_delay=0.02)
    slow = {"model": "gpt-4o-mini", "messages": ASK, "stream": True, "max_tokens": 50}
    first: list[Any] = []
    worker = threading.Thread(target=lambda: first.append(post(router.port, "sk-narrow", slow)))
    worker.start()
    wait_until(lambda: under_way(router) == 1, 5, "the stream under way")
    busy = post(router.port, "sk-narrow", {"model": "gpt-4o-mini", "messages": ASK})
    assert busy.status == 429 and busy.headers["retry-after"] == "1"
    assert "max_in_flight, 1 requests under way" in busy.json()["error"]
    worker.join(10)
    assert first[0].status == 200
    assert post(router.port, "sk-narrow", {"model": "gpt-4o-mini", "messages": ASK}).status == 200


def test_a_client_that_hangs_up_gives_its_slot_back(keyed):
    backend, start = keyed
    router = start()
    backend.set_timing(token_delay=0.05)
    slow = {"model": "gpt-4o-mini", "messages": ASK, "stream": True, "max_tokens": 200}
    # Hang up mid-stream, three times: the key's one slot comes back each time.
    for _ in range(3):
        with client(router, "sk-narrow") as sdk:
            stream = sdk.chat.completions.create(**slow)
            next(iter(stream))
            stream.close()
        wait_until(
            lambda: (
                post(router.port, "sk-narrow", {"model": "gpt-4o-mini", "messages": ASK}).status
                == 200
            ),
            5,
            "the slot back",
        )


def test_limits_hold_for_the_whole_router_with_workers(keyed):
    backend, start = keyed
    router = start("--workers", "2")
    assert_rpm_holds([router.port])
    assert_tpm_holds(router.port, router.port, backend)
    assert metric(router, 'lmproxy_key_rejected_total{key="team-a",reason="rpm"} 6.0')


# --- across replicas: a real redis-server ------------------------------------------------


class Redis:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("LMPROXY_REQUIRE_REDIS"):
                raise AssertionError("redis-server is not installed (.ci/run installs it)")
            pytest.skip("redis-server is not installed (apt install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        import redis

        def answers() -> bool:
            try:
                return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
            except redis.RedisError:
                return False

        wait_until(answers, 10, "redis-server to answer")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def redis_server():
    server = Redis()
    yield server
    server.stop()


def test_limits_hold_across_replicas_with_redis(keyed, redis_server):
    backend, start = keyed
    one = start("--redis-url", redis_server.url, "--workers", "2")
    two = start("--redis-url", redis_server.url.replace("redis://", "valkey://"))  # same server
    assert_rpm_holds([one.port, two.port])
    assert_tpm_holds(one.port, two.port, backend)
    # max_in_flight across them: a stream under way on one refuses a request on the other.
    backend.set_timing(token_delay=0.02)
    slow = {"model": "gpt-4o-mini", "messages": ASK, "stream": True, "max_tokens": 50}
    worker = threading.Thread(target=lambda: post(one.port, "sk-narrow", slow))
    worker.start()
    wait_until(lambda: under_way(one) == 1, 5, "the stream under way")
    assert post(two.port, "sk-narrow", {"model": "gpt-4o-mini", "messages": ASK}).status == 429
    worker.join(10)
    # Its count came back in Redis: the other replica may now.
    wait_until(
        lambda: (
            post(two.port, "sk-narrow", {"model": "gpt-4o-mini", "messages": ASK}).status == 200
        ),
        5,
        "the slot back",
    )


def test_without_redis_each_router_keeps_its_own_limits(keyed, redis_server):
    _, start = keyed
    one = start("--redis-url", redis_server.url)
    two = start("--redis-url", redis_server.url)
    assert post(one.port, "sk-team-a").status == 200
    assert post(two.port, "sk-team-a").status == 200
    assert post(one.port, "sk-team-a").status == 429  # the two are shared
    redis_server.stop()
    # Redis is gone: each router serves under its own counts (rpm 2 each, fresh), and
    # says so once.
    assert [post(two.port, "sk-team-a").status for _ in range(3)] == [200, 200, 429]
    assert post(one.port, "sk-team-a").status == 200
    for router in (one, two):
        wait_until(lambda r=router: "Redis at" in r.output and "cannot be reached" in r.output, 5)
    assert two.output.count("cannot be reached") == 1
    # It comes back: the routers say so, and the limits are shared again.
    redis_server.start()
    wait_until(lambda: "shared again" in two.output, 10, "the router to find Redis again")
    wait_until(lambda: "shared again" in one.output, 10, "the router to find Redis again")
    assert post(one.port, "sk-team-a").status == 200
    second = post(two.port, "sk-team-a")
    assert second.status == 200, second
    assert post(one.port, "sk-team-a").status == 429


# --- priorities ---------------------------------------------------------------------


PRIORITY_KEYS = """
[[keys]]
name = "app"
key = "sk-app"
max_priority = 10

[[keys]]
name = "urgent"
key = "sk-urgent"
priority = 5
"""


def queued_fleet(spawn, tmp_path, *args: str) -> tuple[Mock, Router]:
    backend = spawn(Mock, "svc", ["Qwen3-32B"], "--token-delay", "0.02", "--tokens", "30")
    router = spawn(
        Router, "--config", config_file(tmp_path, PRIORITY_KEYS),
        "--backend", backend.backend_arg("max_in_flight=1"), *args,
    )  # fmt: skip
    router.wait_healthy(1)
    return backend, router


def send_in_order(
    router: Router, requests: list[tuple[str, str, dict[str, str]]]
) -> dict[str, Any]:
    """Send each (label, key, headers) once the previous one holds the slot or waits;
    return each label's status, and the order they were answered in."""
    done: list[str] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def send(label: str, key: str, headers: dict[str, str]) -> None:
        status = post(router.port, key, **headers).status
        with lock:
            done.append(label)
            statuses[label] = status

    threads = []
    for number, (label, key, headers) in enumerate(requests):
        thread = threading.Thread(target=send, args=(label, key, headers))
        thread.start()
        threads.append(thread)

        def arrived(number: int = number) -> bool:
            stats = router.get("/stats", headers={"Authorization": "Bearer sk-app"}).json()
            held = stats["services"][0]["in_flight"]
            return held + stats["queue_length"] + len(done) >= number + 1

        wait_until(arrived, 5, f"request {label} to arrive")
    for thread in threads:
        thread.join(10)
    return {"order": done, "status": statuses}


def test_a_higher_priority_that_arrives_later_is_served_first(spawn, tmp_path):
    _, router = queued_fleet(spawn, tmp_path)
    result = send_in_order(
        router,
        [
            ("busy", "sk-app", {}),
            ("low-1", "sk-app", {}),
            ("low-2", "sk-app", {"X-Priority": "0"}),
            ("high", "sk-app", {"X-Priority": "10"}),
            ("key-5", "sk-urgent", {"X-Priority": "99"}),  # ignored: no max_priority
        ],
    )
    assert result["order"] == ["busy", "high", "key-5", "low-1", "low-2"]
    assert set(result["status"].values()) == {200}


def test_a_full_queue_sheds_the_lowest_priority_first(spawn, tmp_path):
    _, router = queued_fleet(spawn, tmp_path, "--max-queue", "2")
    result = send_in_order(
        router,
        [
            ("busy", "sk-app", {}),
            ("low-1", "sk-app", {}),
            ("low-2", "sk-app", {}),
            ("high", "sk-app", {"X-Priority": "3"}),  # sheds low-2, the newest of the lowest
            ("low-3", "sk-app", {}),  # finds high and low-1: itself the lowest, shed
        ],
    )
    assert result["status"] == {"busy": 200, "low-1": 200, "low-2": 429, "high": 200, "low-3": 429}
    assert result["order"][:2] == ["low-2", "low-3"]  # answered at once
    assert result["order"][2:] == ["busy", "high", "low-1"]
    text = router.get("/metrics", headers={"Authorization": "Bearer sk-app"}).body.decode()
    assert "lmproxy_queue_shed_total 2.0" in text
    assert 'lmproxy_key_rejected_total{key="app",reason="shed"} 2.0' in text


def test_x_priority_is_checked(spawn, tmp_path):
    _, router = queued_fleet(spawn, tmp_path)
    above = post(router.port, "sk-app", **{"X-Priority": "11"})
    assert above.status == 403
    assert "above API key 'app''s max_priority, 10" in above.json()["error"]
    for bad_value in ("high", "1" * 13):
        bad = post(router.port, "sk-app", **{"X-Priority": bad_value})
        assert bad.status == 400 and "X-Priority must be an integer" in bad.json()["error"]
    assert post(router.port, "sk-app", **{"X-Priority": "-3"}).status == 200


def test_keys_are_applied_on_reload(spawn, tmp_path):
    backend = spawn(Mock, "svc", ["Qwen3-32B"])
    path = config_file(tmp_path, '[[keys]]\nname = "a"\nkey = "sk-a"\nrpm = 1\n')
    router = spawn(Router, "--config", path, "--backend", backend.backend_arg())
    router.wait_healthy(1)
    assert [post(router.port, "sk-a").status for _ in range(2)] == [200, 429]
    config_file(tmp_path, '[[keys]]\nname = "b"\nkey = "sk-b"\n')
    router.signal(signal.SIGHUP)
    wait_until(lambda: post(router.port, "sk-a").status == 401, 5, "the reload")
    assert [post(router.port, "sk-b").status for _ in range(3)] == [200] * 3


# --- in process: the buckets' arithmetic, the supervisor's grants, the config ---------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_key(**fields: Any) -> Key:
    return Key(KeySpec(name="k", key="sk", **fields))


def test_rpm_refills_one_request_every_60_over_rpm_seconds():
    clock = Clock()
    limits = LocalLimits(clock)
    key = make_key(rpm=3)
    grants = [limits.check(key) for _ in range(3)]
    assert not any(isinstance(g, Refusal) for g in grants)
    refused = limits.check(key)
    assert isinstance(refused, Refusal) and refused.limit == "rpm"
    assert refused.retry_after == 20  # one request's worth: 60 / 3 s
    clock.now += 19.9
    assert isinstance(limits.check(key), Refusal)
    clock.now += 0.2
    assert not isinstance(limits.check(key), Refusal)
    assert isinstance(limits.check(key), Refusal)
    clock.now += 60  # a quiet minute fills the bucket again, never more
    assert [isinstance(limits.check(key), Refusal) for _ in range(4)] == [False] * 3 + [True]


def test_tpm_admits_while_tokens_are_left_and_charges_at_the_end():
    clock = Clock()
    limits = LocalLimits(clock)
    key = make_key(tpm=100)
    first = limits.check(key)
    second = limits.check(key)  # both admitted: nothing used yet
    assert not isinstance(first, Refusal) and not isinstance(second, Refusal)
    first.end(60)
    assert not isinstance(limits.check(key), Refusal)  # 40 left
    second.end(60)  # 120 used: 20 in debt
    refused = limits.check(key)
    assert isinstance(refused, Refusal) and refused.limit == "tpm"
    assert refused.retry_after == 12  # 20 tokens at 100 a minute
    clock.now += 12.1
    assert not isinstance(limits.check(key), Refusal)


def test_max_in_flight_counts_until_the_end():
    limits = LocalLimits(Clock())
    key = make_key(max_in_flight=2)
    held = [limits.check(key), limits.check(key)]
    refused = limits.check(key)
    assert isinstance(refused, Refusal) and refused.retry_after == 1
    assert "max_in_flight, 2 requests under way" in refused.message
    held[0].end(0)
    assert not isinstance(limits.check(key), Refusal)


class FakeChannel:
    def __init__(self) -> None:
        self.closed = False
        self.replies: list[dict[str, Any]] = []

    def reply(self, request: dict[str, Any], message: dict[str, Any]) -> None:
        self.replies.append(message)


def test_the_supervisor_ends_the_grants_of_a_worker_that_died():
    limits = LocalLimits(Clock())
    key = make_key(max_in_flight=1)
    authority = Authority(limits, {"k": key})
    dead, alive = FakeChannel(), FakeChannel()
    authority.ask(dead, {"op": "limit", "key": "k", "id": 1})  # type: ignore[arg-type]
    authority.ask(alive, {"op": "limit", "key": "k", "id": 1})  # type: ignore[arg-type]
    assert dead.replies == [{"granted": True}]
    assert alive.replies[0]["limit"] == "max_in_flight"
    authority.forget(dead)  # the worker died with its request under way
    authority.ask(alive, {"op": "limit", "key": "k", "id": 2})  # type: ignore[arg-type]
    assert alive.replies[1] == {"granted": True}
    authority.end(alive, {"grant": 2, "tokens": 5})  # type: ignore[arg-type]
    assert limits.counts["k"].under_way == 0


async def test_a_grant_the_worker_stopped_waiting_for_is_ended_when_it_comes():
    """Redis decides late; the worker gave up (and ended the ask) before: the grant is
    ended as soon as it is made, and nothing of it is kept."""
    limits = LocalLimits(Clock())
    key = make_key(max_in_flight=1)
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[Any] = loop.create_future()

    class Slow:
        def check(self, key: Key) -> Any:
            return pending

        async def aclose(self) -> None:
            pass

    authority = Authority(Slow(), {"k": key})  # type: ignore[arg-type]
    worker = FakeChannel()
    authority.ask(worker, {"op": "limit", "key": "k", "id": 7})  # type: ignore[arg-type]
    authority.end(worker, {"grant": 7, "tokens": 0})  # type: ignore[arg-type]
    pending.set_result(limits.check(key))
    await asyncio.sleep(0)
    assert worker.replies == []  # no answer to a worker that stopped waiting
    assert limits.counts["k"].under_way == 0
    assert not authority._grants and not authority._deciding and not authority._ended_early


async def test_a_worker_whose_supervisor_is_silent_decides_alone(monkeypatch, caplog):
    """No answer within the ask's timeout: the worker counts alone (and says so once),
    and tells the supervisor to end whatever it grants that ask later."""
    monkeypatch.setattr(limits_module, "ASK_TIMEOUT_S", 0.05)
    loop = asyncio.get_running_loop()

    class Silent:
        closed = False

        def __init__(self) -> None:
            self.sent: list[dict[str, Any]] = []
            self.forgotten: list[int] = []

        def request(self, message: dict[str, Any]) -> tuple[int, asyncio.Future[Any]]:
            return 41 + len(self.sent), loop.create_future()  # never answered

        def forget(self, ident: int) -> None:
            self.forgotten.append(ident)

        def send(self, message: dict[str, Any]) -> None:
            self.sent.append(message)

    channel = Silent()
    remote = RemoteLimits(channel)  # type: ignore[arg-type]
    key = make_key(rpm=1)
    verdicts = []
    for _ in range(2):
        answer = remote.check(key)
        assert isinstance(answer, asyncio.Future)
        verdicts.append(await asyncio.wait_for(answer, 2))
    assert not isinstance(verdicts[0], Refusal)  # its own counts: rpm 1
    assert isinstance(verdicts[1], Refusal) and verdicts[1].limit == "rpm"
    assert channel.forgotten == [41, 42]
    assert channel.sent == [
        {"op": "limit_end", "grant": 41, "tokens": 0},
        {"op": "limit_end", "grant": 42, "tokens": 0},
    ]
    assert caplog.text.count("this worker keeps them alone") == 1


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[[keys]]\nname = "a"\n', ["give key or key_sha256"]),
        ('[[keys]]\nname = "a"\nkey = "x"\nkey_sha256 = "%s"\n' % ("0" * 64), ["one of them"]),
        ('[[keys]]\nname = "a"\nkey_sha256 = "abc"\n', ["64 hex digits"]),
        ('[[keys]]\nname = "a"\nkey = " "\n', ["key is empty"]),
        ('[[keys]]\nname = "a"\nkey = "sk-x "\n', ["spaces around it"]),
        ('[[keys]]\nname = "a b"\nkey = "x"\n', ["name 'a b'"]),
        ('[[keys]]\nname = "a"\nkey = "x"\nrpm = -1\n', ["rpm must be >= 0"]),
        ('[[keys]]\nname = "a"\nkey = "x"\n[[keys]]\nname = "a"\nkey = "y"\n', ["two [[keys]]"]),
        ('[[keys]]\nname = "a"\nkey = "x"\n[[keys]]\nname = "b"\nkey = "x"\n', ["one secret"]),
        ('[[keys]]\nname = "a"\nkey = "x"\npriority = 5\nmax_priority = 1\n', ["max_priority"]),
        ('[[keys]]\nname = "a"\nkey = "x"\nlimit = 5\n', ["limit"]),
        ('redis_url = "redis://127.0.0.1:6379"\n', ["has no [[keys]]"]),
        ('redis_url = "http://x"\n[[keys]]\nname = "a"\nkey = "x"\n', ["redis://"]),
    ],
)
def test_key_settings_are_checked(tmp_path, text, words):
    with pytest.raises(ConfigError) as caught:
        load_config(["--config", config_file(tmp_path, text)])
    for word in words:
        assert word in str(caught.value)


def test_an_api_key_that_is_also_a_named_key_is_refused(tmp_path):
    path = config_file(tmp_path, '[[keys]]\nname = "a"\nkey = "same"\n')
    with pytest.raises(ConfigError, match="one secret must name one key"):
        load_config(["--config", path, "--api-key", "same"])


def test_a_worker_that_dies_gives_its_key_slots_back(keyed):
    """--workers 2: a worker killed with a stream under way for a max_in_flight = 1 key;
    the supervisor ends its grants, so the key is not locked out for good."""
    backend, start = keyed
    router = start("--workers", "2")
    backend.set_timing(token_delay=0.05)
    slow = {"model": "gpt-4o-mini", "messages": ASK, "stream": True, "max_tokens": 400}
    small = {"model": "gpt-4o-mini", "messages": ASK}

    def cut_off() -> None:
        with contextlib.suppress(Exception):  # its worker dies mid-stream
            post(router.port, "sk-narrow", slow)

    def served() -> bool:
        try:
            return post(router.port, "sk-narrow", small).status == 200
        except OSError:  # between a worker's death and its restart
            return False

    worker = threading.Thread(target=cut_off)
    worker.start()
    wait_until(lambda: under_way(router) == 1, 5, "the stream under way")
    assert post(router.port, "sk-narrow", small).status == 429
    children = [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _parent(entry) == router.proc.pid
    ]
    assert len(children) == 2, children
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    worker.join(10)
    wait_until(served, 15, "the key's slot back, from restarted workers")


def _parent(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def test_a_count_that_drifted_in_redis_is_right_again_with_the_heartbeat(keyed, redis_server):
    """A check that timed out after Redis counted it leaves one request too many on the
    replica's count; the replica writes back what it holds with its next heartbeat."""
    import redis

    _, start = keyed
    router = start("--redis-url", redis_server.url)
    small = {"model": "gpt-4o-mini", "messages": ASK}
    assert post(router.port, "sk-narrow", small).status == 200  # the replica now writes it
    store = redis.Redis(port=redis_server.port)
    beats = store.keys("lmproxy:replica:*")
    assert len(beats) == 1
    # A heartbeat after the request ended, so that the drift comes while none is under
    # way (the replica writes back its count of none too).
    seen = [store.pttl(beats[0])]

    def beat() -> bool:  # the heartbeat's time to live rose since the last look
        seen.append(store.pttl(beats[0]))
        return seen[-1] > seen[-2]

    wait_until(beat, 8, "a heartbeat")
    replica = beats[0].decode().rpartition(":")[2]
    store.hset("lmproxy:in_flight:narrow", replica, 1)  # as a lost answer leaves it
    assert post(router.port, "sk-narrow", small).status == 429
    wait_until(lambda: post(router.port, "sk-narrow", small).status == 200, 12, "the heartbeat")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_every_grant_ends_whatever_the_clients_do(keyed, workers):
    """Thirty clients at once on a key with max_in_flight = 1: some are refused, some
    hang up before, during or right after their stream, some read it whole. When they
    are gone the key has nothing under way (/stats), and serves again."""
    import random
    import socket

    backend, start = keyed
    router = start("--workers", workers)
    backend.set_timing(token_delay=0.01)
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": ASK, "stream": True, "max_tokens": 30}
    ).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-narrow\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    rng = random.Random(7)

    def client(read: int) -> None:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", router.port), timeout=5) as sock,
        ):
            sock.sendall(head + body)
            got = 0
            while got < read:
                data = sock.recv(4096)
                if not data:
                    break
                got += len(data)

    threads = [
        threading.Thread(target=client, args=(rng.choice([0, 1, 300, 2000, 10**6]),))
        for _ in range(30)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)

    def idle() -> bool:
        stats = router.get("/stats", headers={"Authorization": "Bearer sk-plain"}).json()
        return stats["keys"]["narrow"]["in_flight"] == 0

    wait_until(idle, 10, "the key's requests under way back to none")
    small = {"model": "gpt-4o-mini", "messages": ASK}
    assert post(router.port, "sk-narrow", small).status == 200


# --- a tpm key is charged when its answer ends without usage -----------------------------


CONTENT_DELTA = b'"delta":{"content":'  # the simulator's content events (not its role event)
KNOWN_REASONS = {"rpm", "tpm", "max_in_flight", "shed", "model", "priority"}


def hang_up_after(port: int, key: str, body: dict[str, Any], deltas: int) -> tuple[int, int]:
    """Send a stream on a raw socket and close it as soon as ``deltas`` content events
    have come (or at once, on any status but 200): (status, content events seen)."""
    import socket

    data = json.dumps(body).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nX-Mock-Fault: stall-mid-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % (key.encode(), len(data))
    )
    got = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + data)
        while got.count(CONTENT_DELTA) < deltas:
            piece = sock.recv(65536)
            if not piece:
                break
            got += piece
            if len(got) >= 12 and not got.startswith(b"HTTP/1.1 200"):
                break
    return int(got[9:12]), got.count(CONTENT_DELTA)


def key_figures(router: Router, name: str) -> dict[str, Any]:
    stats = router.get("/stats", headers={"Authorization": "Bearer sk-plain"}).json()
    return stats["keys"][name]


BUDGET_KEY = """
[[keys]]
name = "budget"
key = "sk-budget"
tpm = 2000
"""


@pytest.mark.parametrize("keeper", ["one process", "workers", "redis"])
def test_streams_whose_clients_hang_up_before_their_usage_are_charged(keyed, keeper, request):
    """tpm = 2000: twenty streams of 200 content events each, whose clients hang up
    right after the last one (the backend then stalls: its usage chunk never comes).
    Each is charged what was relayed (an event a token, and its prompt), so the key
    runs out of tokens and the later ones get 429, whoever keeps the counts."""
    _, start = keyed
    args = {
        "one process": [],
        "workers": ["--workers", "2"],
        "redis": ["--redis-url", request.getfixturevalue("redis_server").url],
    }[keeper]
    router = start(*args, extra=BUDGET_KEY)
    body = {"model": "Qwen3-32B", "messages": ASK, "stream": True, "max_tokens": 400}
    results = [hang_up_after(router.port, "sk-budget", body, 200) for _ in range(20)]
    served = [seen for status, seen in results if status == 200]
    assert all(seen == 200 for seen in served), results  # the stall: 400 // 2 events
    refused = [status for status, _ in results if status == 429]
    assert results[0][0] == 200 and refused and len(served) + len(refused) == 20, results
    assert len(served) <= 10, results  # about 230 tokens each, against 2000 a minute
    over = post(router.port, "sk-budget")
    assert over.status == 429 and "2000 tokens per minute" in over.json()["error"]
    # Charged one token per event relayed (the role's and 200 content events) and the
    # prompt's estimate, for every stream that was served.
    figures = wait_until(
        lambda: (
            (f := key_figures(router, "budget"))["completion_tokens"] >= 200 * len(served) and f
        ),
        5,
        "the charges in /stats",
    )
    assert figures["completion_tokens"] <= 202 * len(served), figures
    assert figures["prompt_tokens"] >= 20 * len(served), figures
    assert figures["prompt_tokens"] + figures["completion_tokens"] >= 2000, figures
    assert metric(router, 'lmproxy_key_rejected_total{key="budget",reason="tpm"}')


def _sse_event(payload: dict[str, Any]) -> bytes:
    event = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
_ROLE = _sse_event({"choices": [{"delta": {"role": "assistant", "content": ""}}]})
_WORDS = b"".join(_sse_event({"choices": [{"delta": {"content": "w "}}]}) for _ in range(5))
_USAGE = _sse_event(
    {"choices": [], "usage": {"prompt_tokens": 1234, "completion_tokens": 5, "total_tokens": 1239}}
)
_ANSWER = json.dumps({"choices": [{"message": {"content": "x" * 400}}]}).encode()
_WHOLE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(
    _ANSWER
)


_CUT_USAGE = _USAGE[: _USAGE.index(b"1234") + 1]  # its prompt count arrived as "1"
# Where the client hangs up: what of the answer was relayed, and the events in it.
CUTS = {
    "before the answer": (b"", 0),
    "after the head": (_STREAM_HEAD, 0),
    "mid-stream": (_STREAM_HEAD + _ROLE + _WORDS[: len(_WORDS) // 2], 4),  # 3rd word cut
    "after the last content event": (_STREAM_HEAD + _ROLE + _WORDS, 6),
    "in the usage chunk": (_STREAM_HEAD + _ROLE + _WORDS + _CUT_USAGE, 7),
    "in an answer that is not a stream": (_WHOLE + _ANSWER[:200], 0),
}


@pytest.mark.parametrize("cut", list(CUTS))
async def test_a_tpm_key_is_charged_wherever_its_client_hangs_up(cut):
    """In process, byte by byte: the client of a tpm key hangs up with ``relayed`` of
    the answer sent; the key is charged its prompt's estimate (the body's bytes / 4)
    and one token per event relayed (a body that is not a stream: its bytes / 4)."""
    from inproc import Harness, chat_request

    relayed, events = CUTS[cut]
    h = Harness(keys=[KeySpec(name="k", key="sk-k", tpm=2000)])
    backend, upstream = h.backend()
    client, _ = h.client()
    body = json.dumps({"model": "Qwen3-32B", "messages": ASK, "stream": True}).encode()
    client.data_received(chat_request(body, extra=b"Authorization: Bearer sk-k\r\n"))
    await h.turn()
    forwarded = upstream.take()
    sent = forwarded[forwarded.index(b"\r\n\r\n") + 4 :]  # with stream_options added
    if relayed:
        backend.data_received(relayed)
    client.connection_lost(None)
    await h.turn()
    figures = h.router.metrics.key_counts()["k"]
    completion = (len(relayed) - len(_WHOLE)) // 4 if relayed.startswith(_WHOLE) else events
    assert (figures["prompt_tokens"], figures["completion_tokens"]) == (len(sent) // 4, completion)
    assert h.router.limits.under_way("k") == 0
    assert h.router.limits.counts["k"].tokens_full_at > 0  # taken from the bucket


async def test_a_tpm_key_is_charged_its_usage_when_it_came_whole():
    """The usage chunk arrived, then the client hung up before [DONE]: its usage is
    the charge, not the estimate. Requests without a tpm key count nothing relayed."""
    from inproc import Harness, chat_request

    from lmproxy.journey.exchange import Exchange, MeteredExchange
    from lmproxy.journey.journey import Journey

    h = Harness(
        keys=[KeySpec(name="k", key="sk-k", tpm=2000), KeySpec(name="r", key="sk-r", rpm=9)],
        api_keys=["sk-plain"],
    )
    body = json.dumps({"model": "Qwen3-32B", "messages": ASK, "stream": True}).encode()
    for key, kind in ((b"sk-r", Exchange), (b"sk-plain", Exchange), (b"sk-k", MeteredExchange)):
        backend, _ = h.backend()
        client, _ = h.client()
        client.data_received(chat_request(body, extra=b"Authorization: Bearer %s\r\n" % key))
        await h.turn()
        journey = client.underway
        assert isinstance(journey, Journey) and type(journey.try_) is kind
        backend.data_received(_STREAM_HEAD + _ROLE + _WORDS + _USAGE)
        client.connection_lost(None)
        await h.turn()
    figures = h.router.metrics.key_counts()["k"]
    assert (figures["prompt_tokens"], figures["completion_tokens"]) == (1234, 5)


# --- a "Redis" that answers the wrong type is not believed -----------------------------


class AnswersOK:
    """A server on loopback that reads Redis commands (RESP arrays) and answers each
    with +OK, whatever it asked: the type every script reply and count is not."""

    def __init__(self) -> None:
        import socketserver

        self.commands: list[bytes] = []
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                pending = b""
                while True:
                    data = self.request.recv(65536)
                    if not data:
                        return
                    pending += data
                    while (end := _resp_command_end(pending)) is not None:
                        command, pending = pending[:end], pending[end:]
                        server.commands.append(command.split(b"\r\n")[2].upper())
                        self.request.sendall(b"+OK\r\n")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _resp_command_end(data: bytes) -> int | None:
    """Where the first whole command (``*N`` bulk strings) in ``data`` ends, if any."""
    line_end = data.find(b"\r\n")
    if line_end < 0:
        return None
    count, at = int(data[1:line_end]), line_end + 2
    for _ in range(count):
        line_end = data.find(b"\r\n", at)
        if line_end < 0:
            return None
        at = line_end + 2 + int(data[at + 1 : line_end]) + 2
        if at > len(data):
            return None
    return at


def test_a_redis_that_answers_ok_to_everything_is_not_believed(keyed):
    """Every keyed request used to get 429 "over its max_in_flight", counted under the
    reason '79' (the byte O). Now the answers are checked: the router says once that
    the server's answers are wrong, keeps the limits with its own counts (rpm 2: two
    served, then 429 for rpm), and keeps probing without saying it again."""
    _, start = keyed
    fake = AnswersOK()
    try:
        # RESP2: a RESP3 client's HELLO, answered +OK, fails already as a handshake.
        router = start("--redis-url", f"redis://127.0.0.1:{fake.port}/0?protocol=2")
        assert [post(router.port, "sk-team-a").status for _ in range(3)] == [200, 200, 429]
        small = {"model": "gpt-4o-mini", "messages": ASK}
        assert post(router.port, "sk-narrow", small).status == 200
        # Three heartbeats later (each runs a script, to which +OK is no answer) it has
        # still said it once.
        wait_until(lambda: fake.commands.count(b"SET") >= 3, 10, "three heartbeats")
        assert router.output.count("answers as Redis does not") == 1, router.output
        assert "shared again" not in router.output
        text = router.get("/metrics", headers={"Authorization": "Bearer sk-plain"}).body.decode()
        reasons = re.findall(r'lmproxy_key_rejected_total\{key="[^"]*",reason="([^"]*)"\}', text)
        assert reasons == ["rpm"], reasons
        assert set(reasons) <= KNOWN_REASONS
    finally:
        fake.stop()


@pytest.mark.parametrize(
    "reply",
    [
        b"OK",
        True,
        79,
        [b"rpm"],
        [b"rpm", b"1", b"2"],
        [b"79", b"0"],  # a limit no key has
        [b"max_in_flight", b"1000"],  # one this key does not have
        [b"rpm", b"-1"],
        [b"rpm", b"nan"],
        [b"rpm", b"inf"],
        [b"rpm", b"soon"],
        [b"rpm", b"1" * 33],
        [b"rpm", 5],
        [None, b"0"],
    ],
)
def test_a_limit_check_reply_of_the_wrong_type_or_range_is_refused(reply):
    from lmproxy.keys.redis_limits import WrongAnswer, check_reply

    with pytest.raises(WrongAnswer):
        check_reply(reply, make_key(rpm=5, tpm=100))


def test_a_limit_check_reply_as_the_script_makes_it_is_taken():
    from lmproxy.keys.redis_limits import check_ended, check_heartbeat, check_reply

    key = make_key(rpm=5, tpm=100)
    assert check_reply([b"", b"0"], key) == ("", 0.0)
    assert check_reply([b"tpm", b"1500.5"], key) == ("tpm", 1500.5)
    assert check_reply(["rpm", "12"], key) == ("rpm", 12.0)  # decode_responses in the URL
    check_ended(1)
    check_heartbeat([True, 1, 0, 1], 2)
