"""Routing strategies: the interface every strategy implements, and the loader.

A strategy picks one service among the healthy candidates for a request. The
router tells it when a request to a service starts, when its first byte arrives
and when it ends, so that it can keep whatever state it needs cheaply. The
services it sees are the router's live objects: read their figures
(``in_flight``, ``weight``, ``latency``...) but do not change them. A load-aware
strategy weighs ``service_load(service)``: the router's own requests in flight plus, while
a fresh scrape of the engine's /metrics says so, the requests the engine has from
elsewhere (``engine_extra``; see ``lmproxy/fleet/load.py``).

Strategies are found by name in the entry-point group ``lmproxy.strategies``
(the built-ins are registered there by lmproxy's own pyproject.toml, exactly as
a third-party package registers its own), or as ``module:Class``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lmproxy.client.request import RouteRequest
    from lmproxy.fleet.roster import Service

ENTRY_POINT_GROUP = "lmproxy.strategies"


def service_load(service: Service) -> int:
    """The service's load: the router's exact count, plus the engine's other traffic."""
    return service.in_flight + service.engine_extra


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

    def on_first_byte(self, service: Service, request: RouteRequest, ttfb_s: float) -> None:
        """The response head arrived ``ttfb_s`` seconds after the request was sent."""
        ...

    def on_end(self, service: Service, request: RouteRequest, latency_s: float, ok: bool) -> None:
        """The request ended after ``latency_s`` seconds; ``ok`` is False on failure."""
        ...


@runtime_checkable
class SharesState(Protocol):
    """A strategy whose learnt state the workers of one router share (``--workers``).

    The worker machinery sets ``sharing``, asks ``share()`` for what was learnt
    since the last call (JSON-able, bounded) about every 0.1 s, and hands what
    the other workers learnt to ``absorb``: the router then learns as one.
    """

    sharing: bool

    def share(self) -> list[Any]: ...

    def absorb(self, updates: list[Any]) -> None: ...


class Option:
    """One option a strategy takes: its type, default and a line of help."""

    __slots__ = ("default", "help", "kind")

    def __init__(self, kind: type, default: Any, help: str) -> None:
        self.kind = kind
        self.default = default
        self.help = help


class BaseStrategy:
    """Convenience base: declared, checked options and no-op notifications.

    Subclasses list their options in ``OPTIONS``; ``self.opt`` then holds every
    option converted to its type, defaults filled in. An unknown option or a
    value of the wrong type stops start-up with a message that lists them all.
    """

    #: One line for ``--list-strategies``.
    summary = ""
    OPTIONS: ClassVar[dict[str, Option]] = {}

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.opt = parse_options(type(self).__name__, self.OPTIONS, options or {})

    def choose(self, candidates: Sequence[Service], request: RouteRequest) -> Service:
        raise NotImplementedError

    def on_start(self, service: Service, request: RouteRequest) -> None:
        pass

    def on_first_byte(self, service: Service, request: RouteRequest, ttfb_s: float) -> None:
        pass

    def on_end(self, service: Service, request: RouteRequest, latency_s: float, ok: bool) -> None:
        pass


def parse_options(
    owner: str, spec: Mapping[str, Option], given: Mapping[str, Any]
) -> dict[str, Any]:
    """Check ``given`` against ``spec``; return every option with its typed value."""
    described = (
        "; ".join(
            f"{name} ({o.kind.__name__}, default {o.default}): {o.help}" for name, o in spec.items()
        )
        or "none"
    )
    values = {name: o.default for name, o in spec.items()}
    for name, raw in given.items():
        option = spec.get(name)
        if option is None:
            raise StrategyError(f"{owner}: unknown option {name!r}; its options: {described}")
        try:
            if option.kind is bool and isinstance(raw, str):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("true", "1", "yes")
            else:
                value = option.kind(raw)
        except (TypeError, ValueError):
            raise StrategyError(
                f"{owner}: option {name}={raw!r} is not a {option.kind.__name__}"
            ) from None
        values[name] = value
    return values


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


def load(name: str, options: Mapping[str, Any] | None = None) -> Strategy:
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
