"""Smooth weighted round-robin, as nginx does it.

Every choice adds each candidate's weight to its running score, picks the
highest score and takes the total weight off the winner. The sequence repeats
every sum(weights) requests, and within any window of that length each
service is chosen exactly its weight times, interleaved rather than in bursts
(weights 5,1,1 give a a b a c a a, not a a a a a b c).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from strategies import BaseStrategy

if TYPE_CHECKING:
    from lmproxy.client.request import RouteRequest
    from lmproxy.fleet.roster import Service


class Weighted(BaseStrategy):
    summary = "smooth weighted round-robin: each service gets exactly its share of weight"

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        # Scores per model, reset whenever the set of candidates changes.
        self._scores: dict[str | None, tuple[tuple[str, ...], list[int]]] = {}

    def choose(self, candidates: Sequence[Service], request: RouteRequest) -> Service:
        names = tuple(s.name for s in candidates)
        state = self._scores.get(request.model)
        if state is None or state[0] != names:
            state = (names, [0] * len(candidates))
            self._scores[request.model] = state
        scores = state[1]
        total = 0
        best = -1
        for i, service in enumerate(candidates):
            weight = service.weight
            total += weight
            scores[i] += weight
            if weight and (best < 0 or scores[i] > scores[best]):
                best = i
        if best < 0:  # every weight is 0: treat them as equal
            best = min(range(len(candidates)), key=scores.__getitem__)
            scores[best] += 1
            return candidates[best]
        scores[best] -= total
        return candidates[best]
