"""The simulated engine's timing: batch capacity, decode slowdown, prefill and its cache."""

from __future__ import annotations

import asyncio
import collections


class Engine:
    """The simulated engine's capacity, so that where a request goes shows in latency.

    - a bounded batch: at most ``max_batch`` sequences generate at once, the rest
      wait in arrival order (0: unbounded);
    - decoding slows as the batch grows: each token takes
      ``token_delay * (1 + batch_slowdown * (sequences - 1))``;
    - prefill costs ``prefill_per_token`` seconds per prompt token (about 4 bytes),
      except for the leading part found in the prefix cache: the last
      ``cache_blocks`` prompt blocks of 128 bytes it saw, least recently used
      evicted first.
    """

    BLOCK_BYTES = 128
    BYTES_PER_TOKEN = 4
    VOCAB = 151_936  # Qwen's: token ids look like a real model's

    @classmethod
    def token_ids(cls, prompt: bytes) -> list[int]:
        """The simulated tokenizer: one token per 4 prompt bytes, as ``prefill`` counts
        them, each id a function of its bytes, so that two prompts share their leading
        ids exactly as far as they share their leading bytes."""
        size = cls.BYTES_PER_TOKEN
        ids = [
            int.from_bytes(prompt[i : i + size], "little") % cls.VOCAB
            for i in range(0, len(prompt) - size + 1, size)
        ]
        return ids or [0]

    def __init__(
        self,
        max_batch: int = 0,
        batch_slowdown: float = 0.0,
        prefill_per_token_s: float = 0.0,
        cache_blocks: int = 0,
    ) -> None:
        self.max_batch = max_batch
        self.batch_slowdown = batch_slowdown
        self.prefill_per_token_s = prefill_per_token_s
        self.cache_blocks = cache_blocks
        self.active = 0
        self.peak_active = 0  # the most requests it ever had under way at once
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.cache: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.prompt_tokens = 0
        self.cached_tokens = 0

    async def admit(self) -> None:
        """Wait for a place in the batch."""
        if self.max_batch and self.active >= self.max_batch:
            waiter = asyncio.get_running_loop().create_future()
            self.waiting.append(waiter)
            try:
                await waiter  # the finishing sequence hands its place over
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.release()  # handed a place just as the client left
                elif waiter in self.waiting:
                    self.waiting.remove(waiter)
                raise
        else:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)

    def release(self) -> None:
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place passes on; active stays the same
                return
        self.active -= 1

    def prefill(self, prompt: bytes) -> tuple[int, int, float]:
        """(prompt tokens, of which cached, prefill seconds), and remember the prompt."""
        tokens = max(1, len(prompt) // self.BYTES_PER_TOKEN)
        cached = 0
        if self.cache_blocks:
            hashes = []
            h = 0
            size = self.BLOCK_BYTES
            for start in range(0, len(prompt) - size + 1, size):
                h = hash((h, prompt[start : start + size]))
                hashes.append(h)
            matched = 0
            for h in hashes:
                if h not in self.cache:
                    break
                matched += 1
            for h in hashes:
                self.cache[h] = None
                self.cache.move_to_end(h)
            while len(self.cache) > self.cache_blocks:
                self.cache.popitem(last=False)
            cached = min(tokens, matched * size // self.BYTES_PER_TOKEN)
        self.prompt_tokens += tokens
        self.cached_tokens += cached
        return tokens, cached, (tokens - cached) * self.prefill_per_token_s

    def token_delay(self, base_s: float) -> float:
        return base_s * (1 + self.batch_slowdown * max(0, self.active - 1))
