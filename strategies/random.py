"""Uniformly random: each request to any healthy candidate, with equal chance.

The Rust routers' ``random`` policy. It keeps no state and reads no figures, so
it cannot herd (every router and worker choosing the same momentarily idle
service), and over many requests each service gets its share; but it ignores
load and cached prefixes, which the other strategies weigh.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from strategies import BaseStrategy, Option

if TYPE_CHECKING:
    from lmproxy.client.request import RouteRequest
    from lmproxy.fleet.roster import Service


class Random(BaseStrategy):
    summary = "each request to a healthy service picked at random, uniformly"
    OPTIONS = {"seed": Option(int, -1, "random seed, for reproducible runs (-1: random)")}

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        seed = self.opt["seed"]
        self._random = random.Random(None if seed < 0 else seed)

    def choose(self, candidates: Sequence[Service], request: RouteRequest) -> Service:
        return candidates[self._random.randrange(len(candidates))]
