"""The engines' own load: each service's Prometheus ``/metrics``, scraped every
``--load-interval`` seconds.

The router knows its own requests in flight, exactly and at once; an engine
also serves other routers and direct clients, and a long prompt keeps it busy
longer than a count shows. vLLM and SGLang publish their batch and queue:

- vLLM: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` before it);
- SGLang: ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
  ``sglang:token_usage``.

Figures are summed over their ``model_name`` labels (one engine's queue is
shared by the models it serves). A service whose ``/metrics`` is missing, or
has none of these, is asked once and then left alone. A figure older than
``STALE_INTERVALS`` intervals is dropped, so a stale engine view never
outweighs the router's fresh count (``Registry.engine_stale``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client.parser import text_string_to_metric_families

from lmproxy.probe import ProbeError, http_get
from lmproxy.registry import Registry, Service

log = logging.getLogger("lmproxy")

STALE_INTERVALS = 3
RUNNING = frozenset({"vllm:num_requests_running", "sglang:num_running_reqs"})
WAITING = frozenset({"vllm:num_requests_waiting", "sglang:num_queue_reqs"})
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
_WANTED = (*RUNNING, *WAITING, *KV_USAGE)


def _wanted(line: str) -> bool:
    if line.startswith("#"):  # "# HELP name ..." or "# TYPE name ..."
        parts = line.split(None, 3)
        return len(parts) > 2 and parts[2].startswith(_WANTED)
    return line.startswith(_WANTED)


def parse(text: str) -> tuple[int, int, float | None] | None:
    """(running, waiting, KV-cache use) from a Prometheus text page; None if it has
    neither a running nor a waiting figure."""
    # Only the lines that matter go to the parser: an engine's page holds hundreds of
    # histogram lines, and this runs every interval for every service.
    lines = [line for line in text.splitlines() if _wanted(line)]
    running = waiting = 0
    found = False
    kv: dict[str, float] = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            if sample.name in RUNNING:
                running += int(sample.value)
                found = True
            elif sample.name in WAITING:
                waiting += int(sample.value)
                found = True
            elif sample.name in KV_USAGE:
                kv[sample.name] = max(kv.get(sample.name, 0.0), sample.value)
    if not found:
        return None
    usage = next((kv[name] for name in KV_USAGE if name in kv), None)
    return running, waiting, usage


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
            status, body = await http_get(
                service.host, service.port, path, self.timeout_s, self.via
            )
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
        running, waiting, kv = figures
        self.registry.engine_load(service, running, waiting, kv, time.time())
