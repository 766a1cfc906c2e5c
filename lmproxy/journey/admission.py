"""Admission control: per-service ``max_in_flight`` and the queue in front of it.

A request whose every eligible service is at its limit waits here for a slot
on any of them: higher priorities first (a ``[[keys]]`` key's, or its
``X-Priority``), in arrival order within one priority. A slot frees when a request on a limited
service ends, or when the fleet changes (a service comes back or is added);
then the queue is walked from its head and each waiting request whose
candidates include a free service goes on. One that waits ``--queue-timeout``
seconds gets 429 with ``Retry-After``. The router's sweep enforces the timeout,
so a waiting request costs no timer. With ``--max-queue`` N, a request that finds
N waiting sheds the lowest priority among them and itself (of equals, the newest:
itself), with 429.

With ``--max-concurrent-requests`` N, the whole router holds at most N requests
on services at once (sglang-router's limit): past it a request waits in the same
queue, and the same ``--max-queue`` bounds it (429 when full, as theirs answers
``--queue-size``). One that waits ``--queue-timeout`` for the router's limit gets
408, as theirs does; one that waited for a service's ``max_in_flight``, 429. The
limit caps each service's (``Roster.router_limit``), so a release wakes the
queue as a limited service's does. A request holds its place from the choice of
a service to its end (a retry's next choice is its own); a disaggregated
request holds one for each step under way. With ``--workers``, each worker has
its share.

Services without a limit never queue a request, and while no service has one
the request path pays a single attribute check.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from typing import TYPE_CHECKING

from lmproxy.errors import Fault, ProxyError

if TYPE_CHECKING:
    from lmproxy.fleet.roster import Roster, Service
    from lmproxy.protocols import Waiter

MAX_RETRY_AFTER_S = 60


def has_room(service: Service) -> bool:
    return not service.max_in_flight or service.local_in_flight < service.max_in_flight


class AdmissionQueue:
    def __init__(
        self,
        roster: Roster,
        timeout_s: float,
        max_queue: int = 0,
        max_concurrent: int = 0,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.roster = roster
        self.timeout_s = timeout_s
        self.max_queue = max_queue  # 0: no limit
        self.max_concurrent = max_concurrent  # this process's share of the router's; 0: none
        self.waiting: deque[Waiter] = deque()
        # Whether any service has a limit; the request path checks only this.
        self.limited = False
        self._waking = False
        self._wake_soon = False
        roster.listeners.append(self._fleet_changed)
        roster.on_slot_freed = self.slot_freed

    def __len__(self) -> int:
        return len(self.waiting)

    def under_way(self) -> int:
        """Requests this process holds on services (``--max-concurrent-requests`` counts
        them): read only while the limit is set, so the request path keeps no count."""
        return sum(s.local_in_flight for s in self.roster.services.values())

    def full(self) -> bool:
        """Whether the router-wide limit is reached."""
        return bool(self.max_concurrent) and self.under_way() >= self.max_concurrent

    def admit(self, journey: Waiter, candidates: list[Service]) -> list[Service] | None:
        """The candidates with room, or None after queueing ``journey`` (or refusing it)."""
        open_ = [] if self.full() else [s for s in candidates if has_room(s)]
        if open_:
            return open_
        if self.timeout_s <= 0:
            journey.fail(self._full_error(candidates, 0.0))
            return None
        waiting = self.waiting
        if self.max_queue and len(waiting) >= self.max_queue and not self._make_room(journey):
            self._shed(journey, candidates)
            return None
        journey.queued_at = self.loop.time()
        journey.queued = True
        if not waiting or waiting[-1].priority >= journey.priority:
            waiting.append(journey)  # the common case: one priority, arrival order
        else:
            self._insert(journey)
        return None

    def _make_room(self, journey: Waiter) -> bool:
        """The queue is full: whether ``journey`` may have the place of the lowest
        request waiting, which is then shed."""
        lowest = self.waiting[-1]  # the lowest priority, and the newest of it
        if lowest.priority >= journey.priority:
            return False
        self._take(lowest)
        self._shed(lowest, lowest.last_candidates)
        return True

    def _insert(self, journey: Waiter) -> None:
        """Behind every request of its priority or higher, before the lower ones."""
        waiting = self.waiting
        index = next(i for i, other in enumerate(waiting) if other.priority < journey.priority)
        waiting.insert(index, journey)

    def _shed(self, journey: Waiter, candidates: list[Service]) -> None:
        error = self._full_error(candidates, 0.0)
        error.fault = Fault.QUEUE_FULL
        error.message = (
            f"the admission queue is full ({self.max_queue} waiting, --max-queue or "
            "--queue-size) and this "
            f"request's priority ({journey.priority}) is the lowest of them; retry after the "
            "Retry-After seconds"
        )
        journey.shed(error)

    def leave(self, journey: Waiter) -> None:
        """The client hung up, or the request crashed: it leaves the queue."""
        if journey.queued:
            journey.queued = False
            with contextlib.suppress(ValueError):
                self.waiting.remove(journey)

    def slot_freed(self) -> None:
        """A limited service freed a slot (``Service.release``). Waiting requests are
        started on the next turn of the loop, after whatever the finished request does
        next (answer, retry) has taken its own share."""
        if self.waiting and not self._wake_soon:
            self._wake_soon = True
            self.loop.call_soon(self.wake)

    def wake(self) -> None:
        """Start, in order, every waiting request that a free slot can take."""
        self._wake_soon = False
        if self._waking:  # a started request may free or fill slots re-entrantly
            return
        self._waking = True
        try:
            for journey in list(self.waiting):
                healthy = self.roster.healthy()
                if (healthy and not any(has_room(s) for s in healthy)) or self.full():
                    break
                if journey.client.closing:
                    self._take(journey)
                elif journey.may_start():
                    self._take(journey)
                    try:
                        journey.attempt()
                    except Exception as exc:  # its strategy raised: that request ends
                        journey.crash(exc)
        finally:
            self._waking = False

    def expire(self, now: float) -> None:
        """From the router's sweep: answer 429 (408 for the router-wide limit) to requests
        that waited too long (in priority order, the oldest is not always first)."""
        late = [j for j in self.waiting if now - j.queued_at >= self.timeout_s]
        for journey in late:
            self._take(journey)
            if not journey.client.closing:
                try:  # a fallback model may be tried, and its strategy raise
                    journey.fail(self._full_error(journey.last_candidates, now - journey.queued_at))
                except Exception as exc:
                    journey.crash(exc)

    def _take(self, journey: Waiter) -> None:
        """Out of the queue; only here (and in ``admit``, ``leave``) is ``queued``
        written."""
        self.waiting.remove(journey)
        journey.queued = False

    def _full_error(self, candidates: list[Service], waited_s: float) -> ProxyError:
        # The router's limit, not the services': full now, or the services had room.
        if self.max_concurrent and (self.full() or any(has_room(s) for s in candidates)):
            return self._router_full_error(candidates, waited_s)
        names = ", ".join(f"{s.name} ({s.max_in_flight})" for s in candidates)
        error = ProxyError(
            Fault.QUEUE_TIMEOUT,
            f"every service for this request is at its max_in_flight ({names})"
            + (f"; waited {waited_s:.1f}s (--queue-timeout)" if waited_s else "")
            + "; retry after the Retry-After seconds",
        )
        error.retry_after = _retry_after(candidates)
        return error

    def _router_full_error(self, candidates: list[Service], waited_s: float) -> ProxyError:
        """The router-wide limit's refusal: 408 once it was waited for, as sglang-router
        answers; 429 when there was no wait (--queue-timeout 0: no queue)."""
        limit = self.max_concurrent
        error = ProxyError(
            Fault.CONCURRENCY_TIMEOUT if waited_s else Fault.QUEUE_TIMEOUT,
            f"the router has {limit} requests under way, its limit (--max-concurrent-requests)"
            + (f"; waited {waited_s:.1f}s (--queue-timeout)" if waited_s else "")
            + "; retry after the Retry-After seconds",
        )
        error.retry_after = _retry_after(candidates)
        return error

    def _fleet_changed(self) -> None:
        # A router-wide limit caps every service's, so it is among these.
        self.limited = any(s.max_in_flight for s in self.roster.services.values())
        if self.waiting:
            # Not inline: the registry may be mid-update.
            self.loop.call_soon(self.wake)


def _retry_after(candidates: list[Service]) -> int:
    """Seconds until about one request on these services has finished."""
    latencies = [s.mean_latency_s for s in candidates if s.latencies]
    mean = sum(latencies) / len(latencies) if latencies else 1.0
    return min(MAX_RETRY_AFTER_S, max(1, math.ceil(mean)))
