"""The simulator's engine model, and the benchmarks that depend on it, in smoke mode."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, Mock, chat_body, request, wait_until

from lmproxy.sim.engine import Engine


def test_prefix_cache_skips_prefill_and_reports_cached_tokens(spawn):
    backend = spawn(
        Mock, "e", ["Qwen3-32B"], "--prefill-per-token", "0.0005", "--prefix-cache-blocks", "1000"
    )
    body = chat_body(
        messages=[{"role": "system", "content": "x" * 4000}, {"role": "user", "content": "hi"}],
        max_tokens=1,
    )
    timings, usages = [], []
    for _ in range(2):
        started = time.monotonic()
        resp = request(backend.port, "POST", "/v1/chat/completions", body)
        timings.append(time.monotonic() - started)
        usages.append(resp.json()["usage"])
    assert usages[0]["prompt_tokens_details"]["cached_tokens"] == 0
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0.9 * usages[1]["prompt_tokens"]
    assert timings[0] > 0.4  # ~1000 uncached tokens' prefill was spent (a floor)
    stats = backend.stats()
    assert stats["cached_tokens"] == usages[1]["prompt_tokens_details"]["cached_tokens"]


def test_prefill_time_is_charged_only_for_uncached_tokens():
    """What the prefix cache saves, as the engine computes it (the clock-free half of
    the test above: the time it then sleeps is this figure)."""
    engine = Engine(prefill_per_token_s=0.001, cache_blocks=1000)
    prompt = b"x" * 4000 + b"a question"
    tokens, cached, seconds = engine.prefill(prompt)
    assert (tokens, cached, seconds) == (1002, 0, pytest.approx(1.002))
    tokens, cached, seconds = engine.prefill(prompt[:4000] + b"another question")
    assert (tokens, cached) == (1004, 992)  # 31 whole blocks of 128 bytes
    assert seconds == pytest.approx(0.012)


def test_bounded_batch_queues_requests(spawn):
    backend = spawn(Mock, "e", ["Qwen3-32B"], "--max-batch", "1", "--ttft", "0.3")
    finished: list[float] = []
    started = time.monotonic()

    def one() -> None:
        request(backend.port, "POST", "/v1/chat/completions", chat_body(max_tokens=1))
        finished.append(time.monotonic() - started)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_until(lambda: backend.stats()["waiting"] == 1, 5, "the second to queue")
    for thread in threads:
        thread.join(10)
    assert sorted(finished)[1] > 0.55  # the second waited for the first's place


def test_max_completion_tokens_is_read_first_as_vllm_does(spawn):
    """sglang-router rewrites max_tokens as max_completion_tokens: the simulator must obey it."""
    backend = spawn(Mock, "e", ["Qwen3-32B"])
    usage = lambda body: request(backend.port, "POST", "/v1/chat/completions", body).json()[  # noqa: E731
        "usage"
    ]
    assert usage(chat_body(max_completion_tokens=3))["completion_tokens"] == 3
    assert usage(chat_body(max_tokens=9, max_completion_tokens=2))["completion_tokens"] == 2
    assert usage(chat_body(max_tokens=5))["completion_tokens"] == 5


def test_render_answers_as_vllm_does(spawn):
    """vllm-router's cache_aware asks /v1/chat/completions/render for the prompt's token ids
    and routes blind without them. The ids follow the prompt: a longer conversation's ids
    start with the shorter one's, and a different prompt's do not."""
    backend = spawn(Mock, "e", ["Qwen3-32B"])
    system = {"role": "system", "content": "You are agent 7. " + "w" * 2000}
    turn = [system, {"role": "user", "content": "first question"}]
    longer = [
        *turn,
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "?"},
    ]

    def render(messages: list[dict]) -> dict:
        resp = request(
            backend.port, "POST", "/v1/chat/completions/render", chat_body(messages=messages)
        )
        assert resp.status == 200, resp.body
        return resp.json()

    short, long = render(turn), render(longer)
    assert short["model"] == "Qwen3-32B" and isinstance(short["request_id"], str)
    assert all(isinstance(t, int) and 0 <= t < 151_936 for t in short["token_ids"])
    assert len(short["token_ids"]) > 400  # about one per 4 bytes, as usage counts them
    shared = len(short["token_ids"]) - 8  # a JSON array's closing bytes differ
    assert long["token_ids"][:shared] == short["token_ids"][:shared]
    other = render([{"role": "system", "content": "You are agent 8. " + "w" * 2000}])
    assert other["token_ids"][:20] != short["token_ids"][:20]
    # A completion's render is a list, one per prompt, as vLLM's /v1/completions/render.
    resp = request(
        backend.port,
        "POST",
        "/v1/completions/render",
        {"model": "Qwen3-32B", "prompt": ["one prompt here", "and another one"]},
    )
    assert resp.status == 200
    items = resp.json()
    assert [len(i["token_ids"]) for i in items] == [4, 4]
    assert len({i["request_id"] for i in items}) == 2
    # Rendering generates nothing: no engine time, no traffic in the batch's figures.
    assert backend.stats()["prompt_tokens"] == 0
    missing = request(backend.port, "POST", "/v1/chat/completions/render", chat_body(model="other"))
    assert missing.status == 404


@pytest.mark.slow
def test_routing_benchmark_smoke():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.routing",
            "--duration",
            "1.5",
            "--rate",
            "6",
            "--strategies",
            "round-robin,cache-aware",
            "--workloads",
            "shared-prefix",
            "--output",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| cache-aware |" in result.stdout and "| round-robin |" in result.stdout


@pytest.mark.slow
def test_the_simulator_runs_under_both_names():
    """``lmproxy/sim/`` is the package; ``python -m lmproxy.mock`` keeps working."""
    helps = []
    for module in ("lmproxy.sim", "lmproxy.mock"):
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert "--fault" in done.stdout and "--prefix-cache-blocks" in done.stdout
        helps.append(done.stdout)
    assert helps[0] == helps[1]


def test_routing_benchmark_rows_name_peers_and_sessions():
    """``peer:policy`` rows start the Rust routers (skipped when not installed), and each
    shared-prefix conversation carries its own session id, a new one when it restarts."""
    import random

    from bench import routing

    assert routing._peer("vllm-router:consistent_hash") == ("vllm-router", "consistent_hash")
    assert routing._peer("cache-aware@workers2") is None
    with pytest.raises(SystemExit, match="unknown peer row"):
        routing._peer("sglang-router:consistent_hash")  # not one of its policies
    source = routing.SharedPrefix(random.Random(1), conversations=2)
    seen: dict[str, int] = {}
    for _ in range(60):
        body, session = source.next()
        assert session is not None
        turns = sum(1 for m in body["messages"] if m["role"] == "user")
        assert turns == seen.get(session, 0) + 1  # one conversation, one id, in order
        seen[session] = turns
    assert len(seen) > 2  # conversations ended and new ones, with new ids, began
