"""OpenAI response shapes: completions, stream events, embeddings, and JSON answers."""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

import msgspec

encode = msgspec.json.Encoder().encode
WORDS = (
    "The quick brown fox jumps over the lazy dog while the router streams "
    "every token as soon as the backend produces it"
).split(" ")
CREATED = 1705312200
EMBEDDING_SIZE = 8  # floats per simulated embedding


def json_answer(status: int, payload: Any, extra: bytes = b"") -> bytes:
    body = encode(payload)
    return b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        len(body),
        extra,
        body,
    )


def event(
    cid: str, obj: str, created: int, model: str, choice: dict[str, Any], index: int = 0
) -> bytes:
    chunk = {
        "id": cid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [{"index": index, **choice, "finish_reason": None}],
    }
    return b"data: " + encode(chunk) + b"\n\n"


def text(n: int) -> str:
    return "".join(WORDS[i % len(WORDS)] + " " for i in range(n))


def completion(
    kind: str,
    server: str,
    number: int,
    model: str,
    text: str,
    usage: dict[str, Any],
    choices: int = 1,
) -> dict[str, Any]:
    """A whole chat or text completion, numbered ``number`` by the server ``server``,
    with ``choices`` choices (OpenAI's ``n``, times the prompts of a list ``prompt``)."""
    if kind == "chat":
        answers: list[dict[str, Any]] = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
            }
            for i in range(choices)
        ]
        obj, prefix = "chat.completion", "chatcmpl"
    else:
        answers = [{"index": i, "text": text, "finish_reason": "length"} for i in range(choices)]
        obj, prefix = "text_completion", "cmpl"
    return {
        "id": f"{prefix}-{server}-{number}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": answers,
        "usage": usage,
    }


def prompt_count(prompt: bytes) -> int:
    """How many prompts a completion's ``prompt`` holds, as OpenAI counts them: a list
    of strings or of token-id lists is one prompt per item; a string or one token-id
    list is one prompt."""
    if not prompt.startswith(b"["):
        return 1
    try:
        decoded = msgspec.json.decode(prompt)
    except msgspec.DecodeError:
        return 1
    if isinstance(decoded, list) and decoded and isinstance(decoded[0], str | list):
        return len(decoded)
    return 1


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


def embeddings(
    model: str, inputs: Any, prompt_tokens: int, base64_floats: bool = False
) -> dict[str, Any]:
    """One embedding per input, as lists of floats, or with ``base64_floats`` as
    OpenAI's ``encoding_format: base64`` has them: the vector's little-endian float32
    bytes, base64-encoded (what the openai SDKs ask for by default, and decode)."""
    items = (
        inputs
        if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int)
        else [inputs]
    )
    data = []
    for i, item in enumerate(items):
        # Multiples of 1/1024 are exact in float32: both formats give the same numbers.
        vector = [((hash(str(item)) >> k) % 1024) / 1024 for k in range(EMBEDDING_SIZE)]
        packed: Any = vector
        if base64_floats:
            packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": packed})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
