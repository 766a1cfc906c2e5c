"""Prometheus metrics (``GET /metrics``) and the access log.

The request path pays only for what cannot be known later: one call per
finished request, which adds to plain ints and bucket lists (a bisect each);
prometheus_client renders them when ``/metrics`` is scraped. Figures the
registry already keeps (in-flight requests, health) are read at scrape time,
at no cost per request. Token counts come from the ``usage`` object the backend sends last; it
is found in the response's final bytes with a regular expression, so streamed
tokens are never parsed.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from lmproxy.fleet.roster import Roster, Service

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ADDED_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')

access_log = logging.getLogger("lmproxy.access")


def usage_tokens(tail: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of the last ``usage`` object in ``tail``, if any."""
    start = tail.rfind(b'"usage"')
    if start < 0:
        return None
    window = tail[start : start + 512]
    prompt = _PROMPT.search(window)
    completion = _COMPLETION.search(window)
    return (
        int(prompt.group(1)) if prompt else 0,
        int(completion.group(1)) if completion else 0,
    )


# A number followed by what ends it: not one the end of a cut read made shorter.
_WHOLE_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)\s*[,}]')
_WHOLE_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)\s*[,}]')


def whole_usage_tokens(tail: bytes) -> tuple[int, int] | None:
    """``usage_tokens`` of an answer cut short: only a usage object that came with both
    its counts whole, not one whose bytes stop in it (a cut that falls in the usage
    chunk would charge a prompt count cut to its first digits, and no completion)."""
    start = tail.rfind(b'"usage"')
    if start < 0:
        return None
    window = tail[start : start + 512]
    prompt = _WHOLE_PROMPT.search(window)
    completion = _WHOLE_COMPLETION.search(window)
    if prompt is None or completion is None:
        return None
    return int(prompt.group(1)), int(completion.group(1))


class _Histogram:
    """Bucket counts kept as plain ints: one bisect per observation (a prometheus_client
    Histogram takes a lock and walks its buckets in Python, several microseconds)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def absorb(self, counts: list[int], total: float) -> None:
        for index, count in enumerate(counts):
            self.counts[index] += count
        self.total += total

    def buckets(self) -> list[tuple[str, float]]:
        cumulative = 0
        out: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            out.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
        return out


class _Figures:
    """One (service, model)'s counters and histograms."""

    __slots__ = ("by_status", "completion", "duration", "prompt", "ttfb")

    def __init__(self) -> None:
        self.by_status = dict.fromkeys(_STATUS_CLASS.values(), 0)
        self.duration = _Histogram(LATENCY_BUCKETS_S)
        self.ttfb = _Histogram(LATENCY_BUCKETS_S)
        self.prompt = 0
        self.completion = 0


class Metrics:
    """Figures kept as plain numbers on the request path; turned into Prometheus
    families by ``collect`` when scraped, and rendered by prometheus_client.

    With workers, each worker's figures travel to the supervisor as ``state()``
    and are summed there with ``absorb``; prometheus_client then renders the
    sum, so the output is the whole router's (and counters of a worker that
    died are kept, never go back).
    """

    def __init__(self, roster: Roster, queue_length: Callable[[], int]) -> None:
        self.roster = roster
        self.queue_length = queue_length
        self._figures: dict[tuple[str, str], _Figures] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self.added = _Histogram(ADDED_BUCKETS_S)
        # Disaggregated requests' steps (journey/pair.py), by role ("prefill", "decode") and
        # outcome ("ok", "failed").
        self._pd: dict[tuple[str, str], int] = {}
        self._fallbacks: dict[tuple[str, str], int] = {}  # (model, fallback taken)
        # [[keys]] keys, by name (never the key itself): requests admitted, tokens
        # (prompt, completion), and requests refused by reason.
        self._key_requests: dict[str, int] = {}
        self._key_tokens: dict[str, list[int]] = {}
        self._key_rejected: dict[tuple[str, str], int] = {}
        self._shed = 0  # requests shed from a full queue (by key: _key_rejected, "shed")
        self.prometheus = CollectorRegistry(auto_describe=False)
        self.prometheus.register(self)

    def finished(
        self,
        service: Service,
        model: str | None,
        status: int,
        duration_s: float,
        ttfb_s: float,
        tail: bytes,
    ) -> tuple[int, int] | None:
        """Count a response; its (prompt, completion) tokens, if its tail has usage."""
        key = (service.name, model or "")
        figures = self._figures.get(key)
        if figures is None:
            figures = self._figures[key] = _Figures()
        figures.duration.observe(duration_s)
        figures.ttfb.observe(ttfb_s)
        figures.by_status[_STATUS_CLASS.get(status // 100, "5xx")] += 1
        if status >= 500 or status == 429:
            self.failed(service, f"status_{status}")
        if not tail:
            return None
        tokens = usage_tokens(tail)
        if tokens:
            figures.prompt += tokens[0]
            figures.completion += tokens[1]
        return tokens

    def failed(self, service: Service, kind: str) -> None:
        key = (service.name, kind)
        self._errors[key] = self._errors.get(key, 0) + 1

    def fallback(self, model: str, to: str) -> None:
        self._fallbacks[(model, to)] = self._fallbacks.get((model, to), 0) + 1

    def shed(self, key: str | None) -> None:
        self._shed += 1
        if key is not None:
            self.key_rejected(key, "shed")

    def key_request(self, key: str) -> None:
        self._key_requests[key] = self._key_requests.get(key, 0) + 1

    def key_tokens(self, key: str, tokens: tuple[int, int]) -> None:
        counts = self._key_tokens.get(key)
        if counts is None:
            counts = self._key_tokens[key] = [0, 0]
        counts[0] += tokens[0]
        counts[1] += tokens[1]

    def key_rejected(self, key: str, reason: str) -> None:
        self._key_rejected[(key, reason)] = self._key_rejected.get((key, reason), 0) + 1

    def key_counts(self) -> dict[str, dict[str, Any]]:
        """Per key: requests, tokens and refusals by reason, for /stats."""
        names = {*self._key_requests, *self._key_tokens, *(k for k, _ in self._key_rejected)}
        counts: dict[str, dict[str, Any]] = {}
        for name in sorted(names):
            prompt, completion = self._key_tokens.get(name, (0, 0))
            counts[name] = {
                "requests": self._key_requests.get(name, 0),
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "rejected": {
                    reason: n for (key, reason), n in self._key_rejected.items() if key == name
                },
            }
        return counts

    def pd(self, role: str, outcome: str) -> None:
        self._pd[(role, outcome)] = self._pd.get((role, outcome), 0) + 1

    def pd_counts(self) -> dict[str, dict[str, int]]:
        """{role: {outcome: count}}, for /stats."""
        counts: dict[str, dict[str, int]] = {}
        for (role, outcome), count in self._pd.items():
            counts.setdefault(role, {})[outcome] = count
        return counts

    def state(self) -> dict[str, Any]:
        return {
            "figures": [
                [
                    service,
                    model,
                    f.by_status,
                    f.duration.counts,
                    f.duration.total,
                    f.ttfb.counts,
                    f.ttfb.total,
                    f.prompt,
                    f.completion,
                ]
                for (service, model), f in self._figures.items()
            ],
            "errors": [[service, kind, n] for (service, kind), n in self._errors.items()],
            "added": [self.added.counts, self.added.total],
            "pd": [[role, outcome, n] for (role, outcome), n in self._pd.items()],
            "fallbacks": [[model, to, n] for (model, to), n in self._fallbacks.items()],
            "keys": [
                self._key_requests,
                self._key_tokens,
                [[key, reason, n] for (key, reason), n in self._key_rejected.items()],
            ],
            "shed": self._shed,
        }

    def absorb(self, state: dict[str, Any]) -> None:
        """Add another process's ``state()`` to these figures."""
        for service, model, by_status, d_counts, d_total, t_counts, t_total, p, c in state[
            "figures"
        ]:
            figures = self._figures.get((service, model))
            if figures is None:
                figures = self._figures[(service, model)] = _Figures()
            for status, count in by_status.items():
                figures.by_status[status] += count
            figures.duration.absorb(d_counts, d_total)
            figures.ttfb.absorb(t_counts, t_total)
            figures.prompt += p
            figures.completion += c
        for service, kind, count in state["errors"]:
            self._errors[(service, kind)] = self._errors.get((service, kind), 0) + count
        self.added.absorb(*state["added"])
        for role, outcome, count in state.get("pd", []):
            self._pd[(role, outcome)] = self._pd.get((role, outcome), 0) + count
        for model, to, count in state.get("fallbacks", []):
            self._fallbacks[(model, to)] = self._fallbacks.get((model, to), 0) + count
        self._shed += state.get("shed", 0)
        if "keys" in state:
            requests, tokens, rejected = state["keys"]
            for key, count in requests.items():
                self._key_requests[key] = self._key_requests.get(key, 0) + count
            for key, (prompt, completion) in tokens.items():
                self.key_tokens(key, (prompt, completion))
            for key, reason, count in rejected:
                self._key_rejected[(key, reason)] = self._key_rejected.get((key, reason), 0) + count

    def render(self) -> bytes:
        return generate_latest(self.prometheus)

    def collect(self) -> Iterator[Metric]:
        requests, duration, ttfb, tokens = self._figure_families()
        yield requests
        yield from self._count_families()
        yield duration
        yield ttfb
        yield tokens
        added = HistogramMetricFamily(
            "lmproxy_added_latency_seconds",
            "Time the router itself adds before the backend sees a request "
            "(from the request's last byte to the send)",
        )
        added.add_metric([], self.added.buckets(), self.added.total)
        yield added
        *per_service, engine = self._service_families()
        yield from per_service
        queue = GaugeMetricFamily(
            "lmproxy_queue_length",
            "Requests waiting for a free slot (every eligible service at its max_in_flight)",
        )
        queue.add_metric([], self.queue_length())
        yield queue
        yield from engine

    def _figure_families(
        self,
    ) -> tuple[
        CounterMetricFamily, HistogramMetricFamily, HistogramMetricFamily, CounterMetricFamily
    ]:
        """The figures of the requests each service answered, per model."""
        requests = CounterMetricFamily(
            "lmproxy_requests",
            "Proxied requests, by service, model and status class",
            labels=["service", "model", "status"],
        )
        duration = HistogramMetricFamily(
            "lmproxy_request_duration_seconds",
            "Request duration, to the response's last byte",
            labels=["service", "model"],
        )
        ttfb = HistogramMetricFamily(
            "lmproxy_time_to_first_byte_seconds",
            "From the request sent to the response head",
            labels=["service", "model"],
        )
        tokens = CounterMetricFamily(
            "lmproxy_tokens",
            "Tokens, from the backends' usage objects",
            labels=["service", "model", "kind"],
        )
        for (service, model), figures in self._figures.items():
            for status, count in figures.by_status.items():
                if count:
                    requests.add_metric([service, model, status], count)
            duration.add_metric(
                [service, model], figures.duration.buckets(), figures.duration.total
            )
            ttfb.add_metric([service, model], figures.ttfb.buckets(), figures.ttfb.total)
            tokens.add_metric([service, model, "prompt"], figures.prompt)
            tokens.add_metric([service, model, "completion"], figures.completion)
        return requests, duration, ttfb, tokens

    def _count_families(self) -> list[Metric]:
        """What is counted beside the answers: errors, disaggregated steps, fallbacks,
        the API keys' figures and the requests shed."""
        errors = CounterMetricFamily(
            "lmproxy_errors",
            "Failed requests, by service and kind of failure",
            labels=["service", "kind"],
        )
        for (service, kind), count in self._errors.items():
            errors.add_metric([service, kind], count)
        pd = CounterMetricFamily(
            "lmproxy_pd_requests",
            "Steps of disaggregated requests, by role (prefill, decode) and outcome",
            labels=["role", "outcome"],
        )
        for (role, outcome), count in self._pd.items():
            pd.add_metric([role, outcome], count)
        fallbacks = CounterMetricFamily(
            "lmproxy_fallbacks",
            "Requests a model could not answer that went to its fallback, by model pair",
            labels=["model", "to"],
        )
        for (model, to), count in self._fallbacks.items():
            fallbacks.add_metric([model, to], count)
        key_requests = CounterMetricFamily(
            "lmproxy_key_requests",
            "Requests admitted, by API key name ([[keys]])",
            labels=["key"],
        )
        for key, count in self._key_requests.items():
            key_requests.add_metric([key], count)
        key_tokens = CounterMetricFamily(
            "lmproxy_key_tokens",
            "Tokens, from the responses' usage, by API key name and kind",
            labels=["key", "kind"],
        )
        for key, (prompt, completion) in self._key_tokens.items():
            key_tokens.add_metric([key, "prompt"], prompt)
            key_tokens.add_metric([key, "completion"], completion)
        key_rejected = CounterMetricFamily(
            "lmproxy_key_rejected",
            "Requests refused, by API key name and reason: rpm, tpm, max_in_flight, shed "
            "(429), model, priority (403)",
            labels=["key", "reason"],
        )
        for (key, reason), count in self._key_rejected.items():
            key_rejected.add_metric([key, reason], count)
        shed = CounterMetricFamily(
            "lmproxy_queue_shed",
            "Requests shed from a full admission queue (--max-queue), the lowest priority first",
            self._shed,
        )
        return [errors, pd, fallbacks, key_requests, key_tokens, key_rejected, shed]

    def _service_families(self) -> tuple[Metric, Metric, Metric, Metric, Metric, list[Metric]]:
        """Each service's state now: in flight, health, breaker, limit, and the engine
        load last scraped."""
        in_flight = GaugeMetricFamily(
            "lmproxy_in_flight_requests", "Requests under way, per service", labels=["service"]
        )
        healthy = GaugeMetricFamily(
            "lmproxy_service_healthy",
            "1 while the service is healthy, else 0",
            labels=["service"],
        )
        circuit = GaugeMetricFamily(
            "lmproxy_circuit_state",
            "The service's circuit breaker: 0 closed, 1 open (out of routing), 2 half-open",
            labels=["service"],
        )
        opened = CounterMetricFamily(
            "lmproxy_circuit_opened",
            "Times the service's circuit breaker opened",
            labels=["service"],
        )
        limit = GaugeMetricFamily(
            "lmproxy_max_in_flight",
            "The service's max_in_flight (0: no limit)",
            labels=["service"],
        )
        engine = {
            name: GaugeMetricFamily(f"lmproxy_engine_{name}", text, labels=["service"])
            for name, text in (
                ("running_requests", "The engine's batch, from its /metrics (last scrape)"),
                ("waiting_requests", "The engine's queue, from its /metrics (last scrape)"),
                ("kv_cache_usage", "The engine's KV-cache use, 0-1 (last scrape)"),
                ("load_age_seconds", "Seconds since the engine's /metrics was last read"),
            )
        }
        now = time.time()
        for each in self.roster.services.values():
            in_flight.add_metric([each.name], each.in_flight)
            healthy.add_metric([each.name], 1 if each.healthy else 0)
            circuit.add_metric([each.name], each.breaker.state)
            opened.add_metric([each.name], each.breaker.opened_total)
            limit.add_metric([each.name], each.spec.max_in_flight)
            if each.engine_at is not None:
                labels = [each.name]
                engine["running_requests"].add_metric(labels, each.engine_running or 0)
                engine["waiting_requests"].add_metric(labels, each.engine_waiting or 0)
                if each.engine_kv is not None:
                    engine["kv_cache_usage"].add_metric(labels, each.engine_kv)
                engine["load_age_seconds"].add_metric(labels, max(0.0, now - each.engine_at))
        return in_flight, healthy, circuit, opened, limit, list(engine.values())


_encode = msgspec.json.Encoder().encode


def log_access(
    style: str,
    request_id: bytes,
    method: bytes,
    path: bytes,
    model: str | None,
    service: str,
    status: int,
    bytes_out: int,
    ttfb_s: float,
    total_s: float,
    fallback_from: str | None = None,
    trace_id: str = "",
    key: str | None = None,
) -> None:
    if style == "json":
        access_log.info(
            _encode(
                {
                    "time": time.time(),
                    "request_id": request_id.decode("latin-1"),
                    "method": method.decode("latin-1"),
                    "path": path.decode("latin-1"),
                    "model": model,
                    "service": service,
                    "status": status,
                    "bytes": bytes_out,
                    "ttfb_s": round(ttfb_s, 6),
                    "total_s": round(total_s, 6),
                    **({"fallback_from": fallback_from} if fallback_from else {}),
                    **({"key": key} if key else {}),
                    "trace_id": trace_id,
                }
            ).decode()
        )
    else:
        access_log.info(
            '%s "%s %s" %d %d model=%s service=%s ttfb=%.4fs total=%.4fs trace=%s%s%s',
            request_id.decode("latin-1"),
            method.decode("latin-1"),
            path.decode("latin-1"),
            status,
            bytes_out,
            model or "-",
            service or "-",
            ttfb_s,
            total_s,
            trace_id or "-",
            f" fallback_from={fallback_from}" if fallback_from else "",
            f" key={key}" if key else "",
        )
