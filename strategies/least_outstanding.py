"""Fewest requests in flight, ties broken round-robin.

In-flight counts see what latency averages miss: a service busy with a few long
generations is busy now, however fast its last answers were.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from strategies import BaseStrategy

if TYPE_CHECKING:
    from lmproxy.client.request import RouteRequest
    from lmproxy.fleet.roster import Service


class LeastOutstanding(BaseStrategy):
    summary = "the service with the fewest requests in flight; ties in turn"

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        self._cursor = 0

    def choose(self, candidates: Sequence[Service], request: RouteRequest) -> Service:
        n = len(candidates)
        start = self._cursor % n
        self._cursor += 1
        best = candidates[start]
        for i in range(1, n):
            service = candidates[(start + i) % n]
            if service.in_flight + service.engine_extra < best.in_flight + best.engine_extra:
                best = service
        return best
