"""Forwarding: every routed path, the bytes that reach the backend, HTTP/1.1 details."""

from __future__ import annotations

import json
import socket

import pytest
from conftest import Mock, chat_body, request, router_over, wait_until


@pytest.fixture
def setup(shared_router, shared_backends):
    """One router and its two backends for the module: each test asks the backends
    about its own request (their last path, body, headers), and sets no fault."""
    a, b = shared_backends
    return shared_router, a, b


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_chat_goes_to_the_service_of_its_model(setup, path):
    router, a, b = setup
    for model, backend in (("Qwen3-32B", a), ("9g_8b_thinking", b)):
        resp = router.post(
            path,
            chat_body(
                model,
                temperature=0.7,
                top_p=0.9,
                top_k=50,
                max_tokens=5,
                repetition_penalty=1.0,
                chat_template_kwargs={},
                stream=False,
            ),
        )
        assert resp.status == 200, resp
        body = resp.json()
        assert body["model"] == model
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] == 5
        assert resp.headers["x-mock-server"] == backend.name
        assert backend.stats()["paths"][-1] == path


@pytest.mark.parametrize("path", ["/v1/completions", "/completions"])
def test_text_completions(setup, path):
    router, a, _ = setup
    resp = router.post(
        path, {"model": "Qwen3-32B", "prompt": "The capital of France is", "max_tokens": 4}
    )
    assert resp.status == 200
    assert resp.json()["object"] == "text_completion"
    assert a.stats()["paths"][-1] == path


def test_embeddings(setup):
    router, _, b = setup
    resp = router.post("/v1/embeddings", {"model": "9g_8b_thinking", "input": ["a", "b"]})
    assert resp.status == 200
    answer = resp.json()
    assert answer["model"] == "9g_8b_thinking"
    assert [item["index"] for item in answer["data"]] == [0, 1]
    for item in answer["data"]:
        assert item["object"] == "embedding" and len(item["embedding"]) == 8
        assert all(0 <= x < 1 for x in item["embedding"])
    assert answer["usage"]["prompt_tokens"] > 0
    stats = b.stats()
    assert stats["paths"][-1] == "/v1/embeddings"
    assert json.loads(stats["last_body"]) == {"model": "9g_8b_thinking", "input": ["a", "b"]}


def test_original_body_bytes_are_forwarded(setup):
    router, a, _ = setup
    raw = b'{"model":"Qwen3-32B",  "messages":[{"role":"user","content":"h\\u00e9"}],"x":{"y":[1]}}'
    assert router.post("/v1/chat/completions", raw).status == 200
    body = request(a.port, "GET", "/mock/stats").json()
    assert body["last_headers"]["content-length"] == str(len(raw))
    assert body["last_body"] == raw.decode()  # byte for byte: spacing and escapes kept


def test_other_v1_paths_route_by_model_or_to_any_service(setup):
    router, a, b = setup
    # A path the router does not know, with a model: goes to that model's service.
    resp = router.post("/v1/rerank", {"model": "9g_8b_thinking", "query": "q"})
    assert resp.status == 404  # the simulator has no /v1/rerank: its own answer comes back
    assert b.stats()["paths"][-1] == "/v1/rerank"
    # A GET with no model goes to some healthy service.
    before = a.stats()["requests"] + b.stats()["requests"]
    resp = router.get("/v1/files")
    assert resp.status == 404
    assert a.stats()["requests"] + b.stats()["requests"] == before + 1


def test_hop_by_hop_headers_are_not_forwarded(setup):
    router, a, _ = setup
    resp = router.post(
        "/v1/chat/completions",
        chat_body(),
        headers={
            "Connection": "keep-alive, X-Secret-Hop",
            "Keep-Alive": "timeout=5",
            "X-Custom": "kept",
            "Proxy-Authorization": "Basic x",
        },
    )
    assert resp.status == 200
    seen = a.stats()["last_headers"]
    assert seen["x-custom"] == "kept"
    assert "keep-alive" not in seen and "proxy-authorization" not in seen
    assert seen["host"] == f"127.0.0.1:{a.port}"


def test_round_robin_keeps_one_cursor_per_model(spawn):
    a = spawn(Mock, "a", ["m1", "m2"])
    b = spawn(Mock, "b", ["m1", "m2"])
    router = router_over(spawn, [a, b], "--strategy", "round-robin")
    served = {"m1": [], "m2": []}
    # Interleaved models: a global counter would send every m1 to one service.
    for _ in range(4):
        for model in ("m1", "m2"):
            resp = router.post("/v1/chat/completions", chat_body(model))
            served[model].append(resp.headers["x-mock-server"])
    for model, names in served.items():
        assert sorted(names) == ["a", "a", "b", "b"], (model, names)
        assert names[0] != names[1]


def _read_response(sock: socket.socket, buf: bytearray) -> tuple[bytes, bytes]:
    """Read one Content-Length framed response from ``buf`` + socket."""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    buf[:] = rest[length:]
    return head, rest[:length]


def test_keep_alive_and_pipelined_requests_are_answered_in_order(setup):
    router, _, _ = setup
    models = ["Qwen3-32B", "9g_8b_thinking", "Qwen3-32B"]
    raw = b""
    for i, model in enumerate(models):
        body = json.dumps(chat_body(model, max_tokens=i + 1)).encode()
        raw += (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
    raw += b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(raw)  # all at once: pipelined
        buf = bytearray()
        for i, model in enumerate(models):
            head, body = _read_response(sock, buf)
            assert head.startswith(b"HTTP/1.1 200"), head
            answer = json.loads(body)
            assert answer["model"] == model
            assert answer["usage"]["completion_tokens"] == i + 1
        head, body = _read_response(sock, buf)
        assert json.loads(body)["status"] == "healthy"
        # The connection is still open for more.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _ = _read_response(sock, buf)
        assert head.startswith(b"HTTP/1.1 200")


def test_chunked_request_body(setup):
    router, a, _ = setup
    body = json.dumps(chat_body("Qwen3-32B", max_tokens=2)).encode()
    half = len(body) // 2
    chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        half,
        body[:half],
        len(body) - half,
        body[half:],
    )
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n" + chunks
        )
        head, answer = _read_response(sock, bytearray())
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(answer)["usage"]["completion_tokens"] == 2
    # The backend got a plain Content-Length body, not the client's chunks.
    assert a.stats()["last_headers"]["content-length"] == str(len(body))


def test_http10_client_gets_answer_and_close(setup):
    router, _, _ = setup
    body = json.dumps(chat_body("Qwen3-32B", stream=True, max_tokens=3)).encode()
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert rest.rstrip().endswith(b"data: [DONE]")


def test_expect_continue_is_answered(setup):
    router, _, _ = setup
    body = json.dumps(chat_body("Qwen3-32B", max_tokens=1)).encode()
    with socket.create_connection(("127.0.0.1", router.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        interim = wait_until(lambda: sock.recv(65536), 5, "100 Continue")
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        head, _ = _read_response(sock, bytearray(interim.partition(b"\r\n\r\n")[2]))
        assert head.startswith(b"HTTP/1.1 200")
