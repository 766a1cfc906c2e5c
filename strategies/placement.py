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
key, or a slow service, is passed over instead of overloaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from strategies import service_load
from strategies.prompt import stable_hash

if TYPE_CHECKING:
    from lmproxy.registry import Service

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

    def choose(self, candidates: Sequence[Service], key: int, epsilon: float) -> Service:
        """The key's first choice whose load is within its bound."""
        # The bound is a share of this router's own requests (exact), and each service's
        # load is weighed against it with the engine's other traffic added: an engine
        # busy with work from elsewhere cannot raise its own bound.
        total = sum(s.in_flight for s in candidates) + 1  # including this request
        weights = sum(max(s.weight, 0) for s in candidates)
        ordered = self.order(candidates, key)
        # An engine that queues requests (a fresh scrape says its batch is full) is
        # passed over while another has room: its queue may be behind long requests.
        if any(s.engine_full for s in ordered) and not all(s.engine_full for s in ordered):
            ordered = [s for s in ordered if not s.engine_full]
        for service in ordered:
            share = max(service.weight, 0) / weights if weights else 1 / len(candidates)
            if service_load(service) < math.ceil((1 + epsilon) * total * share):
                return service
        return min(ordered, key=service_load)
