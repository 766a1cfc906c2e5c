"""W3C trace context on every proxied request, and OTLP spans to a stand-in collector
(tests/otlp_receiver.py, which decodes them with opentelemetry-proto)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import ROOT, STARTUP_TIMEOUT_S, Mock, Process, Router, wait_until

from lmproxy.telemetry.tracing import context

CHAT = "/v1/chat/completions"
ASK = {"model": "Qwen3-32B", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-0[01]")


class Collector(Process):
    def __init__(self) -> None:
        super().__init__(["tests/otlp_receiver.py"])
        self.port = wait_until(self._port, STARTUP_TIMEOUT_S, "the collector to listen")

    def _port(self) -> int | None:
        match = re.search(r"otlp listening on 127\.0\.0\.1:(\d+)", self.output)
        return int(match.group(1)) if match else None

    def spans(self) -> list[dict]:
        return [json.loads(line[5:]) for line in self.output.splitlines() if line[:5] == "span "]


def test_the_backend_sees_the_trace_with_the_router_s_span_as_parent(spawn):
    backend = spawn(Mock, "traced", ["Qwen3-32B"])
    router = spawn(Router, "--backend", backend.backend_arg(), "--access-log", "json")
    router.wait_healthy(1)
    given = f"00-{TRACE}-{PARENT}-01"
    assert router.post(CHAT, ASK, headers={"traceparent": given}).status == 200
    sent = backend.stats()["last_headers"]["traceparent"]
    trace, span = TRACEPARENT.fullmatch(sent).groups()
    assert trace == TRACE and span != PARENT and sent.endswith("-01")
    # No traceparent, or a broken one: a new trace each time.
    seen = set()
    for headers in (
        {},
        {"traceparent": "00-zz-nothing-01"},
        {"traceparent": f"00-{'0' * 32}-{PARENT}-01"},
    ):
        assert router.post(CHAT, ASK, headers=headers).status == 200
        trace, _ = TRACEPARENT.fullmatch(backend.stats()["last_headers"]["traceparent"]).groups()
        seen.add(trace)
    assert len(seen) == 3 and TRACE not in seen
    # The access log names the trace.
    assert f'"trace_id":"{TRACE}"' in router.output


def test_each_request_is_one_exported_span(spawn):
    collector = spawn(Collector)
    backend = spawn(Mock, "traced", ["Qwen3-32B"])
    router = spawn(
        Router, "--backend", backend.backend_arg(),
        "--otlp-endpoint", f"http://127.0.0.1:{collector.port}/v1/traces",
    )  # fmt: skip
    router.wait_healthy(1)
    given = f"00-{TRACE}-{PARENT}-01"
    stream = {**ASK, "stream": True, "stream_options": {"include_usage": True}}
    assert router.post(CHAT, stream, headers={"traceparent": given}).status == 200
    for path in ("/health", "/metrics", "/services", "/stats"):  # never traced
        assert router.get(path).status == 200
    wait_until(lambda: collector.spans(), 10, "the span to be exported")
    (span,) = collector.spans()
    sent = backend.stats()["last_headers"]["traceparent"]
    assert span["trace_id"] == TRACE and span["parent_span_id"] == PARENT
    assert sent == f"00-{TRACE}-{span['span_id']}-01"  # the backend's parent is this span
    assert span["service"] == "lmproxy" and span["kind"] == 2  # SERVER
    assert span["attributes"] == {
        "lmproxy.model": "Qwen3-32B",
        "lmproxy.service": "traced",
        "http.response.status_code": 200,
        "lmproxy.retries": 0,
        "gen_ai.usage.input_tokens": span["attributes"]["gen_ai.usage.input_tokens"],
        "gen_ai.usage.output_tokens": 3,
    }
    assert span["events"] == ["first_byte"] and span["end"] > span["start"]


def test_the_sample_ratio_and_a_failed_request(spawn):
    collector = spawn(Collector)
    backend = spawn(Mock, "traced", ["Qwen3-32B"])
    router = spawn(
        Router, "--backend", backend.backend_arg(), "--otel-sample-ratio", "0",
        "--otlp-endpoint", f"http://127.0.0.1:{collector.port}/v1/traces",
    )  # fmt: skip
    router.wait_healthy(1)
    for _ in range(3):  # new traces, none sampled: not exported, but still propagated
        assert router.post(CHAT, ASK).status == 200
    assert backend.stats()["last_headers"]["traceparent"].endswith("-00")
    # A caller's sampled trace is followed whatever the ratio, failures included.
    missing = {**ASK, "model": "no-such-model"}
    assert (
        router.post(CHAT, missing, headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}).status == 404
    )
    wait_until(lambda: collector.spans(), 10, "the span to be exported")
    (span,) = collector.spans()
    assert span["trace_id"] == TRACE
    assert span["attributes"]["http.response.status_code"] == 404


def test_without_the_option_nothing_of_opentelemetry_is_imported():
    probe = (
        "import sys; from lmproxy.app import Router; from lmproxy.config import Config; "
        "import asyncio\n"
        "async def main():\n"
        "    Router(Config())\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_trace_context_parsing():
    trace, parent, span, sampled = context(f"00-{TRACE}-{PARENT}-00".encode())
    assert (trace.decode(), parent.decode(), sampled) == (TRACE, PARENT, False)
    assert len(span) == 16 and span != PARENT.encode()
    for bad in (b"", b"01-" + TRACE.encode() + b"-" + PARENT.encode() + b"-01", b"garbage"):
        trace, parent, _, sampled = context(bad)
        assert parent is None and sampled and len(trace) == 32 and trace != TRACE.encode()


async def test_a_reload_that_changes_the_exporter_says_it_needs_a_restart(caplog):
    """The exporter (and its thread) is made once: a reload says so, not silently."""
    import msgspec
    from inproc import Harness

    harness = Harness()
    changed = msgspec.structs.replace(
        harness.router.config, otlp_endpoint="http://127.0.0.1:4318/v1/traces"
    )
    with caplog.at_level("WARNING", logger="lmproxy"):
        harness.router.apply(changed)
    assert "reload: otlp_endpoint changed; it takes effect after a restart" in caplog.text
    assert harness.router.tracer is None
