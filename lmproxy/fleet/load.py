"""The engines' own load: each service's Prometheus ``/metrics``, scraped every
``--load-interval`` seconds.

The router knows its own requests in flight, exactly and at once; an engine
also serves other routers and direct clients, and a long prompt keeps it busy
longer than a count shows. vLLM and SGLang publish their batch and queue:

- vLLM: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` before it);
- SGLang: ``sglang:num_running_reqs``, ``sglang:num_queue_reqs``,
  ``sglang:token_usage``.

Routing weighs the engine's whole batch and queue, summed over their series
(``model_name``, and ``engine`` for vLLM's data-parallel ranks): the models one
engine serves share its batch, so a request for any of them waits behind all.
Each model's own figures are kept too, and ``/stats`` shows them. A service
whose ``/metrics`` is missing, or has none of these, is asked once and then
left alone. A figure older than ``STALE_INTERVALS`` intervals is dropped, so a
stale engine view never outweighs the router's fresh count
(``Roster.engine_stale``).

The page is read as it arrives (``PageScan``), never as a whole: an engine's
page is mostly histograms, and a hostile one can be 4 MiB of lines. One
precompiled regex finds, in C, the lines of the families above (a line starts
with the name, then ``{``, a blank or a tab); only those lines cost Python, and
at most ``MAX_SERIES`` per family are taken. Past that, or on a sample that is
not a count, the page is refused: the scrape stops reading, the service's
figures become unknown (the router's own count decides, as with no figures),
and the reason is logged once. Each read of the page is scanned before the next
is awaited, so the loop is held for one read's worth (64 KiB) at a time.

A scrape that fails in any other way, even by a bug, costs that service a
back-off (``BACKOFF_MAX_S`` at most), not the loop: each cause is logged once
per service, until the cause changes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple, Protocol

from lmproxy.backend.probe import ProbeError, probe
from lmproxy.fleet.roster import Roster, Service

log = logging.getLogger("lmproxy")

STALE_INTERVALS = 3
# Samples taken per family in one page: an engine has one per model and rank.
# This also bounds the models kept per service (a page cannot grow the registry).
MAX_SERIES = 64
MAX_LABEL_VALUE = 256  # a longer model_name is summed, not kept by name
BACKOFF_MAX_S = 60.0  # a service whose scrapes keep failing is asked at least this often

RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
_FAMILIES = (*RUNNING, *WAITING, *KV_USAGE)
_INDEX = {name.encode(): i for i, name in enumerate(_FAMILIES)}
# A sample line of a wanted family, from the newline before it (the scan's buffer
# starts with one): its name, then labels and value. Not "# HELP"/"# TYPE" lines, nor
# longer names (sglang:num_running_reqs_offline_batch).
_LINE = re.compile(rb"\n(" + b"|".join(re.escape(name) for name in _INDEX) + rb")([{ \t][^\n]*)")
_MODEL = re.compile(rb'(?:^|,)[ \t]*model_name[ \t]*=[ \t]*"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(rb"\\(.)")


class Figures(NamedTuple):
    running: int
    waiting: int
    kv: float | None
    models: dict[str, tuple[int, int]]  # per model_name label: (running, waiting)


class PageRefused(Exception):
    """A page the router does not take: the message says why."""


class PageScan:
    """The load figures of one Prometheus text page, fed as its bytes arrive."""

    __slots__ = ("_batch", "_counts", "_kv", "_models", "_pending", "_queued", "lines")

    def __init__(self) -> None:
        # What is not scanned yet: the last, unfinished line, after the newline before it.
        self._pending = bytearray(b"\n")
        self._counts = [0] * len(_FAMILIES)
        self._kv: dict[int, float] = {}
        self._models: dict[str, tuple[int, int]] = {}
        self._batch = self._queued = 0
        self.lines = 0  # sample lines handled in Python: at most MAX_SERIES per family

    def feed(self, data: bytes) -> None:
        """Scan the lines ``data`` completes; raises PageRefused."""
        pending = self._pending
        start = len(pending)
        pending += data
        end = pending.rfind(b"\n", start)
        if end < 0:
            return  # a line longer than this read: the page's size bounds it
        self._scan(end)
        del pending[:end]

    def figures(self) -> Figures | None:
        """After the last byte: the figures; None if the page has neither a running nor
        a waiting figure. Raises PageRefused."""
        self._pending += b"\n"
        self._scan(len(self._pending) - 1)
        counts = self._counts
        if not any(counts[: len(RUNNING) + len(WAITING)]):
            return None
        usage = next((self._kv[i] for i in sorted(self._kv)), None)  # vLLM's new name first
        return Figures(self._batch, self._queued, usage, self._models)

    def _scan(self, end: int) -> None:
        for match in _LINE.finditer(self._pending, 0, end):
            self._sample(_INDEX[match[1]], match[2])

    def _sample(self, family: int, rest: bytes) -> None:
        self.lines += 1
        name = _FAMILIES[family]
        count = self._counts[family] = self._counts[family] + 1
        if count > MAX_SERIES:
            raise PageRefused(f"{name} has over {MAX_SERIES} series")
        labels = b""
        if rest[:1] == b"{":
            close = rest.rfind(b"}")
            if close < 0:
                raise PageRefused(f"a sample of {name} has no end to its labels")
            labels, rest = rest[1:close], rest[close + 1 :]
        fields = rest.split(None, 1)
        try:
            value = float(fields[0]) if fields else math.nan
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise PageRefused(f"a sample of {name} is not a count: {rest[:40]!r}")
        if family >= len(RUNNING) + len(WAITING):
            self._kv[family] = max(self._kv.get(family, 0.0), value)
        else:
            self._requests(family < len(RUNNING), int(value), labels)

    def _requests(self, is_running: bool, requests: int, labels: bytes) -> None:
        """A running or waiting count: the batch's or the queue's, and its model's."""
        if is_running:
            self._batch += requests
        else:
            self._queued += requests
        found = _MODEL.search(labels) if labels else None
        if found is None or len(found[1]) > MAX_LABEL_VALUE:
            return
        raw = found[1]
        model = (_ESCAPE.sub(_unescape, raw) if b"\\" in raw else raw).decode("utf-8", "replace")
        r, w = self._models.get(model, (0, 0))
        self._models[model] = (r + requests, w) if is_running else (r, w + requests)


def _unescape(match: re.Match[bytes]) -> bytes:
    return b"\n" if match[1] == b"n" else match[1]


def parse(page: bytes | str) -> Figures | None:
    """The engine's figures from a whole Prometheus text page (see ``PageScan``)."""
    scan = PageScan()
    scan.feed(page.encode() if isinstance(page, str) else page)
    return scan.figures()


class Fetch(Protocol):
    """How a scrape GETs a page (``probe.probe``), the body going to ``sink``."""

    def __call__(
        self, service: Service, path: str, timeout_s: float, via: str, sink: Callable[[bytes], None]
    ) -> Awaitable[tuple[int, bytes]]: ...


class LoadScraper:
    def __init__(
        self,
        roster: Roster,
        interval_s: float,
        timeout_s: float,
        via: str = "",
        fetch: Fetch = probe,
    ) -> None:
        self.roster = roster
        self.interval_s = interval_s  # 0: off
        self.timeout_s = timeout_s
        self.via = via
        self.fetch = fetch
        self._task: asyncio.Task[None] | None = None
        # Per service name: the cause last logged (once per cause), and, after a failed
        # scrape, when to try again and the back-off that led there.
        self._logged: dict[str, str] = {}
        self._retry: dict[str, tuple[float, float]] = {}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="load")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        backoff = 0.0
        while True:
            interval = self.interval_s
            try:
                if interval > 0:
                    await self.scrape_all()
                self._sweep(interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug: the scrapes stop for a while, not for good
                backoff = min(max(2 * backoff, interval, 1.0), BACKOFF_MAX_S)
                self._note("", f"{type(exc).__name__}: {exc}", exc)
                await asyncio.sleep(backoff)
                continue
            backoff = 0.0
            await asyncio.sleep(interval if interval > 0 else 1.0)

    async def scrape_all(self) -> None:
        """One round: every healthy service with load figures, but those backing off."""
        now = time.monotonic()
        services = [
            s
            for s in self.roster.healthy()
            if not s.metrics_missing and self._retry.get(s.name, (0.0, 0.0))[0] <= now
        ]
        await asyncio.gather(*(self._scrape_guarded(s) for s in services))

    def _sweep(self, interval: float) -> None:
        now = time.time()
        services = self.roster.services
        for service in services.values():
            at = service.engine_at
            # Turned off by a reload, or too old: the router's own count decides.
            if at is not None and (interval <= 0 or now - at > STALE_INTERVALS * interval):
                self.roster.engine_stale(service)
        for book in (self._logged, self._retry):
            for name in [n for n in book if n and n not in services]:
                del book[name]

    async def _scrape_guarded(self, service: Service) -> None:
        try:
            await self.scrape(service)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _, backoff = self._retry.get(service.name, (0.0, 0.0))
            backoff = min(max(2 * backoff, self.interval_s), BACKOFF_MAX_S)
            self._retry[service.name] = (time.monotonic() + backoff, backoff)
            self._note(service.name, f"{type(exc).__name__}: {exc}", exc)
            self.roster.engine_stale(service, forget=True)
        else:
            self._retry.pop(service.name, None)

    def _note(self, name: str, cause: str, exc: BaseException | None = None) -> None:
        """Log ``cause`` for service ``name`` ("": the loop) once, until it changes."""
        if self._logged.get(name) == cause:
            return
        self._logged[name] = cause
        whose = f"service {name}" if name else "the load scrape"
        if exc is not None:  # unexpected: the traceback, once
            log.error("%s: scraping /metrics failed: %s; retried later", whose, cause, exc_info=exc)
        else:
            log.warning("%s: %s", whose, cause)

    async def scrape(self, service: Service) -> None:
        path = service.path_prefix.decode() + "/metrics"
        scan = PageScan()
        try:
            status, _ = await self.fetch(service, path, self.timeout_s, self.via, sink=scan.feed)
            figures = scan.figures() if status == 200 else None
        except (ProbeError, TimeoutError, OSError) as exc:
            # The health check reports a service that is down; the figure goes stale.
            self._note(service.name, f"{path} could not be read: {exc or 'timed out'}")
            return
        except PageRefused as exc:
            self._note(
                service.name,
                f"{path} refused: {exc}; its load is the router's own count until it reads",
            )
            self.roster.engine_stale(service, forget=True)
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
            else:
                self._note(service.name, f"{path} answered {status}")
            return
        self.roster.engine_load(
            service, figures.running, figures.waiting, figures.kv, time.time(), figures.models
        )
