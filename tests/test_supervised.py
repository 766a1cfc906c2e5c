"""Every callback is supervised: an exception in a strategy plugin, in a sink of the
backend's bytes, or a bug, ends that one request (502, or the stream's error event),
returns every slot it held (the service's, the key's), is logged once per cause, and
the router serves the next request. In process (``inproc.py``) with a strategy plugin
that raises where it is told (``raising_strategy.py``); and with real processes, a
vLLM prefill whose answer nests ``kv_transfer_params`` 1,000 levels deep."""

from __future__ import annotations

import http.server
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Mock, Router, request, wait_until
from inproc import Harness, chat_request

from lmproxy.config import KeySpec
from lmproxy.journey import journey

KEY = b"Authorization: Bearer sk-k\r\n"
OK = b'{"id":"x","object":"chat.completion"}'
OK_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (
        len(OK),
        OK,
    )
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def raising(method: str, times: int = 1) -> Harness:
    """One service, a [[keys]] key of max_in_flight 2, and a strategy whose ``method``
    raises for its first ``times`` calls."""
    journey._CRASHES.clear()  # each test counts its own log lines
    return Harness(
        strategy="raising_strategy:Raising",
        strategy_options={"raise_in": method, "times": times},
        keys=[KeySpec(name="k", key="sk-k", max_in_flight=2)],
    )


def crash_lines(caplog: pytest.LogCaptureFixture, method: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR and f"the plugin's {method} failed" in r.getMessage()
    ]


def assert_slots_back(h: Harness) -> None:
    assert h.service.in_flight == 0
    assert h.router.limits.under_way("k") == 0


async def serve_one(h: Harness) -> bytes:
    """A request on a fresh connection, answered by a fresh backend connection."""
    backend, _ = h.backend()
    client, downstream = h.client()
    client.data_received(chat_request(extra=KEY))
    await h.turn()
    backend.data_received(OK_RESPONSE)
    await h.turn()
    return downstream.take()


@pytest.mark.parametrize("method", ["choose", "on_start"])
async def test_a_strategy_that_raises_before_the_send_costs_one_request(method, caplog):
    h = raising(method, times=2)
    for _ in range(2):  # two requests meet it; its cause is logged once
        _, upstream = h.backend()
        client, downstream = h.client()
        client.data_received(chat_request(extra=KEY))
        await h.turn()
        answer = downstream.take()
        assert answer.startswith(b"HTTP/1.1 502 "), answer
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert "PluginBug" in body["error"] and "router's log" in body["error"]
        assert downstream.closing  # nothing the journey left scheduled can follow it
        assert_slots_back(h)
        if method == "on_start":  # the pooled connection it took is not lost open
            assert upstream.aborted
        else:
            assert h.idle_backends() == 1
            h.service.pool.close()  # type: ignore[union-attr]
            h.service.pool.closed = False  # type: ignore[union-attr]
    assert len(crash_lines(caplog, method)) == 1
    assert h.service.consecutive_errors == 0  # not the service's fault
    answer = await serve_one(h)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(OK)
    assert_slots_back(h)


async def test_a_strategy_raising_inside_the_backend_parser_is_not_broken_http(caplog):
    """on_first_byte runs inside httptools' on_headers_complete: what it raises came
    back as an HttpParserCallbackError, and was taken for the backend's broken HTTP."""
    h = raising("on_first_byte")
    backend, upstream = h.backend()
    client, downstream = h.client()
    client.data_received(chat_request(extra=KEY))
    backend.data_received(OK_RESPONSE)
    await h.turn()
    answer = downstream.take()
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    assert b"PluginBug" in answer and b"broken HTTP" not in answer
    assert upstream.aborted and downstream.closing
    assert_slots_back(h)
    assert h.service.consecutive_errors == 0 and h.service.healthy  # not blamed
    assert len(crash_lines(caplog, "on_first_byte")) == 1
    answer = await serve_one(h)
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_a_strategy_raising_mid_stream_ends_the_stream_with_the_error_event(caplog):
    """The head has reached the client when on_end raises at a backend's failure: the
    stream gets the error event, then the close."""
    h = raising("on_end")
    backend, _ = h.backend()
    client, downstream = h.client()
    client.data_received(chat_request(extra=KEY))
    backend.data_received(STREAM_HEAD + b'f\r\ndata: {"a":1}\n\n\r\n')
    backend.connection_lost(ConnectionResetError("reset"))  # mid-stream: the journey's end
    await h.turn()
    answer = downstream.take()
    assert answer.startswith(b"HTTP/1.1 200 ") and b'data: {"a":1}' in answer
    assert b"the backend failed mid-stream" in answer and answer.endswith(b"0\r\n\r\n")
    assert downstream.closing
    assert_slots_back(h)
    assert len(crash_lines(caplog, "on_end")) == 1
    assert (await serve_one(h)).startswith(b"HTTP/1.1 200 ")


async def test_a_strategy_raising_at_a_failure_before_the_head_answers_502(caplog):
    """on_end raises as the journey accounts a dropped connection: the client still
    gets an answer (on main it was closed without one)."""
    h = raising("on_end")
    backend, _ = h.backend()
    client, downstream = h.client()
    client.data_received(chat_request(extra=KEY))
    backend.connection_lost(None)  # dropped before any byte
    await h.turn()
    answer = downstream.take()
    assert answer.startswith(b"HTTP/1.1 502 ") and b"PluginBug" in answer, answer
    assert_slots_back(h)
    assert len(crash_lines(caplog, "on_end")) == 1
    assert (await serve_one(h)).startswith(b"HTTP/1.1 200 ")


async def test_a_strategy_raising_after_a_complete_answer_leaves_the_answer_whole(caplog):
    h = raising("on_end")
    backend, _ = h.backend()
    client, downstream = h.client()
    client.data_received(chat_request(extra=KEY))
    backend.data_received(OK_RESPONSE)
    await h.turn()
    answer = downstream.take()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(OK)  # nothing after it
    assert_slots_back(h)
    assert len(crash_lines(caplog, "on_end")) == 1
    assert (await serve_one(h)).startswith(b"HTTP/1.1 200 ")


# --- a vLLM prefill answering kv_transfer_params 1,000 levels deep -------------------------

HERE = Path(__file__).resolve().parent  # the plugin's module, for a process
MODEL = "Qwen3-32B"
DEEP = 1000
KEYS = '[[keys]]\nname = "k"\nkey = "sk-k"\nmax_in_flight = 2\n'
AUTH = {"Authorization": "Bearer sk-k"}


class _DeepPrefill(http.server.BaseHTTPRequestHandler):
    """A prefill that is healthy, lists the model, and answers every request with its
    kv_transfer_params nested DEEP levels (about 600 KB: under the 1 MiB cap)."""

    protocol_version = "HTTP/1.1"
    answered = 0

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/v1/models"):
            self._send(json.dumps({"object": "list", "data": [{"id": MODEL}]}).encode())
        else:
            self._send(b"{}")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).answered += 1
        nested = b'{"remote_block_ids":' * DEEP + b"[]" + b"}" * DEEP
        nested += b" " * (600 * 1024 - len(nested))
        self._send(b'{"id":"p","choices":[],"kv_transfer_params":' + nested + b"}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def deep_prefill() -> Iterator[str]:
    _DeepPrefill.answered = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DeepPrefill)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def deep_fleet(spawn, tmp_path, deep: str, *prefills: Mock) -> tuple[Router, Mock]:
    d = spawn(Mock, "decode0", [MODEL], "--pd-role", "decode", "--pd-mode", "vllm")
    config = tmp_path / "lmproxy.toml"
    config.write_text(KEYS)
    args = ["--prefill", deep]
    for p in prefills:
        args += ["--prefill", p.url]
    router = spawn(
        Router, "--config", str(config), *args, "--decode", d.url, "--pd-mode", "vllm",
        "--prefill-strategy", "round-robin", "--health-interval", "0.5", "--max-errors", "100",
    )  # fmt: skip
    router.wait_healthy(2 + len(prefills))
    return router, d


def assert_idle(router: Router) -> None:
    def idle() -> bool:
        stats = router.get("/stats", headers=AUTH).json()
        return stats["keys"]["k"]["in_flight"] == 0 and all(
            s["in_flight"] == 0 for s in stats["services"]
        )

    wait_until(idle, 5, "the key's and every service's in_flight back to 0")


def ask(router: Router) -> Any:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    return request(router.port, "POST", "/v1/chat/completions", body, headers=AUTH, timeout=10)


def test_a_prefill_nesting_its_answer_too_deep_fails_over_to_another(spawn, tmp_path, deep_prefill):
    good = spawn(Mock, "good", [MODEL], "--pd-role", "prefill", "--pd-mode", "vllm")
    router, _ = deep_fleet(spawn, tmp_path, deep_prefill, good)
    for _ in range(4):  # round-robin: two of them meet the deep one first
        reply = ask(router)
        assert reply.status == 200, reply.body
    assert _DeepPrefill.answered >= 2
    assert_idle(router)
    stats = router.get("/stats", headers=AUTH).json()
    steps = stats["disaggregation"]["roles"]["prefill"]["steps"]
    assert steps["failed"] >= 2 and steps["ok"] == 4, steps  # counted on the deep one
    for _ in range(3):  # more than the key's max_in_flight: no slot was kept
        assert ask(router).status == 200
    assert "RecursionError" not in router.output and "Traceback" not in router.output


def test_a_prefill_nesting_its_answer_too_deep_alone_gets_the_client_a_502(
    spawn, tmp_path, deep_prefill
):
    router, _ = deep_fleet(spawn, tmp_path, deep_prefill)
    for _ in range(3):  # more than the key's max_in_flight: each one's slot came back
        reply = ask(router)
        assert reply.status == 502, reply.body
        error = reply.json()["error"]
        assert "is not the JSON object vLLM sends" in error, error
        assert "nested more than 64 levels" in error, error
    assert_idle(router)
    assert "RecursionError" not in router.output and "Traceback" not in router.output


def test_a_strategy_whose_share_raises_is_logged_once_and_the_worker_goes_on(spawn):
    """With --workers, each worker asks its strategies what they learnt every 0.1 s;
    a plugin raising there ended that loop silently (and with it the worker's in-flight
    reports). It is logged once, and the loop, and the worker, go on."""
    backend = spawn(Mock, "a", [MODEL])
    router = spawn(
        Router, "--backend", backend.backend_arg(), "--workers", "2",
        "--strategy", "raising_strategy:Raising",
        "--strategy-opt", "raise_in=share", "--strategy-opt", "times=3",
        env={"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    router.wait_healthy(1)
    wait_until(
        lambda: router.output.count("failed sharing its state") >= 2, 10, "each worker's line"
    )
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for _ in range(10):
        assert request(router.port, "POST", "/v1/chat/completions", body, timeout=10).status == 200
    # Three raises in each worker, one line each: logged once per cause, not per raise.
    assert router.output.count("failed sharing its state") == 2, router.output
