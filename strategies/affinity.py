"""Session affinity by consistent hashing with bounded loads.

The key is the request's session (``X-Session-ID``, else ``user``, else
``prompt_cache_key``), else its conversation's opening (system prompt and
first messages): the turns of one conversation share it, so they land where
their prefix is cached.

Keys and services sit on a hash ring (``vnodes`` points per service, hashed
from the service URL with a process-independent hash): adding or removing one
of N services moves only about 1/N of the keys, and two router processes with
the same services send the same key to the same service with no shared state.

Bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018): a service already
holding ceil((1 + epsilon) * mean) requests in flight is passed over for the
next one clockwise, so a hot key cannot overload one service.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from strategies import BaseStrategy, Option
from strategies.prompt import opening_key, session_key, stable_hash

if TYPE_CHECKING:
    from lmproxy.client.request import RouteRequest
    from lmproxy.fleet.roster import Service


class Ring:
    """Points of a consistent-hash ring for one set of services."""

    def __init__(self, urls: Sequence[str], vnodes: int) -> None:
        points = sorted(
            (stable_hash(f"{url}#{v}".encode()), index)
            for index, url in enumerate(urls)
            for v in range(vnodes)
        )
        self.hashes = [h for h, _ in points]
        self.owners = [i for _, i in points]

    def walk(self, key_hash: int) -> list[int]:
        """Service indexes in ring order from the key's position, each once."""
        start = bisect.bisect(self.hashes, key_hash)
        seen: dict[int, None] = {}
        n = len(self.owners)
        for step in range(n):
            seen.setdefault(self.owners[(start + step) % n], None)
        return list(seen)


class Affinity(BaseStrategy):
    summary = "consistent hashing of the session or prompt opening, with bounded loads"
    OPTIONS = {
        "epsilon": Option(float, 0.25, "a service takes at most (1+epsilon) x the mean load"),
        "vnodes": Option(int, 160, "ring points per service"),
        "prefix_messages": Option(int, 2, "messages of a conversation's opening in the key"),
        "prefix_bytes": Option(int, 4096, "bytes of a prompt's opening in the key"),
    }

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        if self.opt["epsilon"] <= 0:
            raise ValueError("epsilon must be > 0")
        if self.opt["vnodes"] < 1:
            raise ValueError("vnodes must be >= 1")
        self._rings: dict[tuple[str, ...], Ring] = {}

    def ring(self, candidates: Sequence[Service]) -> Ring:
        urls = tuple(s.url for s in candidates)
        ring = self._rings.get(urls)
        if ring is None:
            if len(self._rings) > 64:  # membership churn: forget old rings
                self._rings.clear()
            ring = self._rings[urls] = Ring(urls, self.opt["vnodes"])
        return ring

    def key(self, request: RouteRequest) -> bytes:
        return session_key(request) or opening_key(
            request, self.opt["prefix_messages"], self.opt["prefix_bytes"]
        )

    def choose(self, candidates: Sequence[Service], request: RouteRequest) -> Service:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        key = self.key(request)
        if not key:  # nothing to be sticky about: spread by load
            return min(candidates, key=lambda s: s.in_flight)
        total = sum(s.in_flight for s in candidates) + 1  # including this request
        capacity = math.ceil((1 + self.opt["epsilon"]) * total / n)
        order = self.ring(candidates).walk(stable_hash(key))
        for index in order:
            if candidates[index].in_flight < capacity:
                return candidates[index]
        return candidates[order[0]]  # unreachable: some service is below the mean
