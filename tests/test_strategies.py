"""Routing strategies: their guarantees in isolation, and through real router processes."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import ROOT, Mock, Router, chat_body, request, router_over, wait_until

import strategies
from lmproxy.client.request import RouteRequest, decode_head
from lmproxy.config import ServiceSpec
from lmproxy.fleet.roster import Service
from strategies.affinity import Affinity
from strategies.cache_aware import CacheAware
from strategies.least_outstanding import LeastOutstanding
from strategies.weighted import Weighted


def services(n: int, weights: list[int] | None = None) -> list[Service]:
    return [
        Service(
            ServiceSpec(
                url=f"http://10.0.0.{i + 1}:8000", name=f"s{i}", weight=(weights or [1] * n)[i]
            )
        )
        for i in range(n)
    ]


def route(
    model: str = "m",
    messages: list | None = None,
    session: str | None = None,
    user: str | None = None,
) -> RouteRequest:
    body = {"model": model, "messages": messages or [{"role": "user", "content": "hi"}]}
    if user:
        body["user"] = user
    raw = json.dumps(body).encode()
    headers = [(b"x-session-id", session.encode())] if session else []
    return RouteRequest(
        b"/v1/chat/completions", model, decode_head(b"/v1/chat/completions", raw), raw, headers
    )


def conversation(i: int, turns: int) -> list[dict]:
    """Conversation i at its turn ``turns``: the whole history, as chat clients send it."""
    messages = [{"role": "system", "content": f"system prompt {i} " + "lorem ipsum " * 200}]
    for t in range(turns):
        messages += [
            {"role": "user", "content": f"question {t}"},
            {"role": "assistant", "content": f"answer {t}"},
        ]
    return [*messages, {"role": "user", "content": f"question {turns}"}]


# --- weighted ---------------------------------------------------------------------


def test_weighted_gives_exact_shares_in_every_window():
    pool = services(3, [5, 1, 2])
    strategy = Weighted()
    picks = [strategy.choose(pool, route()).name for _ in range(8 * 10)]
    for start in range(len(picks) - 8):
        window = collections.Counter(picks[start : start + 8])
        assert window == {"s0": 5, "s1": 1, "s2": 2}, (start, window)
    # Smooth: the heavy service is interleaved, not sent five in a row.
    assert "s0s0s0" not in "".join(picks)


def test_weighted_zero_weight_gets_nothing_and_model_cursors_are_separate():
    pool = services(3, [1, 0, 1])
    strategy = Weighted()
    picks = [strategy.choose(pool, route("a")).name for _ in range(10)]
    assert "s1" not in picks
    assert strategy.choose(pool, route("b")).name == "s0"  # b starts its own cycle


def test_weighted_through_the_router(spawn):
    a = spawn(Mock, "a", ["Qwen3-32B"])
    b = spawn(Mock, "b", ["Qwen3-32B"])
    router = spawn(
        Router,
        "--backend",
        a.backend_arg("weight=3"),
        "--backend",
        b.backend_arg("weight=1"),
        "--strategy",
        "weighted",
    )
    router.wait_healthy(2)
    served = collections.Counter(
        router.post("/v1/chat/completions", chat_body()).headers["x-mock-server"] for _ in range(12)
    )
    assert served == {"a": 9, "b": 3}


# --- least-latency ------------------------------------------------------------------


def test_least_latency_prefers_the_fast_service_and_wins_back_the_slow_one(spawn):
    a = spawn(Mock, "a", ["Qwen3-32B"], "--ttft", "0.08")
    b = spawn(Mock, "b", ["Qwen3-32B"], "--ttft", "0.005")
    router = router_over(
        spawn, [a, b], "--strategy", "least-latency", "--strategy-opt", "explore=0.1"
    )

    def served(n: int) -> collections.Counter:
        return collections.Counter(
            router.post("/v1/chat/completions", chat_body(max_tokens=1)).headers["x-mock-server"]
            for _ in range(n)
        )

    first = served(40)
    assert first["b"] >= 30, first
    # The services swap speeds: probing lets a win its traffic back.
    a.set_timing(ttft=0.005)
    b.set_timing(ttft=0.08)
    served(20)  # long enough for a probe or two
    last = served(30)
    assert last["a"] >= 20, last


# --- least-outstanding --------------------------------------------------------------


def test_least_outstanding_balances_long_and_short_streams(spawn):
    a = spawn(Mock, "a", ["Qwen3-32B"], "--token-delay", "0.05")
    b = spawn(Mock, "b", ["Qwen3-32B"], "--token-delay", "0.05")
    router = router_over(spawn, [a, b], "--strategy", "least-outstanding")
    long_streams = [
        threading.Thread(
            target=router.post, args=("/v1/chat/completions", chat_body(stream=True, max_tokens=60))
        )
        for _ in range(3)
    ]
    for thread in long_streams:
        thread.start()
    wait_until(
        lambda: sum(s["in_flight"] for s in router.get("/stats").json()["services"]) == 3,
        5,
        "three long streams in flight",
    )
    loads = {s["name"]: s["in_flight"] for s in router.get("/stats").json()["services"]}
    assert sorted(loads.values()) == [1, 2]
    idle = min(loads, key=loads.get)
    # Short requests go to the service with fewer streams, not in turn.
    for _ in range(4):
        resp = router.post(
            "/v1/chat/completions", chat_body(max_tokens=1), headers={"X-Mock-Token-Delay": "0"}
        )
        assert resp.headers["x-mock-server"] == idle
    for thread in long_streams:
        thread.join(10)


def test_least_outstanding_breaks_ties_in_turn():
    pool = services(3)
    strategy = LeastOutstanding()
    assert {strategy.choose(pool, route()).name for _ in range(3)} == {"s0", "s1", "s2"}


# --- affinity -----------------------------------------------------------------------


def test_affinity_moves_about_one_nth_of_keys_when_a_service_joins():
    keys = [route(session=f"session-{i}") for i in range(5000)]
    before_pool = services(5)
    after_pool = services(6)
    strategy = Affinity()
    before = [strategy.choose(before_pool, k).url for k in keys]
    after = [strategy.choose(after_pool, k).url for k in keys]
    moved = sum(b != a for b, a in zip(before, after, strict=True)) / len(keys)
    assert moved < 1 / 6 + 0.05, moved
    # Only onto the new service: keys never move between old services.
    assert all(a == b or a == after_pool[5].url for b, a in zip(before, after, strict=True))
    # And removing one moves only that one's keys.
    fewer = [strategy.choose(before_pool[:4], k).url for k in keys]
    gone = before_pool[4].url
    assert all(f == b for b, f in zip(before, fewer, strict=True) if b != gone)


def test_affinity_spreads_keys_evenly():
    pool = services(4)
    strategy = Affinity()
    counts = collections.Counter(
        strategy.choose(pool, route(session=f"k{i}")).name for i in range(8000)
    )
    assert max(counts.values()) < 1.25 * 2000, counts


def test_affinity_bounds_the_load_of_a_hot_key():
    pool = services(4)
    strategy = Affinity({"epsilon": 0.25})
    hot = route(session="hot")
    for _ in range(400):  # one key, all requests in flight at once
        chosen = strategy.choose(pool, hot)
        chosen.in_flight += 1
        mean = sum(s.in_flight for s in pool) / len(pool)
        assert max(s.in_flight for s in pool) <= -(-1.25 * mean // 1) + 1


def test_affinity_keys_on_session_then_user_then_conversation_opening():
    pool = services(8)
    strategy = Affinity()
    # Later turns of one conversation share its opening: same service.
    targets = {strategy.choose(pool, route(messages=conversation(1, t))).name for t in range(6)}
    assert len(targets) == 1
    # A session header wins over the prompt; the user field too.
    by_session = {
        strategy.choose(pool, route(messages=conversation(i, 0), session="s")).name
        for i in range(10)
    }
    by_user = {
        strategy.choose(pool, route(messages=conversation(i, 0), user="u")).name for i in range(10)
    }
    assert len(by_session) == 1 and len(by_user) == 1


def test_two_router_processes_agree_without_shared_state(spawn):
    backends = [spawn(Mock, f"m{i}", ["Qwen3-32B"]) for i in range(3)]
    args = [a for b in backends for a in ("--backend", b.backend_arg())]
    first = spawn(Router, *args, "--strategy", "affinity")
    second = spawn(Router, *args, "--strategy", "affinity")
    first.wait_healthy(3)
    second.wait_healthy(3)
    seen = collections.Counter()
    for i in range(24):
        headers = {"X-Session-ID": f"user-{i}"}
        one = first.post("/v1/chat/completions", chat_body(), headers=headers)
        two = second.post("/v1/chat/completions", chat_body(), headers=headers)
        assert one.headers["x-mock-server"] == two.headers["x-mock-server"]
        seen[one.headers["x-mock-server"]] += 1
    assert len(seen) == 3  # and the keys did spread


# --- cache-aware --------------------------------------------------------------------


def test_cache_aware_sends_a_repeated_prefix_back_to_the_same_service():
    pool = services(3)
    strategy = CacheAware()
    for i in range(6):
        first = strategy.choose(pool, r := route(messages=conversation(i, 0)))
        strategy.on_start(first, r)
        for turns in range(1, 5):
            again = strategy.choose(pool, r := route(messages=conversation(i, turns)))
            strategy.on_start(again, r)
            assert again is first


def test_cache_aware_spreads_misses_by_load_not_to_the_first_service():
    pool = services(3)
    strategy = CacheAware({"miss": "least-loaded"})
    picks = collections.Counter()
    for i in range(30):
        chosen = strategy.choose(pool, r := route(messages=conversation(100 + i, 0)))
        strategy.on_start(chosen, r)
        picks[chosen.name] += 1
    assert picks == {"s0": 10, "s1": 10, "s2": 10}
    # A miss goes to the least-loaded service, whatever the sizes of the trees.
    pool[0].in_flight, pool[1].in_flight, pool[2].in_flight = 5, 0, 5
    assert strategy.choose(pool, route(messages=conversation(999, 0))).name == "s1"


def test_cache_aware_places_misses_where_every_router_would():
    """The default: a new conversation goes to its rendezvous choice, the same from
    two strategies that never exchanged anything (replicas), spread by weight, and
    passed on when its choice is over its load bound."""
    pool = services(3, weights=[3, 2, 1])
    one, two = CacheAware(), CacheAware()
    picks = collections.Counter()
    for i in range(600):
        r1, r2 = route(messages=conversation(i, 0)), route(messages=conversation(i, 0))
        first, second = one.choose(pool, r1), two.choose(pool, r2)
        assert first is second
        picks[first.name] += 1
        # The conversation's next turn, at the replica that never saw it, goes home too.
        later = route(messages=conversation(i, 2))
        assert two.choose(pool, later) is first
    assert 0.42 < picks["s0"] / 600 < 0.58  # 3 of 6
    assert 0.25 < picks["s1"] / 600 < 0.42  # 2 of 6
    assert 0.10 < picks["s2"] / 600 < 0.24  # 1 of 6
    # Over its bound, a key's first choice passes it on; the choice is still the same
    # from both strategies, since both see the same loads here.
    key_owner = one.choose(pool, route(messages=conversation(7, 0)))
    key_owner.in_flight = 20
    moved = one.choose(pool, route(messages=conversation(7, 0)))
    assert moved is not key_owner and two.choose(pool, route(messages=conversation(7, 0))) is moved


def test_rendezvous_moves_only_the_keys_of_a_service_that_leaves():
    from strategies.placement import Rendezvous

    pool = services(4)
    keys = range(2000)
    before = {k: Rendezvous().order(pool, k)[0] for k in keys}
    fewer = pool[:3]
    after = {k: Rendezvous().order(fewer, k)[0] for k in keys}
    moved = [k for k in keys if before[k] is not after[k]]
    assert all(before[k] is pool[3] for k in moved)
    assert 0.15 < len(moved) / len(keys) < 0.35  # about a quarter: the leaver's share


def test_cache_aware_workers_share_what_they_learn():
    """What one worker's strategy learns, another absorbs: a conversation placed by
    load on one worker is found in the other's trees."""
    pool = services(3)
    one, two = CacheAware(), CacheAware()
    one.sharing = True
    r = route(messages=conversation(5, 0))
    owner = one.choose(pool, r)
    # Make the first turn go elsewhere than its rendezvous choice: that owner is busy.
    owner.in_flight = 50
    placed = one.choose(pool, r := route(messages=conversation(5, 0)))
    assert placed is not owner
    one.on_start(placed, r)
    owner.in_flight = 0
    # Without sharing, the other worker would send the next turn to the owner.
    assert two.choose(pool, route(messages=conversation(5, 1))) is owner
    updates = one.share()
    assert updates and one.share() == []  # each prefix is handed over once
    two.absorb(updates)
    assert two.choose(pool, route(messages=conversation(5, 1))) is placed
    # Not sharing (one process): nothing is kept for others.
    lone = CacheAware()
    lone.on_start(pool[0], route(messages=conversation(6, 0)))
    assert lone.share() == []


def test_cache_aware_yields_to_load_under_imbalance():
    pool = services(2)
    strategy = CacheAware({"balance_abs": 4, "balance_rel": 1.5})
    r = route(messages=conversation(7, 0))
    home = strategy.choose(pool, r)
    strategy.on_start(home, r)
    other = pool[1] if home is pool[0] else pool[0]
    home.in_flight, other.in_flight = 4, 0  # within the absolute threshold: stays home
    assert strategy.choose(pool, route(messages=conversation(7, 1))) is home
    home.in_flight, other.in_flight = 12, 10  # over abs but not rel: stays home
    assert strategy.choose(pool, route(messages=conversation(7, 1))) is home
    home.in_flight, other.in_flight = 9, 1  # over both: yields
    assert strategy.choose(pool, route(messages=conversation(7, 1))) is other


def test_cache_aware_memory_is_bounded():
    pool = services(1)
    strategy = CacheAware({"max_entries": 100})
    for i in range(50):
        strategy.on_start(pool[0], r := route(messages=conversation(i, 3)))
        strategy.choose(pool, r)
        strategy.on_start(pool[0], r)
    assert len(strategy._trees[pool[0].url]) <= 100


def test_cache_aware_through_the_router_keeps_conversations_home(spawn):
    backends = [
        spawn(Mock, f"c{i}", ["Qwen3-32B"], "--prefix-cache-blocks", "5000") for i in range(3)
    ]
    router = router_over(spawn, backends, "--strategy", "cache-aware")
    for i in range(3):
        homes = {
            router.post(
                "/v1/chat/completions",
                {"model": "Qwen3-32B", "max_tokens": 1, "messages": conversation(i, t)},
            ).headers["x-mock-server"]
            for t in range(4)
        }
        assert len(homes) == 1
    cached = sum(b.stats()["cached_tokens"] for b in backends)
    prompt = sum(b.stats()["prompt_tokens"] for b in backends)
    assert cached / prompt > 0.6


def _homes(routers: list[Router], conversations: int, turns: int) -> list[set[str]]:
    """For each conversation, the services its turns reached; turn t goes to router
    t mod len(routers), each over a fresh connection."""
    homes = []
    for i in range(conversations):
        seen = set()
        for t in range(turns):
            resp = routers[t % len(routers)].post(
                "/v1/chat/completions",
                {"model": "Qwen3-32B", "max_tokens": 1, "messages": conversation(40 + i, t)},
            )
            assert resp.status == 200, resp
            seen.add(resp.headers["x-mock-server"])
        homes.append(seen)
    return homes


def test_cache_aware_with_workers_keeps_conversations_home(spawn):
    backends = [spawn(Mock, f"w{i}", ["Qwen3-32B"]) for i in range(3)]
    router = router_over(spawn, backends, "--workers", "2")
    homes = _homes([router], conversations=8, turns=4)
    assert all(len(h) == 1 for h in homes), homes
    assert len(set().union(*homes)) >= 2  # and the conversations did spread


def test_workers_share_what_cache_aware_learns(spawn):
    """Misses placed by each worker's own view of load (miss=least-loaded) would split a
    conversation between services; shared trees keep it home."""
    backends = [spawn(Mock, f"v{i}", ["Qwen3-32B"]) for i in range(3)]
    router = router_over(
        spawn, backends, "--workers", "2", "--strategy-opt", "miss=least-loaded",
        "--log-level", "debug",
    )  # fmt: skip

    def settled(after: int) -> bool:
        """A batch shared after the first ``after`` ones, and every batch absorbed: with
        two workers, each one by the other."""
        shared = router.output.count("shared updates")
        return shared > after and router.output.count("absorbed") == shared

    def turn(i: int, t: int) -> str:
        """Send turn ``t`` of conversation ``i``; once the other worker has what it taught
        the one that served it, the service that answered."""
        messages = conversation(60 + i, t)
        # Each turn's question crosses a prefix boundary (256 bytes): every request
        # teaches its worker something, which is shared in one batch, waited for here.
        messages[-1]["content"] += " details" * 40
        before = router.output.count("shared updates")
        body = {"model": "Qwen3-32B", "max_tokens": 1, "messages": messages}
        served = router.post("/v1/chat/completions", body).headers["x-mock-server"]
        wait_until(lambda: settled(before), 5, "the other worker to absorb it")
        return served

    for i in range(6):
        home = turn(i, 0)
        for t in range(1, 4):
            assert turn(i, t) == home


def test_two_cache_aware_routers_with_no_link_place_a_conversation_alike(spawn):
    backends = [spawn(Mock, f"r{i}", ["Qwen3-32B"]) for i in range(3)]
    first = router_over(spawn, backends)
    second = router_over(spawn, backends)
    homes = _homes([first, second], conversations=8, turns=4)
    assert all(len(h) == 1 for h in homes), homes
    assert len(set().union(*homes)) >= 2


# --- per-model strategies, loading and errors ---------------------------------------


def test_per_model_strategy_from_the_config_file(spawn, tmp_path):
    a = spawn(Mock, "a", ["m1", "m2"])
    b = spawn(Mock, "b", ["m1", "m2"])
    config = tmp_path / "lmproxy.toml"
    config.write_text(
        textwrap.dedent(f"""
        strategy = "round-robin"
        [[services]]
        name = "a"
        url = "{a.url}"
        weight = 1
        [[services]]
        name = "b"
        url = "{b.url}"
        weight = 0
        [models.m2]
        strategy = "weighted"
    """)
    )
    router = spawn(Router, "--config", str(config))
    router.wait_healthy(2)

    def servers(model: str) -> set[str]:
        return {
            router.post("/v1/chat/completions", chat_body(model)).headers["x-mock-server"]
            for _ in range(4)
        }

    assert servers("m1") == {"a", "b"}  # round-robin
    assert servers("m2") == {"a"}  # weighted: b has weight 0


def test_unknown_option_and_bad_values_stop_start_up():
    def start(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lmproxy", "--host", "127.0.0.1", "--port", "0", *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )

    result = start("--strategy", "affinity", "--strategy-opt", "colour=red")
    assert result.returncode == 2
    assert "unknown option 'colour'" in result.stderr and "epsilon" in result.stderr
    result = start("--strategy", "affinity", "--strategy-opt", "epsilon=lots")
    assert result.returncode == 2 and "epsilon='lots' is not a float" in result.stderr
    result = start("--strategy", "affinity", "--strategy-opt", "epsilon=-1")
    assert result.returncode == 2 and "epsilon must be > 0" in result.stderr
    result = start("--strategy", "nope")
    assert result.returncode == 2 and "cache-aware" in result.stderr
    result = start("--strategy", "no_such_module:Thing")
    assert result.returncode == 2 and "cannot load strategy" in result.stderr
    with pytest.raises(strategies.StrategyError, match="unknown option 'x'"):
        strategies.load("round-robin", {"x": "1"})


PLUGIN = '''
from strategies import BaseStrategy, Option


class Pinned(BaseStrategy):
    """Always the service whose name is the 'name' option."""

    summary = "always one named service (a test plugin)"
    OPTIONS = {"name": Option(str, "", "the service to pin to")}

    def choose(self, candidates, request):
        for service in candidates:
            if service.name == self.opt["name"]:
                return service
        return candidates[0]
'''


def test_strategy_from_a_separately_installed_package(spawn, tmp_path):
    package = tmp_path / "src"
    (package / "pinned_strategy").mkdir(parents=True)
    (package / "pinned_strategy" / "__init__.py").write_text(PLUGIN)
    (package / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "pinned-strategy"
        version = "1.0"
        [project.entry-points."lmproxy.strategies"]
        pinned = "pinned_strategy:Pinned"
    """)
    )
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(package),
        ],
        check=True,
        timeout=120,
    )
    env = {"PYTHONPATH": str(site)}
    listed = subprocess.run(
        [sys.executable, "-m", "lmproxy", "--list-strategies"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert "pinned" in listed.stdout and "a test plugin" in listed.stdout
    a = spawn(Mock, "a", ["Qwen3-32B"])
    b = spawn(Mock, "b", ["Qwen3-32B"])
    router = router_over(spawn, [a, b], "--strategy", "pinned", "--strategy-opt", "name=b", env=env)
    assert {
        router.post("/v1/chat/completions", chat_body()).headers["x-mock-server"] for _ in range(4)
    } == {"b"}


def test_the_documented_example_strategy_works(spawn, tmp_path):
    readme = (ROOT / "docs" / "strategies.md").read_text()
    start = readme.index("# my_strategy/__init__.py")
    code = readme[start : readme.index("```", start)]
    (tmp_path / "my_strategy.py").write_text(code)
    a = spawn(Mock, "a", ["Qwen3-32B"], "--token-delay", "0.02")
    b = spawn(Mock, "b", ["Qwen3-32B"])
    router = router_over(
        spawn,
        [a, b],
        "--strategy",
        "my_strategy:FewestTokens",
        "--strategy-opt",
        "default_tokens=64",
        env={"PYTHONPATH": str(tmp_path)},
    )
    # A long generation owes tokens on one service: the next request goes to the other.
    long = threading.Thread(
        target=router.post, args=("/v1/chat/completions", chat_body(max_tokens=50))
    )
    long.start()
    # Until a generates it: the router counts it in flight from its choice, but the
    # strategy's on_start (what it owes) only runs at the send, after a first connect.
    wait_until(lambda: a.stats()["active"] == 1, 5, "the long request")
    assert (
        request(router.port, "POST", "/v1/chat/completions", chat_body(max_tokens=1)).headers[
            "x-mock-server"
        ]
        == "b"
    )
    long.join(10)
    assert "Traceback" not in router.output
