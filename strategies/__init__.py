"""Routing strategies: the interface every strategy implements, and the loader.

A strategy picks one service among the healthy candidates for a request. The
router tells it when a request to a service starts, when its first byte arrives
and when it ends, so that it can keep whatever state it needs cheaply. The
services it sees are the router's live objects: read their figures
(``in_flight``, ``weight``, ``latency``...) but do not change them.

Strategies are found by name in the entry-point group ``lmproxy.strategies``
(the built-ins are registered there by lmproxy's own pyproject.toml, exactly as
a third-party package registers its own), or as ``module:Class``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lmproxy.registry import Service
    from lmproxy.request import RouteRequest

ENTRY_POINT_GROUP = "lmproxy.strategies"


class StrategyError(Exception):
    """A strategy could not be found or configured; the message says what to change."""


@runtime_checkable
class Strategy(Protocol):
    """What the router asks of a routing strategy."""

    def choose(self, candidates: Sequence[Service], request: RouteRequest) -> Service:
        """Pick one of ``candidates`` (never empty; all healthy, all serving the model)."""
        ...

    def on_start(self, service: Service, request: RouteRequest) -> None:
        """A request was sent to ``service``."""
        ...

    def on_first_byte(self, service: Service, ttfb_s: float) -> None:
        """The response head arrived ``ttfb_s`` seconds after the request was sent."""
        ...

    def on_end(self, service: Service, latency_s: float, ok: bool) -> None:
        """The request ended after ``latency_s`` seconds; ``ok`` is False on failure."""
        ...


class BaseStrategy:
    """Convenience base: options as a mapping, no-op notifications."""

    #: One line for ``--list-strategies``.
    summary = ""

    def __init__(self, options: Mapping[str, str] | None = None) -> None:
        self.options = dict(options or {})
        if self.options:
            raise StrategyError(
                f"strategy {type(self).__name__} takes no options, got "
                f"{', '.join(sorted(self.options))}"
            )

    def choose(self, candidates: Sequence[Service], request: RouteRequest) -> Service:
        raise NotImplementedError

    def on_start(self, service: Service, request: RouteRequest) -> None:
        pass

    def on_first_byte(self, service: Service, ttfb_s: float) -> None:
        pass

    def on_end(self, service: Service, latency_s: float, ok: bool) -> None:
        pass


def available() -> dict[str, str]:
    """Names registered in the entry-point group, with each one's summary line."""
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            summary = getattr(ep.load(), "summary", "") or ""
        except Exception as exc:  # a broken third-party plugin must not hide the others
            summary = f"(fails to load: {exc})"
        found[ep.name] = summary
    return dict(sorted(found.items()))


def load(name: str, options: Mapping[str, str] | None = None) -> Strategy:
    """Instantiate the strategy called ``name`` (entry-point name or ``module:Class``)."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise StrategyError(f"cannot load strategy {name!r}: {exc}") from None
    else:
        matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not matches:
            names = ", ".join(available()) or "none installed"
            raise StrategyError(
                f"unknown strategy {name!r}; available: {names} (or give module:Class)"
            )
        factory = matches[0].load()
    try:
        strategy = factory(options or {})
    except StrategyError:
        raise
    except (TypeError, ValueError) as exc:
        raise StrategyError(f"strategy {name!r}: {exc}") from None
    if not isinstance(strategy, Strategy):
        raise StrategyError(
            f"{name!r} is not a strategy: it needs choose, on_start, on_first_byte and on_end"
        )
    return strategy
