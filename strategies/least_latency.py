"""The lowest moving average of time to first byte, with exploration.

Time to first byte is what a user waits for, and it rises with a service's
queue and prefill load. A service with no figures yet is tried first. Averages
of services that are not chosen would never change, so a slow service would
never win back traffic after it recovers: now and then (``explore``, a
fraction of requests) the least recently tried service is sent one request,
which refreshes its figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from strategies import BaseStrategy, Option

if TYPE_CHECKING:
    from lmproxy.client.request import RouteRequest
    from lmproxy.fleet.roster import Service


class LeastLatency(BaseStrategy):
    summary = "the lowest moving average of time to first byte; slow ones re-probed now and then"
    OPTIONS = {
        "alpha": Option(float, 0.3, "weight of the newest sample in the moving average (0-1]"),
        "explore": Option(float, 0.05, "fraction of requests sent to the least recently tried"),
    }

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        if not 0 < self.opt["alpha"] <= 1:
            raise ValueError("alpha must be in (0, 1]")
        if not 0 <= self.opt["explore"] < 1:
            raise ValueError("explore must be in [0, 1)")
        self._ewma: dict[str, float] = {}
        self._last_tried: dict[str, int] = {}
        self._count = 0
        self._credit = 0.0

    def choose(self, candidates: Sequence[Service], request: RouteRequest) -> Service:
        self._count += 1
        ewma = self._ewma
        untried = [s for s in candidates if s.name not in ewma]
        if untried:
            chosen = min(untried, key=lambda s: self._last_tried.get(s.name, 0))
        else:
            self._credit += self.opt["explore"]
            if self._credit >= 1 and len(candidates) > 1:
                self._credit -= 1
                chosen = min(candidates, key=lambda s: self._last_tried.get(s.name, 0))
            else:
                # Queueing adds to the wait: weigh the average by the work in flight.
                chosen = min(
                    candidates, key=lambda s: ewma[s.name] * (1 + s.in_flight + s.engine_extra)
                )
        self._last_tried[chosen.name] = self._count
        return chosen

    def on_first_byte(self, service: Service, request: RouteRequest, ttfb_s: float) -> None:
        old = self._ewma.get(service.name)
        alpha = self.opt["alpha"]
        self._ewma[service.name] = ttfb_s if old is None else old + alpha * (ttfb_s - old)
