"""Model aliases and fallbacks: a public name for a served model, and models to try
when one cannot answer before any byte reached the client."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest
from conftest import ROOT, Mock, Router, wait_until

from lmproxy.client.request import replace_model

CHAT = "/v1/chat/completions"
ASK = {"messages": [{"role": "user", "content": "x"}]}


def config_file(tmp_path, text: str) -> str:
    path = tmp_path / "lmproxy.toml"
    path.write_text(text)
    return str(path)


def fleet(spawn, tmp_path, extra: str = "", *args: str):
    first = spawn(Mock, "svc-first", ["Qwen3-32B"], "--token-delay", "0.01")
    second = spawn(Mock, "svc-second", ["Qwen3-8B"])
    config = config_file(
        tmp_path,
        '[models."Qwen3-32B"]\nfallbacks = ["Qwen3-8B"]\n'
        '[aliases]\n"gpt-4o-mini" = "Qwen3-32B"\n' + extra,
    )
    router = spawn(
        Router, "--config", config, "--backend", first.backend_arg(),
        "--backend", second.backend_arg(), "--health-interval", "0.5",
        "--access-log", "json", *args,
    )  # fmt: skip
    router.wait_healthy(2)
    return first, second, router


def test_a_fallback_answers_when_the_model_cannot(spawn, tmp_path):
    first, second, router = fleet(spawn, tmp_path)
    sent = b'{"model": "Qwen3-32B", "messages": [{"role":"user","content":"hi"}], "top_k": 5}'
    # The model's services answer 503 (then 429): nothing reached the client, so the
    # fallback answers, and the response says which model did.
    for fault in ("503", "429"):
        first.set_fault(fault)
        reply = router.post(CHAT, sent)
        assert reply.status == 200 and reply.headers["x-mock-server"] == "svc-second"
        assert reply.headers["x-lmproxy-model"] == "Qwen3-8B"
    # The body the fallback got: the model, rewritten in place; every other byte as sent.
    assert second.stats()["last_body"].encode() == sent.replace(b"Qwen3-32B", b"Qwen3-8B")
    # Its service gone: the same.
    first.kill()
    wait_until(lambda: not router.stats_of("svc-first")["healthy"], 5, "the check")
    with openai.OpenAI(base_url=f"http://127.0.0.1:{router.port}/v1", api_key="x") as client:
        raw = client.chat.completions.with_raw_response.create(
            model="Qwen3-32B", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert raw.headers["x-lmproxy-model"] == "Qwen3-8B"
        assert raw.parse().model == "Qwen3-8B"
    metrics = router.get("/metrics").body.decode()
    assert 'lmproxy_fallbacks_total{model="Qwen3-32B",to="Qwen3-8B"} 3.0' in metrics
    logged = [
        json.loads(line.partition("lmproxy.access: ")[2])
        for line in router.output.splitlines()
        if '"fallback_from"' in line
    ]
    assert len(logged) == 3 and logged[0]["model"] == "Qwen3-8B"
    assert logged[0]["fallback_from"] == "Qwen3-32B"


def test_a_fallback_is_never_taken_after_a_byte(spawn, tmp_path):
    first, second, router = fleet(spawn, tmp_path)
    first.set_fault("close-mid-stream")
    body = {"model": "Qwen3-32B", "messages": [{"role": "user", "content": "x"}], "stream": True}
    reply = router.post(CHAT, body)
    assert reply.status == 200 and reply.headers["x-lmproxy-model"] == "Qwen3-32B"
    assert b"the backend failed mid-stream" in reply.body
    assert CHAT not in second.stats()["paths"]


def test_without_fallbacks_the_last_model_s_answer_stands(spawn, tmp_path):
    first, second, router = fleet(spawn, tmp_path)
    first.set_fault("503")
    second.set_fault("503")
    reply = router.post(
        CHAT, {"model": "Qwen3-32B", "messages": [{"role": "user", "content": "x"}]}
    )
    assert reply.status == 503 and reply.json() == {"error": "simulated 503"}
    assert reply.headers["x-lmproxy-model"] == "Qwen3-8B"


def test_an_alias_resolves_and_is_listed(spawn, tmp_path):
    first, _, router = fleet(spawn, tmp_path, "", "--alias", "small=Qwen3-8B")
    sent = b'{"messages":[{"role":"user","content":"hi"}],"model" : "gpt-4o-mini"}'
    reply = router.post(CHAT, sent)
    assert reply.status == 200 and reply.headers["x-mock-server"] == "svc-first"
    assert reply.headers["x-lmproxy-model"] == "Qwen3-32B"
    assert first.stats()["last_body"].encode() == sent.replace(b"gpt-4o-mini", b"Qwen3-32B")
    small = {"model": "small", "messages": [{"role": "user", "content": "x"}]}
    assert router.post(CHAT, small).headers["x-mock-server"] == "svc-second"
    listed = {m["id"]: m for m in router.get("/v1/models").json()["data"]}
    assert set(listed) == {"Qwen3-32B", "Qwen3-8B", "gpt-4o-mini", "small"}
    assert listed["gpt-4o-mini"]["owned_by"] == listed["Qwen3-32B"]["owned_by"]
    assert router.get("/v1/models/gpt-4o-mini").status == 200


def test_without_policies_nothing_is_added(spawn):
    backend = spawn(Mock, "plain", ["Qwen3-32B"])
    router = spawn(Router, "--backend", backend.backend_arg())
    router.wait_healthy(1)
    reply = router.post(
        CHAT, {"model": "Qwen3-32B", "messages": [{"role": "user", "content": "x"}]}
    )
    assert reply.status == 200 and "x-lmproxy-model" not in reply.headers


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[models.A]\nfallbacks = ["B"]\n[models.B]\nfallbacks = ["A"]\n', "loops (A -> B -> A)"),
        ('[models.A]\nfallbacks = ["A"]\n', "loops (A -> A)"),
        ('[aliases]\nx = "y"\ny = "z"\n', "which is an alias itself"),
    ],
)
def test_bad_policies_stop_start_up(tmp_path, text, says):
    done = subprocess.run(
        [sys.executable, "-m", "lmproxy", "--config", config_file(tmp_path, text)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and says in done.stderr, done.stderr


def test_replace_model_touches_only_the_model():
    body = b'{"messages": [{"content": "the \\"model\\": \\"a\\""}], "model" :  "a", "n": 1}'
    assert replace_model(body, "b") == body.replace(b':  "a"', b':  "b"')
    nested = b'{"model": "a", "metadata": {"model": "a"}}'
    assert json.loads(replace_model(nested, "b")) == {"model": "b", "metadata": {"model": "a"}}
    assert json.loads(replace_model(b'{"n": 1}', "b")) == {"n": 1, "model": "b"}


def test_a_disaggregated_model_falls_back_too(spawn, tmp_path):
    prefill = spawn(Mock, "prefill", ["Qwen3-32B"], "--pd-role", "prefill")
    decode = spawn(Mock, "decode", ["Qwen3-32B"], "--pd-role", "decode")
    other = spawn(Mock, "other", ["Qwen3-8B"])
    config = config_file(tmp_path, '[models."Qwen3-32B"]\nfallbacks = ["Qwen3-8B"]\n')
    router = spawn(
        Router, "--config", config, "--prefill", prefill.url, "--decode", decode.url,
        "--backend", other.backend_arg(), "--health-interval", "0.5",
    )  # fmt: skip
    router.wait_healthy(3)
    ask = {"model": "Qwen3-32B", **ASK}
    assert router.post(CHAT, ask).headers["x-mock-server"] == "decode"
    prefill.set_fault("503")  # every prefill fails: the fallback answers, whole
    reply = router.post(CHAT, ask)
    assert reply.status == 200 and reply.headers["x-mock-server"] == "other"
    assert reply.headers["x-lmproxy-model"] == "Qwen3-8B"
    assert json.loads(other.stats()["last_body"])["model"] == "Qwen3-8B"
