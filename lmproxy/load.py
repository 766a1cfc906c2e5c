"""The engines' own load: each service's Prometheus ``/metrics``, scraped every
``--load-interval`` seconds.

The router knows its own requests in flight, exactly and at once; an engine
also serves other routers and direct clients, and a long prompt keeps it busy
longer than a count shows. vLLM and SGLang publish their batch and queue:

- vLLM: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` before it);
- SGLang: ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
  ``sglang:token_usage``.

Routing weighs the engine's whole batch and queue, summed over their
``model_name`` labels: the models one engine serves (a base model and its LoRA
adapters, say) share its batch, so a request for any of them waits behind all.
Each model's own figures are kept too, and ``/stats`` shows them. A service
whose ``/metrics`` is missing, or has none of these, is asked once and then
left alone. A figure older than
``STALE_INTERVALS`` intervals is dropped, so a stale engine view never
outweighs the router's fresh count (``Registry.engine_stale``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families

from lmproxy.probe import ProbeError, probe
from lmproxy.registry import Registry, Service

log = logging.getLogger("lmproxy")

STALE_INTERVALS = 3
MAX_MODELS = 64  # model_name labels kept per service: a page cannot grow the registry
RUNNING = frozenset({"vllm:num_requests_running", "sglang:num_running_reqs"})
WAITING = frozenset({"vllm:num_requests_waiting", "sglang:num_queue_reqs"})
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
_WANTED = (*RUNNING, *WAITING, *KV_USAGE)


def _wanted(line: str) -> bool:
    if line.startswith("#"):  # "# HELP name ..." or "# TYPE name ..."
        parts = line.split(None, 3)
        return len(parts) > 2 and parts[2].startswith(_WANTED)
    return line.startswith(_WANTED)


class Figures(NamedTuple):
    running: int
    waiting: int
    kv: float | None
    models: dict[str, tuple[int, int]]  # per model_name label: (running, waiting)


def parse(text: str) -> Figures | None:
    """The engine's figures from a Prometheus text page; None if it has neither a
    running nor a waiting figure."""
    # Only the lines that matter go to the parser: an engine's page holds hundreds of
    # histogram lines, and this runs every interval for every service.
    lines = [line for line in text.splitlines() if _wanted(line)]
    running = waiting = 0
    found = False
    kv: dict[str, float] = {}
    models: dict[str, tuple[int, int]] = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            is_running = sample.name in RUNNING
            if is_running or sample.name in WAITING:
                value = int(sample.value)
                found = True
                if is_running:
                    running += value
                else:
                    waiting += value
                model = sample.labels.get("model_name")
                if model is not None and (model in models or len(models) < MAX_MODELS):
                    r, w = models.get(model, (0, 0))
                    models[model] = (r + value, w) if is_running else (r, w + value)
            elif sample.name in KV_USAGE:
                kv[sample.name] = max(kv.get(sample.name, 0.0), sample.value)
    if not found:
        return None
    usage = next((kv[name] for name in KV_USAGE if name in kv), None)
    return Figures(running, waiting, usage, models)


class LoadScraper:
    def __init__(
        self, registry: Registry, interval_s: float, timeout_s: float, via: str = ""
    ) -> None:
        self.registry = registry
        self.interval_s = interval_s  # 0: off
        self.timeout_s = timeout_s
        self.via = via
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="load")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            interval = self.interval_s
            if interval > 0:
                services = [s for s in self.registry.healthy() if not s.metrics_missing]
                await asyncio.gather(*(self.scrape(s) for s in services))
            now = time.time()
            for service in self.registry.services.values():
                at = service.engine_at
                # Turned off by a reload, or too old: the router's own count decides.
                if at is not None and (interval <= 0 or now - at > STALE_INTERVALS * interval):
                    self.registry.engine_stale(service)
            await asyncio.sleep(interval if interval > 0 else 1.0)

    async def scrape(self, service: Service) -> None:
        path = service.path_prefix.decode() + "/metrics"
        try:
            status, body = await probe(service, path, self.timeout_s, self.via)
        except (ProbeError, TimeoutError, OSError):
            return  # the health check reports it; the figure goes stale meanwhile
        try:
            figures = parse(body.decode("utf-8", "replace")) if status == 200 else None
        except Exception as exc:  # a page prometheus_client cannot read: not this time
            log.debug("service %s: %s did not parse: %s", service.name, path, exc)
            return
        if figures is None:
            if status in (200, 404):
                service.metrics_missing = True
                log.info(
                    "service %s: %s has no engine load figures (vLLM's or SGLang's); "
                    "its load is the router's own count",
                    service.name,
                    path,
                )
            return
        self.registry.engine_load(
            service, figures.running, figures.waiting, figures.kv, time.time(), figures.models
        )
