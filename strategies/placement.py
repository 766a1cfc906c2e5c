"""Where every router would put a key: weighted rendezvous hashing with bounded loads.

Rendezvous (highest-random-weight) hashing ranks the services for a key by a
hash of (service, key); weighted, a service's chance of ranking first is its
share of the weights (Schindelhauer and Schomaker, 2005: the score is
``-weight / ln(u)`` for a uniform ``u`` drawn from the hash). The hash is the
same in every process, so two routers, or two workers, that have never
exchanged a byte rank a key's services alike, and a new conversation lands on
the same service whichever of them receives it. Removing a service moves only
the keys it held.

Bounded loads: the first service in that order whose requests in flight are
under its share of ``(1 + epsilon)`` times the total takes the key, so a hot
key, or a slow service, is passed over instead of overloaded. A ``slack`` of a
few requests over its share is always allowed: at the small totals of a lightly
loaded fleet, a bound of ``ceil(1.25 * 7 * 1/6) = 2`` requests would pass keys on
at every passing burst, and two replicas, which see each burst at different
moments, would pass them on differently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from strategies import service_load
from strategies.prompt import stable_hash

if TYPE_CHECKING:
    from lmproxy.fleet.roster import Service

_MASK = (1 << 64) - 1
_TOP = float(1 << 53)


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of a 64-bit int, the same in
    every process (unlike ``hash()`` of bytes)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


class Rendezvous:
    """Ranks services for a key; remembers each service URL's hash."""

    def __init__(self) -> None:
        self._url_hashes: dict[str, int] = {}

    def _url_hash(self, url: str) -> int:
        h = self._url_hashes.get(url)
        if h is None:
            if len(self._url_hashes) > 4096:  # membership churn: forget old services
                self._url_hashes.clear()
            h = self._url_hashes[url] = stable_hash(url.encode())
        return h

    def order(self, candidates: Sequence[Service], key: int) -> list[Service]:
        """``candidates`` from the key's first choice to its last."""
        scored = []
        for service in candidates:
            # Uniform in (0, 1): never 0 (log) and never 1 (a zero divisor).
            u = ((_mix(self._url_hash(service.url) ^ key) >> 11) + 1) / (_TOP + 2)
            weight = service.weight
            score = -weight / math.log(u) if weight > 0 else 0.0
            scored.append((score, service.url, service))
        scored.sort(key=lambda item: (-item[0], item[1]))
        return [service for _, _, service in scored]

    def choose(
        self, candidates: Sequence[Service], key: int, epsilon: float, slack: int = 0
    ) -> Service:
        """The key's first choice whose load is within its bound, or over its share by
        no more than ``slack`` requests."""
        # Loads and their total are the engines' (this router's exact count, plus the
        # other traffic each engine reported): every replica in front of the same engines
        # then sees about the same figures, and bounds a key's first choice alike. With
        # only its own requests in the total, a replica that serves half the traffic
        # would find every engine over a bound half as large as it should be.
        total = sum(service_load(s) for s in candidates) + 1  # including this request
        weights = sum(max(s.weight, 0) for s in candidates)
        ordered = _with_room(self.order(candidates, key))
        for service in ordered:
            share = max(service.weight, 0) / weights if weights else 1 / len(candidates)
            load = service_load(service)
            if load < math.ceil((1 + epsilon) * total * share) or load <= total * share + slack:
                return service
        return min(ordered, key=service_load)


def _with_room(ordered: list[Service]) -> list[Service]:
    """An engine that queues requests (a fresh scrape says its batch is full) is passed
    over while another has room: its queue may be behind long requests."""
    if any(s.engine_full for s in ordered) and not all(s.engine_full for s in ordered):
        return [s for s in ordered if not s.engine_full]
    return ordered
