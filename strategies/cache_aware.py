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
  the others idle;
- memory is bounded: at most ``max_entries`` prefix hashes per service, least
  recently used evicted first; work is bounded too: only the first
  ``max_prefix_bytes`` of a prompt are hashed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from strategies import BaseStrategy, Option
from strategies.least_outstanding import LeastOutstanding
from strategies.prompt import block_hashes, prompt_bytes

if TYPE_CHECKING:
    from lmproxy.registry import Service
    from lmproxy.request import RouteRequest


class CacheAware(BaseStrategy):
    summary = "longest cached prompt prefix, yielding to load under imbalance"
    OPTIONS = {
        "block_bytes": Option(int, 256, "finest prefix-tree granularity, in prompt bytes"),
        "max_prefix_bytes": Option(int, 65536, "bytes of a prompt's opening considered"),
        "max_entries": Option(int, 100_000, "prefixes remembered per service (LRU)"),
        "min_match": Option(float, 0.1, "fraction of a prompt's prefixes that makes a hit"),
        "balance_abs": Option(int, 4, "in-flight excess over the least loaded that may yield"),
        "balance_rel": Option(float, 1.5, "in-flight ratio over the least loaded that may yield"),
    }

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        if self.opt["block_bytes"] < 1 or self.opt["max_prefix_bytes"] < self.opt["block_bytes"]:
            raise ValueError("block_bytes must be >= 1 and max_prefix_bytes >= block_bytes")
        self._trees: dict[str, OrderedDict[int, None]] = {}
        # Misses, and hits that yield, are balanced exactly as least-outstanding does.
        self._balance = LeastOutstanding()

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
        least = self._balance.choose(candidates, request)
        if len(candidates) == 1 or not hashes:
            return least
        best, best_match = least, 0
        for service in candidates:
            matched = self.match(service, hashes)
            if matched > best_match or (
                matched == best_match and matched and service.in_flight < best.in_flight
            ):
                best, best_match = service, matched
        if best_match < self.opt["min_match"] * len(hashes):
            return least
        excess = best.in_flight - least.in_flight
        if excess > self.opt["balance_abs"] and best.in_flight > self.opt["balance_rel"] * max(
            least.in_flight, 1
        ):
            return least
        return best

    def on_start(self, service: Service, request: RouteRequest) -> None:
        hashes = request.memo
        if not isinstance(hashes, list) or not hashes:
            return
        tree = self._trees.get(service.url)
        if tree is None:
            tree = self._trees[service.url] = OrderedDict()
        for h in hashes:
            tree[h] = None
            tree.move_to_end(h)
        limit = self.opt["max_entries"]
        while len(tree) > limit:
            tree.popitem(last=False)
