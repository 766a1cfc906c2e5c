"""Power of two choices: two random candidates, the one with fewer in flight.

Nearly as well balanced as least-outstanding, but without every router (or
worker) herding onto the same momentarily idle service.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from strategies import BaseStrategy, Option

if TYPE_CHECKING:
    from lmproxy.client.request import RouteRequest
    from lmproxy.fleet.roster import Service


class PowerOfTwo(BaseStrategy):
    summary = "two random services, the one with fewer requests in flight"
    OPTIONS = {"seed": Option(int, -1, "random seed, for reproducible runs (-1: random)")}

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        seed = self.opt["seed"]
        self._random = random.Random(None if seed < 0 else seed)

    def choose(self, candidates: Sequence[Service], request: RouteRequest) -> Service:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._random.sample(range(len(candidates)), 2)
        first, second = candidates[a], candidates[b]
        first_load = first.in_flight + first.engine_extra
        return first if first_load <= second.in_flight + second.engine_extra else second
