"""Prefill/decode disaggregation, both protocols, against simulators playing each role
(they check the protocol as engines do: a decode refuses a request no prefill
prepared), through the openai SDK and raw sockets."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import openai
import pytest
from conftest import ROOT, Mock, Router, wait_until

from lmproxy.cli import load_config
from lmproxy.config import ConfigError
from lmproxy.journey.pair import REMOTE_DECODE

MODEL = "Qwen3-32B"
CHAT = "/v1/chat/completions"
# Fields the router knows nothing about, of every JSON kind: they must arrive as sent.
UNKNOWN = {
    "top_k": 50,
    "repetition_penalty": 1.05,
    "chat_template_kwargs": {"enable_thinking": False},
    "x_nested": {"list": [1, 2.5, None, True, "ünïcødé"], "big": 2**62 + 1},
}


def prefill(spawn, mode: str, name: str = "prefill0", *extra: str) -> Mock:
    args = ["--pd-role", "prefill", "--pd-mode", mode, "--ttft", "0.02"]
    if mode == "sglang":
        args += ["--bootstrap-port", "0"]
    return spawn(Mock, name, [MODEL], *args, *extra)


def decode(spawn, mode: str, name: str = "decode0", *extra: str) -> Mock:
    return spawn(Mock, name, [MODEL], "--pd-role", "decode", "--pd-mode", mode, *extra)


def bootstrap_port(mock: Mock) -> int:
    import re

    return int(re.search(r"bootstrap server on [\d.]+:(\d+)", mock.output).group(1))


def pd_router(spawn, mode: str, prefills: list[Mock], decodes: list[Mock], *extra: str) -> Router:
    args: list[str] = []
    for p in prefills:
        args += ["--prefill", p.url] + ([str(bootstrap_port(p))] if mode == "sglang" else [])
    for d in decodes:
        args += ["--decode", d.url]
    router = spawn(
        Router, *args, "--pd-mode", mode, "--health-interval", "0.5", "--access-log", "text",
        *extra,
    )  # fmt: skip
    router.wait_healthy(len(prefills) + len(decodes))
    return router


def sdk(router: Router) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{router.port}/v1", api_key="x", timeout=20, max_retries=0
    )


def bodies(mock: Mock) -> list[dict]:
    return [json.loads(b) for b in mock.stats()["bodies"]]


@pytest.mark.parametrize("mode", ["vllm", "sglang"])
def test_both_protocols_end_to_end_through_the_sdk(spawn, mode):
    p, d = prefill(spawn, mode), decode(spawn, mode, "decode0", "--token-delay", "0.005")
    router = pd_router(spawn, mode, [p], [d])
    with sdk(router) as client:
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Tell me a story"}],
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=UNKNOWN,
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.split() == ["The", "quick", "brown", "fox", "jumps", "over"]
        assert chunks[-1].usage.completion_tokens == 6
        whole = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
        assert whole.choices[0].message.content.split() == ["The", "quick", "brown"]
    assert p.stats()["pd"]["prefilled"] == 2 and d.stats()["pd"]["decoded"] == 2
    assert p.stats()["pd"]["refused"] == 0 and d.stats()["pd"]["refused"] == 0
    # Each side's figures, and both services in the access log.
    stats = router.get("/stats").json()
    roles = stats["disaggregation"]["roles"]
    assert roles["prefill"]["request_count"] == 2 and roles["decode"]["request_count"] == 2
    assert roles["prefill"]["steps"] == {"ok": 2} and roles["decode"]["steps"] == {"ok": 2}
    metrics = router.get("/metrics").body.decode()
    assert 'lmproxy_pd_requests_total{outcome="ok",role="prefill"} 2.0' in metrics
    assert f"service=prefill=127.0.0.1:{p.port},decode=127.0.0.1:{d.port}" in router.output


def test_vllm_fields_on_each_side(spawn):
    p, d = prefill(spawn, "vllm"), decode(spawn, "vllm")
    router = pd_router(spawn, "vllm", [p], [d])
    sent = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 7,
        "max_completion_tokens": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
        **UNKNOWN,
    }
    assert router.post(CHAT, sent).status == 200
    (first,) = bodies(p)
    # The prefill: one token, not streamed, asked to keep its KV for a remote decode.
    assert first["max_tokens"] == 1 and first["max_completion_tokens"] == 1
    assert first["stream"] is False and "stream_options" not in first
    assert first["kv_transfer_params"] == REMOTE_DECODE
    assert {k: first[k] for k in UNKNOWN} == UNKNOWN
    # The decode: the request as sent, plus what the prefill answered.
    (second,) = bodies(d)
    params = second.pop("kv_transfer_params")
    assert second == sent
    assert params["do_remote_prefill"] is True and params["remote_port"] == p.port
    assert d.stats()["last_headers"]["x-request-id"] == p.stats()["last_headers"]["x-request-id"]


def test_sglang_fields_on_each_side_and_a_batch(spawn):
    p, d = prefill(spawn, "sglang"), decode(spawn, "sglang")
    router = pd_router(spawn, "sglang", [p], [d])
    sent = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **UNKNOWN}
    assert router.post(CHAT, sent).status == 200
    (to_prefill,), (to_decode,) = bodies(p), bodies(d)
    assert to_prefill == to_decode  # the same body to both
    room = to_decode.pop("bootstrap_room")
    assert isinstance(room, int) and 0 <= room < 2**63
    assert to_decode.pop("bootstrap_host") == "127.0.0.1"
    assert to_decode.pop("bootstrap_port") == bootstrap_port(p)
    assert to_decode == sent
    # A batch: n > 1, or a list of prompts, takes one room per sequence.
    assert router.post(CHAT, {**sent, "n": 3}).status == 200
    assert len(set(bodies(d)[-1]["bootstrap_room"])) == 3
    assert bodies(d)[-1]["bootstrap_host"] == ["127.0.0.1"] * 3
    prompts = {"model": MODEL, "prompt": ["one", "two"], "max_tokens": 2}
    assert router.post("/v1/completions", prompts).status == 200
    assert len(bodies(d)[-1]["bootstrap_room"]) == 2
    one_tokenized = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}
    assert router.post("/v1/completions", one_tokenized).status == 200
    assert isinstance(bodies(d)[-1]["bootstrap_room"], int)
    assert p.stats()["pd"]["rooms_seen"] == 1 + 3 + 2 + 1


@pytest.mark.parametrize("mode", ["vllm", "sglang"])
def test_a_failing_prefill_is_counted_on_it_and_another_is_tried(spawn, mode):
    good, bad = prefill(spawn, mode, "good"), prefill(spawn, mode, "bad")
    d = decode(spawn, mode)
    router = pd_router(spawn, mode, [good, bad], [d], "--prefill-strategy", "round-robin")
    bad.set_fault("503")
    for _ in range(4):  # round-robin: two of them meet the bad one first
        reply = router.post(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert reply.status == 200, reply.body
    bad_stats = router.stats_of(f"127.0.0.1:{bad.port}")
    assert bad_stats["error_count"] >= 1
    steps = router.get("/stats").json()["disaggregation"]["roles"]["prefill"]["steps"]
    assert steps["failed"] >= 1 and steps["ok"] == 4
    assert router.stats_of(f"127.0.0.1:{d.port}")["error_count"] == 0  # not the decode's
    # A prefill that is gone (connection refused) is retried as well.
    bad.kill()
    for _ in range(2):
        reply = router.post(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "y"}]})
        assert reply.status == 200, reply.body


def test_a_prefill_4xx_is_the_client_s_error(spawn):
    p, d = prefill(spawn, "sglang"), decode(spawn, "sglang", "decode0", "--bootstrap-timeout", "5")
    router = pd_router(spawn, "sglang", [p], [d])
    p.set_fault("400")
    reply = router.post(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert reply.status == 400
    assert f"prefill service 127.0.0.1:{p.port} answered 400" in reply.json()["error"]
    # The decode, which waited for a room that will never be prefilled, was let go.
    wait_until(lambda: d.stats()["client_disconnects"] == 1, 5, "the decode to be cancelled")


def test_a_decode_killed_mid_stream_ends_with_an_error_event(spawn):
    p, d = prefill(spawn, "vllm"), decode(spawn, "vllm")
    router = pd_router(spawn, "vllm", [p], [d])
    d.set_fault("close-mid-stream")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    reply = router.post(CHAT, body)
    assert reply.status == 200
    assert b'"error"' in reply.body and b"the backend failed mid-stream" in reply.body
    assert b"[DONE]" not in reply.body


def test_a_decode_that_fails_before_answering_gets_a_new_pair(spawn):
    p = prefill(spawn, "sglang")
    broken, fine = decode(spawn, "sglang", "broken"), decode(spawn, "sglang", "fine")
    router = pd_router(spawn, "sglang", [p], [broken, fine], "--decode-strategy", "round-robin")
    broken.set_fault("close")
    served = set()
    for _ in range(3):
        reply = router.post(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert reply.status == 200, reply.body
        served.add(reply.headers["x-mock-server"])
    assert served == {"fine"}
    rooms = [b["bootstrap_room"] for b in bodies(p)]
    assert len(rooms) == len(set(rooms)) > 3  # every retry had a room of its own


@pytest.mark.parametrize("mode", ["vllm", "sglang"])
def test_a_client_hang_up_reaches_both_sides(spawn, mode):
    # vLLM: the hang-up comes during the prefill; SGLang: while both run.
    p = prefill(spawn, mode, "prefill0", "--ttft", "3")
    d = decode(spawn, mode, "decode0", "--token-delay", "0.5")
    router = pd_router(spawn, mode, [p], [d])
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    ).encode()
    with socket.create_connection(("127.0.0.1", router.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        wait_until(lambda: CHAT in p.stats()["paths"], 5, "the prefill to start")
        if mode == "sglang":
            wait_until(lambda: CHAT in d.stats()["paths"], 5, "the decode to start")
    wait_until(lambda: p.stats()["client_disconnects"] == 1, 5, "the prefill to be let go")
    if mode == "sglang":
        wait_until(lambda: d.stats()["client_disconnects"] == 1, 5, "the decode to be let go")
    router.wait_idle()


def test_without_a_healthy_side_whole_requests_or_a_clear_503(spawn):
    p, d = prefill(spawn, "vllm"), decode(spawn, "vllm")
    router = pd_router(spawn, "vllm", [p], [d])
    p.set_fault("unhealthy")
    wait_until(lambda: not router.stats_of(f"127.0.0.1:{p.port}")["healthy"], 5, "the check")
    reply = router.post(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert reply.status == 503
    assert f"no healthy prefill service for model '{MODEL}'" in reply.json()["error"]
    # A service that takes whole requests serves them meanwhile.
    whole = spawn(Mock, "whole", [MODEL])
    router2 = spawn(
        Router, "--prefill", p.url, "--decode", d.url, "--backend", whole.backend_arg(),
        "--health-interval", "0.5",
    )  # fmt: skip
    wait_until(lambda: router2.get("/stats").json()["healthy_services"] == 2, 10, "checks")
    reply = router2.post(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert reply.status == 200 and reply.headers["x-mock-server"] == "whole"


def test_with_workers_both_protocols_route(spawn):
    p, d = prefill(spawn, "sglang"), decode(spawn, "sglang")
    router = pd_router(spawn, "sglang", [p], [d], "--workers", "2")
    for _ in range(4):
        reply = router.post(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert reply.status == 200
    wait_until(
        lambda: (
            router.get("/stats").json()["disaggregation"]["roles"]["decode"]["steps"] == {"ok": 4}
        ),
        10,
        "the workers' figures",
    )


def test_roles_from_every_source(tmp_path, capsys):
    config = load_config(
        ["--prefill", "http://10.0.0.1:8100", "8998", "--prefill", "http://10.0.0.2:8100",
         "--decode", "http://10.0.0.3:8200,weight=2",
         "--backend", "http://10.0.0.4:8200,role=decode",
         "--backend", "http://10.0.0.5:8100,role=prefill,bootstrap_port=9000",
         "--pd-disaggregation"]
    )  # fmt: skip
    assert config is not None and config.pd_mode == "sglang"
    assert [(s.role, s.bootstrap_port, s.weight) for s in config.services] == [
        ("decode", None, 1),
        ("prefill", 9000, 1),
        ("prefill", 8998, 1),
        ("prefill", None, 1),
        ("decode", None, 2),
    ]
    toml = tmp_path / "lmproxy.toml"
    toml.write_text(
        'pd_mode = "vllm"\nprefill_strategy = "round-robin"\n'
        '[models."Qwen3-32B"]\npd_mode = "sglang"\n'
        '[[services]]\nurl = "http://10.0.0.1:8100"\nrole = "prefill"\nbootstrap_port = 8998\n'
    )
    config = load_config(["--config", str(toml), "--vllm-pd-disaggregation"])
    assert config is not None and config.services[0].role == "prefill"
    assert config.models[MODEL].pd_mode == "sglang" and config.prefill_strategy == "round-robin"
    for bad, says in [
        (["--backend", "http://h:1,role=router"], "role must be prefill, decode or both"),
        (["--backend", "http://h:1,role=decode,bootstrap_port=1"], "bootstrap_port"),
        (["--prefill", "http://h:1", "port"], "bootstrap port must be a number"),
        (["--prefill", "http://h:1", "1", "2"], "URL [BOOTSTRAP_PORT]"),
    ]:
        with pytest.raises((ConfigError, SystemExit)) as raised:
            load_config(bad)
        said = str(raised.value) if raised.type is ConfigError else capsys.readouterr().err
        assert says in said, said
    done = subprocess.run(
        [sys.executable, "-m", "lmproxy", "--pd-mode", "trtllm"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and "--pd-mode" in done.stderr


def test_a_registration_may_carry_a_role(spawn):
    p, d = prefill(spawn, "vllm"), decode(spawn, "vllm")
    router = spawn(Router, "--health-interval", "0.5", "--decode", d.url)
    entry = {"name": "p0", "url": p.url, "metadata": {"role": "prefill"}}
    assert router.post("/services", entry).status == 201
    router.wait_healthy(2)
    assert router.listed()["p0"]["role"] == "prefill"
    reply = router.post(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert reply.status == 200
    assert p.stats()["pd"]["prefilled"] == 1


@pytest.mark.parametrize("mode", ["vllm", "sglang"])
def test_the_demo_serves_a_disaggregated_fleet(spawn, mode):
    router = spawn(Router, "--demo", "--pd", "--pd-mode", mode)
    router.wait_healthy(5)
    with sdk(router) as client:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream).split() == [
            "The", "quick", "brown", "fox",
        ]  # fmt: skip
        whole = client.chat.completions.create(
            model="9g_8b_thinking", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert whole.choices[0].message.content
    roles = router.get("/stats").json()["disaggregation"]["roles"]
    assert (roles["prefill"]["services"], roles["decode"]["services"]) == (2, 2)
    assert roles["prefill"]["steps"] == {"ok": 1} and roles["decode"]["steps"] == {"ok": 1}
    done = subprocess.run(
        [sys.executable, "-m", "lmproxy", "--pd"], cwd=ROOT, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and "give --demo --pd" in done.stderr


@pytest.mark.parametrize("mode", ["vllm", "sglang"])
def test_a_prefill_that_never_answers_meets_the_request_timeout(spawn, mode):
    p, d = prefill(spawn, mode), decode(spawn, mode, "decode0", "--bootstrap-timeout", "30")
    router = pd_router(spawn, mode, [p], [d], "--request-timeout", "1", "--retries", "0")
    p.set_fault("hang")
    # The sweep's deadline ends it, not the decode's 30 s: that is past the client's 10 s.
    reply = router.post(CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert reply.status == 502, reply.body
    assert "sent no answer within 1s (--request-timeout)" in reply.json()["error"]
    router.wait_idle()  # both sides' slots came back
    assert router.stats_of(f"127.0.0.1:{p.port}")["in_flight"] == 0


def test_each_side_is_chosen_by_its_own_strategy(spawn):
    """One session's four requests: affinity on both sides keeps them on one pair, where
    the defaults (cache-aware for a short prompt, least-outstanding) spread them."""
    prefills = [prefill(spawn, "vllm", f"prefill{i}") for i in range(2)]
    decodes = [decode(spawn, "vllm", f"decode{i}") for i in range(2)]
    router = pd_router(
        spawn, "vllm", prefills, decodes,
        "--prefill-strategy", "affinity", "--decode-strategy", "affinity",
    )  # fmt: skip
    session = {"X-Session-ID": "conversation-7"}
    for _ in range(4):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        assert router.post(CHAT, body, headers=session).status == 200
    assert sorted(p.stats()["pd"]["prefilled"] for p in prefills) == [0, 4]
    assert sorted(d.stats()["pd"]["decoded"] for d in decodes) == [0, 4]


def test_any_model_takes_a_disaggregated_model_under_any_name(spawn):
    """--any-model with one model served: a name no service lists is that model, so a
    disaggregated model is split as under its own name (it was a 503: the pair was
    looked for under the unknown name). The body is sent as the client wrote it."""
    p, d = prefill(spawn, "vllm"), decode(spawn, "vllm")
    router = pd_router(spawn, "vllm", [p], [d], "--any-model")
    body = {"model": "whatever", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    resp = router.post("/v1/chat/completions", body)
    # The pair was found and the prefill asked, under the client's name: the simulator,
    # like vLLM, refuses a name it does not serve (SGLang's engines take any), so the
    # answer is its 404 relayed as the prefill's failure, not the router's 503.
    assert resp.status == 502 and b"not served here" in resp.body, resp.body
    assert [b["model"] for b in bodies(p)] == ["whatever"]
