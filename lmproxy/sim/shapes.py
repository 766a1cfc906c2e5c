"""OpenAI response shapes: completions, stream events, embeddings, and JSON answers."""

from __future__ import annotations

import time
from typing import Any

import msgspec

encode = msgspec.json.Encoder().encode
WORDS = (
    "The quick brown fox jumps over the lazy dog while the router streams "
    "every token as soon as the backend produces it"
).split(" ")
CREATED = 1705312200


def json_answer(status: int, payload: Any, extra: bytes = b"") -> bytes:
    body = encode(payload)
    return b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        len(body),
        extra,
        body,
    )


def event(cid: str, obj: str, created: int, model: str, choice: dict[str, Any]) -> bytes:
    chunk = {
        "id": cid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [{"index": 0, **choice, "finish_reason": None}],
    }
    return b"data: " + encode(chunk) + b"\n\n"


def text(n: int) -> str:
    return "".join(WORDS[i % len(WORDS)] + " " for i in range(n))


def completion(
    kind: str, server: str, number: int, model: str, text: str, usage: dict[str, Any]
) -> dict[str, Any]:
    """A whole chat or text completion, numbered ``number`` by the server ``server``."""
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length",
        }
        obj, prefix = "chat.completion", "chatcmpl"
    else:
        choice = {"index": 0, "text": text, "finish_reason": "length"}
        obj, prefix = "text_completion", "cmpl"
    return {
        "id": f"{prefix}-{server}-{number}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def rendered(model: str, token_ids: list[int], max_tokens: int, request_id: str) -> dict[str, Any]:
    """What vLLM's ``/v1/chat/completions/render`` answers (its ``GenerateRequest``): the
    prompt as the engine would see it, without generating. Routers that place by tokens
    (vllm-router's cache_aware) ask it first."""
    return {
        "request_id": request_id,
        "token_ids": token_ids,
        "features": None,
        "sampling_params": {"n": 1, "max_tokens": max_tokens},
        "model": model,
        "stream": False,
        "stream_options": None,
        "cache_salt": None,
        "priority": 0,
        "kv_transfer_params": None,
    }


def embeddings(model: str, inputs: Any, prompt_tokens: int) -> dict[str, Any]:
    items = (
        inputs
        if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int)
        else [inputs]
    )
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": [((hash(str(item)) >> k) % 1000) / 1000 for k in range(8)],
        }
        for i, item in enumerate(items)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
