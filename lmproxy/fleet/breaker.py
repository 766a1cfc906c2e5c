"""A service's circuit breaker: consecutive failures take it out of routing for a while.

Passive ejection (``--max-errors``) keeps a service out until its next passing
health check, which is no help when the engine answers 500 to every request
while its health path still says 200. The breaker counts what the requests
themselves meet: a 500, 502, 503 or 504 answer, a connection that fails, a
broken or timed-out answer. It is the state machine sglang-router and envoy
use, kept apart from I/O (as h11 keeps its own) so every transition is tested
without a network (``tests/test_inproc.py``)::

    closed --(failure_threshold failures in a row)--> open
    open --(timeout_s later, the router's sweep)--> half-open
    half-open: one request at a time is let through (a trial)
    half-open --(success_threshold successes)--> closed
    half-open --(a failure)--> open (the timeout starts again)

A success is any answer but those 5xx and 429: a 4xx is the client's error and
says the service works. A 429 is "busy", neither a success nor a failure.
Open, or half-open with its trial under way, the service is not routable.

The registry owns one per service (``Service.breaker``) and turns its changes
into routing-list changes. The request path reads one flag of the service,
``Service.watched`` (an error streak, or a breaker not clean), and touches the
breaker only when it is set, or on a failure: a 200 from a healthy service
costs a status comparison and that flag.
"""

from __future__ import annotations

CLOSED = 0
OPEN = 1
HALF_OPEN = 2
# What /stats and /services say; /metrics has the number (smg's 0, 1, 2).
STATE_NAMES = ("closed", "open", "half-open")
WORSE = (0, 2, 1)  # by state: open is worse than half-open (the workers' summary)

# The answers that say the service failed, not the request: a breaker's failures (and
# retried elsewhere before any byte, with a 429, which is only "busy").
SERVER_ERRORS = frozenset({500, 502, 503, 504})

DEFAULT_FAILURE_THRESHOLD = 10  # sglang-router's defaults
DEFAULT_SUCCESS_THRESHOLD = 3
DEFAULT_TIMEOUT_S = 60.0


class Breaker:
    """One service's breaker. ``failure_threshold`` 0: never opens."""

    __slots__ = (
        "clean",
        "failure_threshold",
        "failures",
        "opened_at",
        "opened_total",
        "state",
        "success_threshold",
        "successes",
        "timeout_s",
        "trial",
    )

    def __init__(
        self,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        success_threshold: int = DEFAULT_SUCCESS_THRESHOLD,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.timeout_s = timeout_s
        self.state = CLOSED
        self.failures = 0  # in a row
        self.successes = 0  # in a row, while half-open
        self.opened_at = 0.0  # monotonic seconds
        self.opened_total = 0
        self.trial = False  # half-open: the one request let through is under way
        # Closed with no failure counted: a success has nothing to reset. The one
        # thing the request path reads after a success.
        self.clean = True

    @property
    def routable(self) -> bool:
        state = self.state
        return state == CLOSED or (state == HALF_OPEN and not self.trial)

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state]

    def configure(self, failure_threshold: int, success_threshold: int, timeout_s: float) -> bool:
        """New settings (a reload); whether the breaker closed (it was turned off)."""
        self.failure_threshold = failure_threshold
        self.success_threshold = success_threshold
        self.timeout_s = timeout_s
        if not failure_threshold and not self.clean:
            was = self.state
            self._close()
            return was != CLOSED
        return False

    def failed(self, now: float) -> bool:
        """A request failed by the service's fault; whether the breaker opened."""
        if not self.failure_threshold:
            return False
        state = self.state
        if state == OPEN:
            return False  # a request from before it opened: it is out already
        if state == HALF_OPEN:
            self._open(now)
            return True
        self.failures += 1
        self.clean = False
        if self.failures >= self.failure_threshold:
            self._open(now)
            return True
        return False

    def succeeded(self) -> bool:
        """The service answered well; whether the breaker closed."""
        state = self.state
        if state == CLOSED:
            self.failures = 0
            self.clean = True
            return False
        if state == HALF_OPEN:
            self.successes += 1
            if self.successes >= self.success_threshold:
                self._close()
                return True
        return False  # open: a late answer from before it opened proves nothing

    def due(self, now: float) -> bool:
        """Open for ``timeout_s``: it becomes half-open (the caller's sweep asks);
        whether it did."""
        if self.state == OPEN and now - self.opened_at >= self.timeout_s:
            self.state = HALF_OPEN
            self.successes = 0
            self.trial = False
            return True
        return False

    def begin_trial(self) -> bool:
        """A request was sent to the half-open service; whether that made it unroutable."""
        if self.state == HALF_OPEN and not self.trial:
            self.trial = True
            return True
        return False

    def end_trial(self) -> bool:
        """The trial request is over (its verdict, if any, comes next); whether that
        made the service routable again."""
        if self.trial:
            self.trial = False
            return self.state == HALF_OPEN
        return False

    def inherit(self, other: Breaker) -> None:
        """Be ``other``'s state (the same backend under a new name), with these settings."""
        self.state = other.state
        self.failures = other.failures
        self.successes = other.successes
        self.opened_at = other.opened_at
        self.opened_total = other.opened_total
        self.clean = other.clean
        self.trial = False

    def mirror(self, state: int, opened_total: int) -> None:
        """Show what the workers' breakers say (the supervisor's copy routes nothing)."""
        self.state = state
        self.opened_total = opened_total

    def _open(self, now: float) -> None:
        self.state = OPEN
        self.opened_at = now
        self.opened_total += 1
        self.failures = 0
        self.successes = 0
        self.trial = False
        self.clean = False

    def _close(self) -> None:
        self.state = CLOSED
        self.failures = 0
        self.successes = 0
        self.trial = False
        self.clean = True
