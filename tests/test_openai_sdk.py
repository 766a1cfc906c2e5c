"""The official openai SDK pointed at the router, as users call it."""

from __future__ import annotations

import base64
import json
import struct
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import Mock, Router, router_over, wait_until


def _client(router: Router) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{router.port}/v1",
        api_key="not-needed",
        timeout=10,
        max_retries=0,
    )


@pytest.fixture(scope="module")
def client(shared_router):
    """One router for the module: its tests set no fault a later test could meet."""
    with _client(shared_router) as client:
        yield client


@pytest.fixture
def own_client(spawn, two_backends):
    """A router of its own, for a test whose fault counts against a service."""
    with _client(router_over(spawn, list(two_backends))) as client:
        yield client


def test_chat_completion(client):
    completion = client.chat.completions.create(
        model="Qwen3-32B",
        messages=[{"role": "user", "content": "Hello"}],
        temperature=0.7,
        top_p=0.9,
        max_tokens=6,
        extra_body={"top_k": 50, "repetition_penalty": 1.0, "chat_template_kwargs": {}},
    )
    assert completion.model == "Qwen3-32B"
    assert completion.choices[0].message.content.split() == [
        "The",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
    ]
    assert completion.usage.completion_tokens == 6


def test_top_k_as_a_keyword_fails_in_the_sdk_before_any_request(client):
    """Why README sends top_k and repetition_penalty in extra_body: the InfiniLM
    document's SDK example passes them as keywords, which the SDK refuses."""
    with pytest.raises(TypeError, match="top_k"):
        client.chat.completions.create(
            model="Qwen3-32B", messages=[{"role": "user", "content": "Hello"}], top_k=50
        )


def test_chat_completion_streaming(client):
    stream = client.chat.completions.create(
        model="9g_8b_thinking",
        messages=[{"role": "user", "content": "Tell me a story"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == ["The", "quick", "brown", "fox", "jumps", "over", "the", "lazy"]
    assert chunks[-1].usage.completion_tokens == 8


def test_text_completion(client):
    completion = client.completions.create(
        model="Qwen3-32B", prompt="The capital of France is", max_tokens=3
    )
    assert completion.choices[0].text.split() == ["The", "quick", "brown"]


def test_text_completion_streaming(client):
    stream = client.completions.create(model="Qwen3-32B", prompt="Once", max_tokens=4, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices).split() == [
        "The",
        "quick",
        "brown",
        "fox",
    ]


def test_embeddings(client):
    result = client.embeddings.create(model="9g_8b_thinking", input=["a", "b", "c"])
    assert result.model == "9g_8b_thinking"
    assert [item.index for item in result.data] == [0, 1, 2]
    assert all(len(item.embedding) == 8 for item in result.data)
    # Each input has its own vector, and the same input always the same one.
    assert len({tuple(item.embedding) for item in result.data}) == 3
    again = client.embeddings.create(model="9g_8b_thinking", input=["b"])
    assert again.data[0].embedding == result.data[1].embedding
    assert result.usage.prompt_tokens > 0


def test_a_list_prompt_gets_one_choice_per_prompt_times_n(client):
    """OpenAI answers a completion whose prompt is a list with n choices per prompt,
    indexed 0..len(prompt)*n-1; a chat's n gives n choices."""
    completion = client.completions.create(
        model="Qwen3-32B", prompt=["a", "b", "c"], n=2, max_tokens=2
    )
    assert [c.index for c in completion.choices] == [0, 1, 2, 3, 4, 5]
    assert {c.text.strip() for c in completion.choices} == {"The quick"}
    assert completion.usage.completion_tokens == 12
    # Token-id prompts: one list of ids is one prompt, a list of lists one per list.
    assert len(client.completions.create(model="Qwen3-32B", prompt=[1, 2, 3]).choices) == 1
    assert len(client.completions.create(model="Qwen3-32B", prompt=[[1], [2]]).choices) == 2
    chat = client.chat.completions.create(
        model="Qwen3-32B", messages=[{"role": "user", "content": "x"}], n=3, max_tokens=1
    )
    assert [c.index for c in chat.choices] == [0, 1, 2]
    stream = client.completions.create(
        model="Qwen3-32B", prompt=["a", "b"], max_tokens=3, stream=True
    )
    texts: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert {i: t.split() for i, t in texts.items()} == {
        0: ["The", "quick", "brown"],
        1: ["The", "quick", "brown"],
    }


def test_embeddings_in_base64_as_the_sdk_asks_by_default(client):
    """The openai SDKs ask for encoding_format base64 unless told otherwise: the
    vectors' little-endian float32 bytes, base64-encoded. Floats in its place are
    garbage to the Node SDK, and an explicit base64 caller gets a list, not a str."""
    inputs = ["a", "b"]
    floats = client.embeddings.create(model="9g_8b_thinking", input=inputs, encoding_format="float")
    raw = client.embeddings.with_raw_response.create(model="9g_8b_thinking", input=inputs)
    assert json.loads(raw.http_request.content)["encoding_format"] == "base64"
    sent = raw.http_response.json()["data"]
    assert all(isinstance(item["embedding"], str) for item in sent)
    assert [item.embedding for item in raw.parse().data] == [i.embedding for i in floats.data]
    explicit = client.embeddings.create(
        model="9g_8b_thinking", input=inputs, encoding_format="base64"
    )
    decoded = [
        list(struct.unpack("<8f", base64.b64decode(item.embedding))) for item in explicit.data
    ]
    assert decoded == [item.embedding for item in floats.data]


def test_a_stream_carries_usage_only_when_asked(client):
    """OpenAI (and vLLM, SGLang) send a stream's usage only with
    stream_options.include_usage, in a last chunk of its own with no choices."""
    messages = [{"role": "user", "content": "x"}]
    unasked = list(
        client.chat.completions.create(
            model="Qwen3-32B", messages=messages, max_tokens=3, stream=True
        )
    )
    assert unasked and all(chunk.usage is None for chunk in unasked)
    assert unasked[-1].choices[0].finish_reason == "length"
    asked = list(
        client.chat.completions.create(
            model="Qwen3-32B",
            messages=messages,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert asked[-1].choices == [] and asked[-1].usage.completion_tokens == 3
    assert all(chunk.usage is None for chunk in asked[:-1])


def test_models_list(client):
    assert sorted(m.id for m in client.models.list()) == ["9g_8b_thinking", "Qwen3-32B"]
    assert client.models.retrieve("Qwen3-32B").id == "Qwen3-32B"


def test_errors_reach_the_sdk_as_its_exceptions(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert "gpt-9" in info.value.body  # the SDK hands over the "error" string
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="Qwen3-32B", messages=[{"role": "user", "content": "x"}], temperature=5
        )


def test_stream_error_mid_stream_raises_in_the_sdk(own_client):
    stream = own_client.chat.completions.create(
        model="Qwen3-32B",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=10,
        stream=True,
        extra_headers={"X-Mock-Fault": "close-mid-stream"},
    )
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk)
    assert received  # the tokens before the failure arrived


def test_sdk_sees_a_full_queue_as_a_rate_limit_and_retries_after_it(spawn):
    backend = spawn(Mock, "sdk-busy", ["Qwen3-32B"], "--ttft", "1.5")
    router = spawn(
        Router, "--backend", backend.backend_arg("max_in_flight=1"), "--queue-timeout", "0.2"
    )
    router.wait_healthy(1)
    base_url = f"http://127.0.0.1:{router.port}/v1"
    messages = [{"role": "user", "content": "Hello"}]
    with (
        openai.OpenAI(base_url=base_url, api_key="x", timeout=10, max_retries=0) as impatient,
        openai.OpenAI(base_url=base_url, api_key="x", timeout=10, max_retries=2) as patient,
        ThreadPoolExecutor(1) as pool,
    ):
        first = pool.submit(impatient.chat.completions.create, model="Qwen3-32B", messages=messages)
        wait_until(lambda: backend.stats()["active"] == 1, 5, "the slot to fill")
        with pytest.raises(openai.RateLimitError) as caught:
            impatient.chat.completions.create(model="Qwen3-32B", messages=messages)
        assert caught.value.response.headers["retry-after"]
        # The SDK waits Retry-After and tries again: by then the slot is free.
        completion = patient.chat.completions.create(model="Qwen3-32B", messages=messages)
        assert completion.choices[0].message.content
        assert first.result(10).choices[0].message.content


def test_error_format_openai_gives_the_sdk_its_message_and_code(spawn, two_backends):
    """--error-format openai: OpenAI's error object, whose message and code the SDK's
    exception carries (litellm shows them); by default the InfiniLM API's
    {"error": "text"}, which leaves the SDK only "Error code: 404"."""
    a, b = two_backends
    shaped = router_over(spawn, [a, b], "--error-format", "openai")
    plain = router_over(spawn, [a, b])
    for router, openai_shape in ((shaped, True), (plain, False)):
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{router.port}/v1", api_key="x", max_retries=0
        ) as client:
            with pytest.raises(openai.NotFoundError) as missing:
                client.chat.completions.create(model="nope", messages=HELLO)
            with pytest.raises(openai.BadRequestError) as bad:
                client.chat.completions.create(model="Qwen3-32B", messages=HELLO, temperature=5)
        for caught, code, said in (
            (missing.value, "model_not_found", "model 'nope' not found; available models:"),
            (bad.value, "bad_request", "temperature"),
        ):
            body = caught.body  # the SDK's: the "error" member of the JSON
            if openai_shape:
                assert caught.code == code and caught.type == "invalid_request_error"
                assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
                assert said in body["message"] and body["message"] in caught.message
            else:
                # The shape InfiniLM's document gives: the SDK has a string, and no code.
                assert caught.code is None and isinstance(body, str) and said in body
    # The admin API's own 404 takes it too (a path the router does not serve is forwarded:
    # its 404 is the backend's).
    missing_service = shaped.get("/services/nobody").json()["error"]
    assert missing_service["code"] == "not_found"
    assert missing_service["type"] == "invalid_request_error"


HELLO = [{"role": "user", "content": "Hello"}]
