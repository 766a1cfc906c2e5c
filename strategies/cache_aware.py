"""Cache-aware routing: send a prompt where its prefix is most likely cached.

Each service gets an approximate prefix tree of the prompts recently sent to
it: the chained hashes of the prompt's prefixes at fixed lengths (see
``prompt.block_hashes``) in an LRU map of bounded size. A request goes to the
service whose tree holds the longest of its prefixes.

It avoids the known failure modes of the Rust routers' default policy:

- a miss goes to the least-loaded service, ties in turn, never "the first
  service" and never "the emptiest tree" whatever its load;
- a cache hit yields to load when the preferred service is busier than the
  least-loaded one by more than ``balance_abs`` requests in flight *and* by a
  factor of more than ``balance_rel``, so one service is not saturated while
  the others idle. The default of 8 (a batch's worth) is high on purpose: a
  conversation that moves is prefilled again in full where it lands, and a
  router that moves conversations at every passing burst loses more to those
  prefills than it gains in balance (``bench.routing``: 4 moved 10 of 47
  conversations and cost two points of hit rate);
- memory is bounded: at most ``max_entries`` prefix hashes per service, least
  recently used evicted first; work is bounded too: only the first
  ``max_prefix_bytes`` of a prompt are hashed.

A miss goes where every router would send it, not to whichever service one
router happens to see least loaded: the request's session, else its
conversation's opening, is placed by weighted rendezvous hashing with bounded
loads (``placement.py``; a service takes up to ``slack`` requests over its share
before it passes a key on). Replicas that never talk to each other, and workers
between two exchanges of what they learnt, then put a new conversation on the
same service and learn the same trees. A prompt shorter than one block (nothing
to cache), or with no key to place it by, goes to the least-loaded service.

With ``--workers``, the workers share what they learn (``share``/``absorb``:
the prefixes each request added, batched through the supervisor), so the
router's trees are one view however many processes serve it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from strategies import BaseStrategy, Option, service_load
from strategies.least_outstanding import LeastOutstanding
from strategies.placement import Rendezvous
from strategies.prompt import block_hashes, opening_key, prompt_bytes, session_key, stable_hash

if TYPE_CHECKING:
    from lmproxy.client.request import RouteRequest
    from lmproxy.fleet.roster import Service


# Prefix lists a worker keeps for the others between two exchanges (about 0.1 s): past
# it, what is learnt stays local until the next one.
MAX_OUTBOX = 4096


class CacheAware(BaseStrategy):
    summary = "longest cached prompt prefix, yielding to load under imbalance"
    OPTIONS = {
        "block_bytes": Option(int, 256, "finest prefix-tree granularity, in prompt bytes"),
        "max_prefix_bytes": Option(int, 65536, "bytes of a prompt's opening considered"),
        "max_entries": Option(int, 100_000, "prefixes remembered per service (LRU)"),
        "min_match": Option(float, 0.1, "fraction of a prompt's prefixes that makes a hit"),
        "balance_abs": Option(int, 8, "in-flight excess over the least loaded that may yield"),
        "balance_rel": Option(float, 1.5, "in-flight ratio over the least loaded that may yield"),
        "miss": Option(str, "rendezvous", "where a miss goes: rendezvous or least-loaded"),
        "epsilon": Option(float, 0.25, "a miss's service takes at most (1+epsilon) x its share"),
        "prefix_messages": Option(int, 2, "messages of a conversation's opening that place it"),
        "slack": Option(int, 8, "requests over its share a miss's service takes before passing"),
    }

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        if self.opt["block_bytes"] < 1 or self.opt["max_prefix_bytes"] < self.opt["block_bytes"]:
            raise ValueError("block_bytes must be >= 1 and max_prefix_bytes >= block_bytes")
        if self.opt["miss"] not in ("rendezvous", "least-loaded"):
            raise ValueError("miss must be rendezvous or least-loaded")
        if self.opt["epsilon"] <= 0:
            raise ValueError("epsilon must be > 0")
        self._trees: dict[str, OrderedDict[int, None]] = {}
        # Hits that yield, and prompts with nothing to place them by, are balanced
        # exactly as least-outstanding does.
        self._balance = LeastOutstanding()
        self._placement = Rendezvous() if self.opt["miss"] == "rendezvous" else None
        # Set by the worker machinery when other workers want what this one learns.
        self.sharing = False
        self._outbox: list[tuple[str, list[int]]] = []

    def match(self, service: Service, hashes: list[int]) -> int:
        """How many leading blocks of the prompt the service has seen."""
        tree = self._trees.get(service.url)
        if not tree:
            return 0
        matched = 0
        for h in hashes:
            if h not in tree:
                break
            matched += 1
        return matched

    def choose(self, candidates: Sequence[Service], request: RouteRequest) -> Service:
        hashes = block_hashes(
            prompt_bytes(request), self.opt["block_bytes"], self.opt["max_prefix_bytes"]
        )
        request.memo = hashes
        if len(candidates) == 1:
            return candidates[0]
        least = self._balance.choose(candidates, request)
        if not hashes:
            # Under one block: nothing worth caching, so nothing to place alike; spreading
            # by load keeps identical small requests from piling onto one service.
            return least
        best, best_match = least, 0
        for service in candidates:
            matched = self.match(service, hashes)
            if matched > best_match or (
                matched == best_match and matched and service_load(service) < service_load(best)
            ):
                best, best_match = service, matched
        if best_match < self.opt["min_match"] * len(hashes):
            return self._miss(candidates, request, least)
        best_load, least_load = service_load(best), service_load(least)
        over_abs = best_load - least_load > self.opt["balance_abs"]
        if over_abs and best_load > self.opt["balance_rel"] * max(least_load, 1):
            return least
        return best

    def _miss(
        self, candidates: Sequence[Service], request: RouteRequest, least: Service
    ) -> Service:
        """Where a prompt no tree holds goes: the same service from every router."""
        if self._placement is None:
            return least
        key = session_key(request) or opening_key(
            request, self.opt["prefix_messages"], self.opt["max_prefix_bytes"]
        )
        if not key:
            return least
        return self._placement.choose(
            candidates, stable_hash(key), self.opt["epsilon"], self.opt["slack"]
        )

    def on_start(self, service: Service, request: RouteRequest) -> None:
        hashes = request.memo
        if not isinstance(hashes, list) or not hashes:
            return
        tree = self._trees.get(service.url)
        if tree is None:
            tree = self._trees[service.url] = OrderedDict()
        if self.sharing:
            new = [h for h in hashes if h not in tree]
            if new and len(self._outbox) < MAX_OUTBOX:
                self._outbox.append((service.url, new))
        self._learn(tree, hashes)

    def _learn(self, tree: OrderedDict[int, None], hashes: list[int]) -> None:
        for h in hashes:
            tree[h] = None
            tree.move_to_end(h)
        limit = self.opt["max_entries"]
        while len(tree) > limit:
            tree.popitem(last=False)

    # --- shared with the other workers (strategies.SharesState) ------------------------

    def share(self) -> list[Any]:
        """The prefixes learnt since the last call: ``[[service url, [hashes]], ...]``."""
        out, self._outbox = self._outbox, []
        return [[url, hashes] for url, hashes in out]

    def absorb(self, updates: list[Any]) -> None:
        """What other workers learnt: their requests' prefixes, as if sent from here."""
        for url, hashes in updates:
            tree = self._trees.get(url)
            if tree is None:
                tree = self._trees[url] = OrderedDict()
            self._learn(tree, hashes)
