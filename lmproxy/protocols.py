"""What each side needs of the others: narrow interfaces instead of the whole Router.

The modules that do one job (the endpoints, the proxy, admission control, the
client side) are handed objects typed by these Protocols, never by the class
that happens to implement them, so none of them imports ``app.py`` and the
import graph of ``lmproxy/`` has no circle, type-only imports counted
(``tests/test_structure.py`` checks it). ``upstream.Sink`` is the same idea for
the backend side; the client connection's view of the router is
``server.ClientHost``, beside the connection it types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncio

    import strategies
    from lmproxy.config import Config
    from lmproxy.errors import ProxyError
    from lmproxy.fleet.roster import Roster, Service
    from lmproxy.keys.limits import Limits
    from lmproxy.telemetry.metrics import Metrics
    from lmproxy.telemetry.tracing import Exporter


class Discovery(Protocol):
    """The fleet (``fleet.Fleet``), as the router's own endpoints read it."""

    def status(self) -> dict[str, Any]:
        """Its sources' fields in /stats."""
        ...


class RouterState(Protocol):
    """What the router's own endpoints (``api.py``) read: a Router, or the supervisor."""

    @property
    def fleet(self) -> Discovery | None:
        """None in a worker: the supervisor holds the fleet."""
        ...

    @property
    def roster(self) -> Roster: ...

    @property
    def draining(self) -> bool: ...

    @property
    def queue_length(self) -> int: ...

    @property
    def config(self) -> Config: ...

    def pd_counts(self) -> dict[str, dict[str, int]]:
        """Steps of disaggregated requests: {role: {outcome: count}}."""
        ...

    def key_counts(self) -> dict[str, dict[str, Any]]:
        """Per [[keys]] name: requests, tokens, refusals by reason."""
        ...

    def connection_figures(self) -> dict[str, Any]:
        """Client connections held, TLS handshakes among them, the limits, refusals."""
        ...


class ProxyHost(Protocol):
    """What a proxied request (``journey.Journey``) needs of the router."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def config(self) -> Config: ...

    @property
    def roster(self) -> Roster: ...

    @property
    def admission(self) -> Admission: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def strategy(self) -> strategies.Strategy: ...

    @property
    def via_line(self) -> bytes: ...

    @property
    def tracer(self) -> Exporter | None:
        """The OTLP exporter (--otlp-endpoint), or None: trace context only."""
        ...

    @property
    def policies(self) -> bool:
        """Whether any alias, fallback or [[keys]] key is configured (else the request
        path skips them)."""
        ...

    @property
    def model_policies(self) -> bool:
        """Whether any alias or fallback is configured."""
        ...

    @property
    def limits(self) -> Limits:
        """Where a [[keys]] key's limits are checked (limits.py)."""
        ...

    def strategy_for(self, model: str | None) -> strategies.Strategy: ...

    @property
    def prefill_strategy(self) -> strategies.Strategy: ...

    @property
    def decode_strategy(self) -> strategies.Strategy: ...

    def pd_mode(self, model: str) -> str:
        """How a disaggregated model's engines split a request: "vllm" or "sglang"."""
        ...

    def next_request_id(self) -> bytes: ...


class Admission(Protocol):
    """Admission control (``admission.AdmissionQueue``) as a request meets it."""

    @property
    def limited(self) -> bool: ...

    def admit(self, journey: Waiter, candidates: list[Service]) -> list[Service] | None: ...

    def full(self) -> bool:
        """Whether the router-wide --max-concurrent-requests is reached."""
        ...

    def leave(self, journey: Waiter) -> None: ...


class Underway(Protocol):
    """What a client connection (and the router's sweep) drives of what answers its
    current request (a ``journey.Journey``, or a task answering for the whole router)."""

    def cancel(self) -> None:
        """The client hung up."""
        ...

    def pause(self) -> None:
        """The client is not reading: stop reading what is relayed to it."""
        ...

    def resume(self) -> None: ...

    def check_timeout(self, now: float) -> None: ...


class QueuedClient(Protocol):
    """A client connection as admission control sees it."""

    @property
    def closing(self) -> bool: ...


class Waiter(Protocol):
    """A request waiting in the admission queue (``journey.Journey``)."""

    queued: bool  # set and cleared by admission.py alone
    queued_at: float
    priority: int  # higher is served first, and shed last

    @property
    def client(self) -> QueuedClient: ...

    @property
    def last_candidates(self) -> list[Service]: ...

    def may_start(self) -> bool: ...

    def attempt(self) -> None: ...

    def fail(self, error: ProxyError) -> None: ...

    def shed(self, error: ProxyError) -> None:
        """Refused from a full queue: ``fail``, counted as shed."""
        ...

    def crash(self, exc: Exception) -> None:
        """Code run for it raised: it ends (502), its slots returned."""
        ...
