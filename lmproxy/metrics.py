"""Prometheus metrics (``GET /metrics``) and the access log.

The request path pays only for what cannot be known later: one call per
finished request, with label children cached per (service, model) so no label
lookup happens per request. Figures the registry already keeps (in-flight
requests, health) are read at scrape time by a collector, at no cost per
request. Token counts come from the ``usage`` object the backend sends last; it
is found in the response's final bytes with a regular expression, so streamed
tokens are never parsed.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from lmproxy.registry import Registry, Service

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ADDED_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')

access_log = logging.getLogger("lmproxy.access")


def usage_tokens(tail: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of the last ``usage`` object in ``tail``, if any."""
    start = None
    for match in _USAGE.finditer(tail):
        start = match.end()
    if start is None:
        return None
    window = tail[start : start + 512]
    prompt = _PROMPT.search(window)
    completion = _COMPLETION.search(window)
    return (
        int(prompt.group(1)) if prompt else 0,
        int(completion.group(1)) if completion else 0,
    )


class _Live:
    """Read at scrape time from the registry: in-flight requests and health."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily]:
        in_flight = GaugeMetricFamily(
            "lmproxy_in_flight_requests", "Requests under way, per service", labels=["service"]
        )
        healthy = GaugeMetricFamily(
            "lmproxy_service_healthy",
            "1 while the service is healthy, else 0",
            labels=["service"],
        )
        for service in self.registry.services.values():
            in_flight.add_metric([service.name], service.in_flight)
            healthy.add_metric([service.name], 1 if service.healthy else 0)
        yield in_flight
        yield healthy


class Metrics:
    def __init__(self, registry: Registry) -> None:
        self.prometheus = CollectorRegistry(auto_describe=False)
        r = self.prometheus
        self.requests = Counter(
            "lmproxy_requests",
            "Proxied requests, by service, model and status class",
            ["service", "model", "status"],
            registry=r,
        )
        self.errors = Counter(
            "lmproxy_errors",
            "Failed requests, by service and kind of failure",
            ["service", "kind"],
            registry=r,
        )
        self.duration = Histogram(
            "lmproxy_request_duration_seconds",
            "Request duration, to the response's last byte",
            ["service", "model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ttfb = Histogram(
            "lmproxy_time_to_first_byte_seconds",
            "From the request sent to the response head",
            ["service", "model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tokens = Counter(
            "lmproxy_tokens",
            "Tokens, from the backends' usage objects",
            ["service", "model", "kind"],
            registry=r,
        )
        self.added = Histogram(
            "lmproxy_added_latency_seconds",
            "Time the router itself adds before the backend sees a request "
            "(from the request's last byte to the send)",
            buckets=ADDED_BUCKETS_S,
            registry=r,
        )
        r.register(_Live(registry))
        self._children: dict[tuple[str, str], tuple] = {}

    def _for(self, service: Service, model: str) -> tuple:
        key = (service.name, model)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.duration.labels(service.name, model),
                self.ttfb.labels(service.name, model),
                {c: self.requests.labels(service.name, model, c) for c in _STATUS_CLASS.values()},
                self.tokens.labels(service.name, model, "prompt"),
                self.tokens.labels(service.name, model, "completion"),
            )
        return children

    def finished(
        self,
        service: Service,
        model: str | None,
        status: int,
        duration_s: float,
        ttfb_s: float,
        tail: bytes,
    ) -> None:
        duration, ttfb, by_status, prompt, completion = self._for(service, model or "")
        duration.observe(duration_s)
        ttfb.observe(ttfb_s)
        by_status[_STATUS_CLASS.get(status // 100, "5xx")].inc()
        if status >= 500 or status == 429:
            self.errors.labels(service.name, f"status_{status}").inc()
        if tail:
            tokens = usage_tokens(tail)
            if tokens:
                prompt.inc(tokens[0])
                completion.inc(tokens[1])

    def failed(self, service: Service, kind: str) -> None:
        self.errors.labels(service.name, kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.prometheus)


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
                }
            ).decode()
        )
    else:
        access_log.info(
            '%s "%s %s" %d %d model=%s service=%s ttfb=%.4fs total=%.4fs',
            request_id.decode("latin-1"),
            method.decode("latin-1"),
            path.decode("latin-1"),
            status,
            bytes_out,
            model or "-",
            service or "-",
            ttfb_s,
            total_s,
        )
