"""`lmproxy --demo`: every example of the InfiniLM-SVC API document works right away."""

from __future__ import annotations

import json

from conftest import Router


def test_router_api_examples_work_on_the_demo(spawn):
    router = spawn(Router, "--demo")
    router.wait_healthy(2)

    health = router.get("/health").json()
    assert health["status"] == "healthy" and health["healthy_services"] == "2/2"
    assert sorted(m["id"] for m in router.get("/models").json()["data"]) == [
        "9g_8b_thinking",
        "Qwen3-32B",
    ]
    for model, question, max_tokens in (
        ("Qwen3-32B", "Hello, how are you?", 100),
        ("9g_8b_thinking", "What is the capital of France?", 200),
    ):
        resp = router.post(
            "/chat/completions",
            {
                "model": model,
                "messages": [{"role": "user", "content": question}],
                "temperature": 0.7,
                "top_p": 0.9,
                "top_k": 50,
                "max_tokens": max_tokens,
                "repetition_penalty": 1.0,
                "chat_template_kwargs": {},
                "stream": False,
            },
        )
        assert resp.status == 200
        answer = resp.json()
        assert answer["model"] == model
        assert answer["choices"][0]["message"]["content"]
        assert answer["usage"]["total_tokens"] > 0

    resp = router.post(
        "/v1/completions",
        {
            "model": "Qwen3-32B",
            "prompt": "The capital of France is",
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 50,
            "max_tokens": 10,
            "repetition_penalty": 1.0,
        },
    )
    assert resp.status == 200

    # The streaming example of the document, line by line.
    resp = router.post(
        "/v1/chat/completions",
        {
            "model": "Qwen3-32B",
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "temperature": 0.8,
            "top_p": 0.9,
            "max_tokens": 20,
            "chat_template_kwargs": {},
            "stream": True,
        },
    )
    assert resp.status == 200 and resp.headers["content-type"] == "text/event-stream"
    text = ""
    for line in resp.body.split(b"\n"):
        if line.startswith(b"data: "):
            data = line[6:].decode()
            if data == "[DONE]":
                break
            delta = json.loads(data)["choices"][0].get("delta", {})
            text += delta.get("content", "")
    assert len(text.split()) == 20

    services = router.get("/services").json()
    assert services["total"] == 2
    assert router.get("/stats").json()["healthy_services"] == 2
