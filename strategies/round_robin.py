"""Round-robin with one cursor per model.

One cursor per model, not one global counter: with a global counter, requests
for model A advance the cursor that model B's requests read, and interleaved
traffic skews toward whichever service happens to sit at the cursor's stride.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from strategies import BaseStrategy

if TYPE_CHECKING:
    from lmproxy.client.request import RouteRequest
    from lmproxy.fleet.roster import Service


class RoundRobin(BaseStrategy):
    summary = "each model's requests go to its healthy services in turn"

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        self._cursors: dict[str | None, int] = {}

    def choose(self, candidates: Sequence[Service], request: RouteRequest) -> Service:
        cursor = self._cursors.get(request.model, 0)
        self._cursors[request.model] = cursor + 1
        return candidates[cursor % len(candidates)]
