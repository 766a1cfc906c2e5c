"""Paths that are not the router's own are forwarded, as the InfiniLM routers and
sglang-router forward them: SGLang's /generate, vLLM's /tokenize, /version, anything.

The backends are ``tests/echo_backend.py``: each reports the requests it got, so a
test sees which service took a request and the bytes it received.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from typing import Any

import httpx2 as httpx
import openai
import pytest
from conftest import Process, Router, request

from lmproxy.client.request import MAX_FORM_PARTS, form_model


class Echo(Process):
    """An echo backend: ``python tests/echo_backend.py``."""

    def __init__(self, name: str, models: list[str]) -> None:
        args = ["tests/echo_backend.py", "--port", "0", "--name", name]
        for model in models:
            args += ["--model", model]
        super().__init__(args)
        self.name = name
        self.wait_for_port()

    def backend_arg(self) -> str:
        return f"{self.name}=http://127.0.0.1:{self.port}"

    def seen(self) -> list[dict[str, Any]]:
        return request(self.port, "GET", "/echo/seen").json()["seen"]


@pytest.fixture
def echoes(spawn):
    return spawn(Echo, "echo-a", ["model-a"]), spawn(Echo, "echo-b", ["model-b"])


def router_over(spawn, backends, *options: str) -> Router:
    args = [arg for backend in backends for arg in ("--backend", backend.backend_arg())]
    router = spawn(Router, *args, "--strategy", "round-robin", *options)
    router.wait_healthy(len(backends))
    return router


def where(echoes, path: str) -> Counter[str]:
    """How many requests for ``path`` each backend got."""
    return Counter(e["backend"] for echo in echoes for e in echo.seen() if e["path"] == path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_generate_without_a_model_goes_to_the_strategys_choice_among_all(spawn, echoes):
    router = router_over(spawn, echoes)
    raw = b'{"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8}}'
    for _ in range(6):
        resp = router.post("/generate", raw)
        assert resp.status == 200, resp
        assert resp.json()["path"] == "/generate" and resp.json()["sha256"] == sha256(raw)
    assert where(echoes, "/generate") == {"echo-a": 3, "echo-b": 3}  # round-robin


def test_generate_without_a_model_goes_to_the_default_models_services(spawn, echoes):
    router = router_over(spawn, echoes, "--default-model", "model-b")
    raw = b'{"text": "Hello", "stream": false}'
    for _ in range(4):
        resp = router.post("/generate", raw)
        assert resp.status == 200, resp
        assert resp.json()["sha256"] == sha256(raw)  # no "model" added to SGLang's body
    assert where(echoes, "/generate") == {"echo-b": 4}


@pytest.mark.parametrize(
    "path", ["/tokenize", "/detokenize", "/rerank", "/score", "/pooling", "/get_model_info"]
)
def test_a_root_path_with_a_model_goes_to_that_models_service(spawn, echoes, path):
    router = router_over(spawn, echoes)
    raw = json.dumps({"model": "model-a", "prompt": "Hello", "temperature": 7}).encode()
    for _ in range(4):
        resp = router.post(path, raw)
        assert resp.status == 200, resp
        assert resp.json()["sha256"] == sha256(raw)  # forwarded as sent
    assert where(echoes, path) == {"echo-a": 4}
    # A model no service serves: the router's 404, as on the OpenAI paths.
    missing = router.post(path, {"model": "nope", "prompt": "Hello"})
    assert missing.status == 404
    assert "available models" in missing.json()["error"]
    assert sum(where(echoes, path).values()) == 4


def test_other_methods_and_bodies_are_forwarded(spawn, echoes):
    router = router_over(spawn, echoes)
    version = router.get("/version")
    assert version.status == 200 and version.json()["method"] == "GET"
    assert version.json()["length"] == 0
    assert request(router.port, "DELETE", "/v2/cache?all=1").json()["path"] == "/v2/cache?all=1"
    head = request(router.port, "HEAD", "/get_server_info")
    assert head.status == 200 and head.body == b""
    # Not JSON, though it says so: forwarded as is, to any service.
    for raw, kind in [(b"{not json", "application/json"), (b"\x00\xff plain", "text/plain")]:
        resp = router.post("/generate", raw, headers={"Content-Type": kind})
        assert resp.status == 200, resp
        assert resp.json()["sha256"] == sha256(raw)
    methods = Counter(e["method"] for echo in echoes for e in echo.seen())
    assert methods == {"GET": 1, "DELETE": 1, "HEAD": 1, "POST": 2}


def test_an_unknown_path_gets_the_backends_answer(spawn, echoes):
    router = router_over(spawn, echoes)
    resp = router.post("/nope/such/path", {"model": "model-b"})
    assert resp.status == 404
    assert resp.json() == {"detail": "Not Found", "backend": "echo-b"}  # not the router's
    # The path checks hold for forwarded paths too.
    dots = router.get("/x/../health")
    assert dots.status == 400 and "segment" in dots.json()["error"]
    assert router.get("/x/%2e%2e/stats").status == 400
    # The router's own endpoints are still its own.
    assert router.get("/stats").json()["total_services"] == 2
    assert router.post("/health", {}).status == 405
    assert [m["id"] for m in router.get("/v1/models").json()["data"]] == ["model-a", "model-b"]
    assert sum(where(echoes, "/nope/such/path").values()) == 1
    assert all(e["path"] == "/nope/such/path" for echo in echoes for e in echo.seen())


def test_status_is_an_alias_of_health(spawn, echoes):
    router = router_over(spawn, echoes)
    status = router.get("/status")
    assert status.status == 200
    health = router.get("/health").json()
    assert status.json().keys() == health.keys()
    assert status.json()["healthy_services"] == health["healthy_services"] == "2/2"
    assert request(router.port, "HEAD", "/status").status == 200
    assert not any(echo.seen() for echo in echoes)  # answered by the router


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK's translations
@pytest.mark.parametrize("kind", ["transcriptions", "translations"])
def test_a_multipart_audio_request_is_routed_by_its_model_field(spawn, echoes, kind):
    router = router_over(spawn, echoes)
    sent: list[bytes] = []

    def record(req: httpx.Request) -> None:
        sent.append(req.read())

    audio = b"RIFF" + os.urandom(200_000)  # binary, with CRLFs and dashes by chance
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{router.port}/v1",
        api_key="not-needed",
        timeout=10,
        max_retries=0,
        http_client=httpx.Client(event_hooks={"request": [record]}),
    ) as client:
        api = getattr(client.audio, kind)
        for _ in range(6):
            answer = api.create(model="model-a", file=("speech.wav", audio), prompt="hi")
            assert answer.text == "echo"
    path = f"/v1/audio/{kind}"
    assert where(echoes, path) == {"echo-a": 6}
    received = [e["sha256"] for e in echoes[0].seen()]
    assert len(sent) == 6 and received == [sha256(body) for body in sent]  # byte for byte


def test_an_alias_is_resolved_in_a_form_and_a_model_less_body_stays_as_sent(spawn, echoes):
    router = router_over(
        spawn, echoes, "--alias", "whisper-1=model-a", "--default-model", "whisper-1"
    )
    boundary = b"b0undary"
    form = (
        b'--%s\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        b'--%s\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\nRIFF\x00\x01\r\n--%s--\r\n"
        % (boundary, boundary, boundary)
    )
    resp = router.post(
        "/v1/audio/transcriptions",
        form,
        headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
    )
    assert resp.status == 200, resp
    assert resp.json()["sha256"] == sha256(form.replace(b"whisper-1", b"model-a"))
    # No model in the body: routed by the default (an alias of model-a), body untouched.
    for raw in [b"", b'{"text": "hi"}', b"plain text"]:
        resp = request(router.port, "POST", "/generate", raw, headers={"Content-Type": "text/x"})
        assert resp.status == 200, resp
        assert resp.json()["sha256"] == sha256(raw)
    assert where(echoes, "/generate") == {"echo-a": 3}


# --- the form scanner, without a network ---------------------------------------------

FORM = "multipart/form-data; boundary=XyZ"


def form(*parts: tuple[bytes, bytes], preamble: bytes = b"") -> bytes:
    out = preamble
    for head, value in parts:
        out += b"--XyZ\r\n" + head + b"\r\n\r\n" + value + b"\r\n"
    return out + b"--XyZ--\r\n"


def named(name: bytes, extra: bytes = b"") -> bytes:
    return b'Content-Disposition: form-data; name="%s"%s' % (name, extra)


@pytest.mark.parametrize(
    ("body", "content_type", "model"),
    [
        (form((named(b"model"), b"m1")), FORM, "m1"),
        (
            form((named(b"file", b'; filename="a"'), b"--XyZ\n\x00"), (named(b"model"), b"m2")),
            FORM,
            "m2",
        ),
        (form((b"content-disposition: form-data; name=model", b"m3")), FORM, "m3"),
        (form((named(b"model"), b"m4"), preamble=b"ignored\r\n"), FORM, "m4"),
        (form((named(b"model"), b"m5")), 'multipart/form-data; boundary="XyZ"', "m5"),
        (form((named(b"modelx"), b"no"), (named(b"model"), b"m6")), FORM, "m6"),
        (form((named(b"f", b'; filename="model"'), b"no")), FORM, None),
        (form((named(b"model"), b"m")), "multipart/form-data", None),  # no boundary
        (form((named(b"model"), b"m")), "multipart/form-data; boundary=other", None),
        (form((named(b"model"), b"x" * 2000)), FORM, None),  # no model is that long
        (form((named(b"model"), b"\xff\xfe")), FORM, None),  # not UTF-8
        (form((named(b"model"), b"")), FORM, None),
        (b"--XyZ\r\n" + named(b"model") + b"\r\n\r\nm-cut", FORM, None),  # never closed
        (
            b"--XyZ\r\n" + b"X-Pad: y\r\n" * 1000 + named(b"model") + b"\r\n\r\nm\r\n--XyZ--",
            FORM,
            None,
        ),
        (form(*[(named(b"f"), b"v")] * MAX_FORM_PARTS, (named(b"model"), b"late")), FORM, None),
        (form(*[(named(b"f"), b"v")] * (MAX_FORM_PARTS - 1), (named(b"model"), b"m7")), FORM, "m7"),
    ],
)
def test_the_form_scanner_finds_the_model_field_within_its_bounds(body, content_type, model):
    assert form_model(body, content_type.encode()) == model


def test_forwarded_paths_need_the_api_key_and_status_does_not(spawn, echoes):
    router = router_over(spawn, echoes, "--api-key", "sekrit")
    assert router.get("/version").status == 401
    assert router.post("/generate", {"text": "hi"}).status == 401
    assert router.get("/status").status == 200
    authorized = router.get("/version", headers={"Authorization": "Bearer sekrit"})
    assert authorized.status == 200 and authorized.json()["path"] == "/version"
    assert sum(len(echo.seen()) for echo in echoes) == 1
