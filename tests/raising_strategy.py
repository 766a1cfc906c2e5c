"""A strategy plugin that raises where it is told to: the hook the supervision tests
use to inject an exception at each point where the router calls a strategy (loaded as
``raising_strategy:Raising``, the way a third-party plugin is)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from strategies import BaseStrategy, Option

if TYPE_CHECKING:
    from lmproxy.client.request import RouteRequest
    from lmproxy.fleet.roster import Service


class PluginBug(Exception):
    """What the plugin raises: its message names the method."""


class Raising(BaseStrategy):
    """First candidate; ``raise_in`` (choose, on_start, on_first_byte, on_end, share)
    raises for the first ``times`` calls of that method, then behaves. It shares its
    (empty) state with the other workers, so ``--workers`` calls ``share``."""

    sharing = False

    OPTIONS: ClassVar[dict[str, Option]] = {
        "raise_in": Option(str, "", "the method that raises"),
        "times": Option(int, 1, "how many of its calls raise"),
    }

    def __init__(self, options: dict[str, object] | None = None) -> None:
        super().__init__(options)
        self.left = self.opt["times"]

    def _maybe_raise(self, method: str) -> None:
        if self.opt["raise_in"] == method and self.left > 0:
            self.left -= 1
            raise PluginBug(f"the plugin's {method} failed")

    def choose(self, candidates: Sequence[Service], request: RouteRequest) -> Service:
        self._maybe_raise("choose")
        return candidates[0]

    def on_start(self, service: Service, request: RouteRequest) -> None:
        self._maybe_raise("on_start")

    def on_first_byte(self, service: Service, request: RouteRequest, ttfb_s: float) -> None:
        self._maybe_raise("on_first_byte")

    def on_end(self, service: Service, request: RouteRequest, latency_s: float, ok: bool) -> None:
        self._maybe_raise("on_end")

    def share(self) -> list[Any]:
        self._maybe_raise("share")
        return []

    def absorb(self, updates: list[Any]) -> None:
        pass
