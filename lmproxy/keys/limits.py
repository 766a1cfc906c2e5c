"""API keys with names and limits (``[[keys]]``): who may call, how often, how much.

A request made with a ``[[keys]]`` key is checked here before it is routed:

- ``rpm`` and ``tpm`` are buckets that refill continuously over a minute, as
  OpenAI's limits do. ``rpm`` lets that many requests through at once, then one
  every 60/rpm seconds. ``tpm`` admits a request while the key's bucket still
  holds tokens; each response's ``usage`` is taken from it when the response
  ends, so one response may overdraw it, and the key then waits until the debt
  is repaid. An answer that ends without its usage (the client hung up before
  the usage chunk) is charged the router's estimate of it (``journey/exchange.py``,
  ``MeteredExchange``).
- ``max_in_flight`` counts the key's requests under way.

A bucket is one number, the moment it would be full again (the "theoretical
arrival time" of GCRA), so checking and taking is one step, atomic in Redis too.

Who keeps the counts:

- one process: the router (:class:`LocalLimits`);
- ``--workers N``: the supervisor, asked by every worker over the control
  channel (:class:`RemoteLimits`, answered by :class:`Authority`), so the limits
  hold for the whole router; a worker that cannot reach it counts alone;
- ``--redis-url``: Redis, shared by every replica (``redis_limits.py``),
  asked by the single process or the supervisor, which keep their own counts
  while Redis cannot be reached.

A check answers a :class:`Refusal` or a :class:`Grant`, at once or (from
another process) as a future; the request ends its grant with the tokens it
used.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

from lmproxy.workers.control import ChannelClosed, Message

if TYPE_CHECKING:
    from lmproxy.config import Config, KeySpec
    from lmproxy.workers.control import Channel

log = logging.getLogger("lmproxy")

WINDOW_S = 60.0  # the limits are per minute
ASK_TIMEOUT_S = 1.0  # a worker waits this long for the supervisor, then counts alone


class Key:
    """A ``[[keys]]`` entry as the request path uses it."""

    __slots__ = (
        "limited",
        "max_in_flight",
        "max_priority",
        "models",
        "name",
        "priority",
        "rpm",
        "tpm",
    )

    def __init__(self, spec: KeySpec) -> None:
        self.name = spec.name
        self.models = frozenset(spec.models)  # empty: every model
        self.rpm = spec.rpm
        self.tpm = spec.tpm
        self.max_in_flight = spec.max_in_flight
        self.priority = spec.priority
        self.max_priority = spec.max_priority
        self.limited = bool(spec.rpm or spec.tpm or spec.max_in_flight)


def keys_by_name(config: Config) -> dict[str, Key]:
    return {spec.name: Key(spec) for spec in config.keys}


class Refusal(NamedTuple):
    """Over a limit: which one, what the client is told, and when to try again."""

    limit: str  # "rpm", "tpm" or "max_in_flight"
    message: str
    retry_after: int  # seconds


class Grant(Protocol):
    """An admitted request's hold on its key's limits."""

    def end(self, tokens: int) -> None:
        """The request is over, having used ``tokens`` (its usage, or the router's
        estimate of it; 0 when no backend had the request)."""
        ...


Verdict = Grant | Refusal


class _Unlimited:
    """The grant of a key without limits: its end is only counted in its figures."""

    __slots__ = ()

    def end(self, tokens: int) -> None:
        pass


UNLIMITED: Grant = _Unlimited()


class Limits(Protocol):
    def check(self, key: Key) -> Verdict | asyncio.Future[Verdict]:
        """A verdict now, or (from another process) a future of one."""
        ...

    def under_way(self, name: str) -> int:
        """The key's requests under way, as far as this process counts them."""
        ...

    def forget_others(self, names: set[str]) -> None:
        """After a reload: this process's counts of keys that are gone go too."""
        ...

    async def aclose(self) -> None:
        """At shutdown: stop whatever runs in the background."""
        ...


def refusal(key: Key, limit: str, wait_s: float) -> Refusal:
    """What a request over ``limit`` is told; ``wait_s``: until the bucket has room."""
    retry = max(1, math.ceil(wait_s))
    if limit == "rpm":
        text = f"its rate limit, {key.rpm} requests per minute"
    elif limit == "tpm":
        text = f"its token limit, {key.tpm} tokens per minute (from the responses' usage)"
    else:
        text = f"its max_in_flight, {key.max_in_flight} requests under way at once"
    return Refusal(limit, f"API key {key.name!r} is over {text}; retry after {retry} s", retry)


class _Counts:
    __slots__ = ("requests_full_at", "tokens_full_at", "under_way")

    def __init__(self) -> None:
        self.requests_full_at = 0.0  # the rpm bucket is full again then (clock time)
        self.tokens_full_at = 0.0
        self.under_way = 0  # requests admitted and not ended


class LocalLimits:
    """The counts of one process: the router's, the supervisor's, or a fallback's."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.counts: dict[str, _Counts] = {}

    def _counts_of(self, name: str) -> _Counts:
        counts = self.counts.get(name)
        if counts is None:
            counts = self.counts[name] = _Counts()
        return counts

    def check(self, key: Key) -> Verdict:
        counts = self._counts_of(key.name)
        now = self.clock()
        if key.rpm:
            full_at = max(counts.requests_full_at, now) + WINDOW_S / key.rpm
            if full_at - now > WINDOW_S:
                return refusal(key, "rpm", full_at - now - WINDOW_S)
        if key.tpm and counts.tokens_full_at - now >= WINDOW_S:
            return refusal(key, "tpm", counts.tokens_full_at - now - WINDOW_S)
        if key.max_in_flight and counts.under_way >= key.max_in_flight:
            return refusal(key, "max_in_flight", 1)
        if key.rpm:
            counts.requests_full_at = full_at
        counts.under_way += 1
        return _LocalGrant(self, key, counts)

    def charge(self, key: Key, tokens: int) -> None:
        """Take ``tokens`` from the key's tpm bucket."""
        if tokens > 0 and key.tpm:
            counts = self._counts_of(key.name)
            now = self.clock()
            counts.tokens_full_at = max(counts.tokens_full_at, now) + tokens * WINDOW_S / key.tpm

    def under_way(self, name: str) -> int:
        counts = self.counts.get(name)
        return counts.under_way if counts is not None else 0

    def forget_others(self, names: set[str]) -> None:
        """After a reload: the counts of keys that are gone go too."""
        for name in list(self.counts):
            if name not in names:
                del self.counts[name]

    async def aclose(self) -> None:
        pass


class _LocalGrant:
    __slots__ = ("counts", "key", "limits")

    def __init__(self, limits: LocalLimits, key: Key, counts: _Counts) -> None:
        self.limits = limits
        self.key = key
        self.counts = counts

    def end(self, tokens: int) -> None:
        self.counts.under_way -= 1
        self.limits.charge(self.key, tokens)


# --- --workers N: the supervisor keeps the counts ------------------------------------


class RemoteLimits:
    """A worker's limits: the supervisor decides, for the whole router. A worker that
    gets no answer within ASK_TIMEOUT_S decides alone, and says so once.

    A grant is named by the id of the ask that got it, so a worker that stopped
    waiting can end a grant it never saw (the supervisor ends it when it comes)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.loop = asyncio.get_running_loop()
        self.fallback = LocalLimits()
        self._alone = False

    def check(self, key: Key) -> Verdict | asyncio.Future[Verdict]:
        try:
            ident, reply = self.channel.request({"op": "limit", "key": key.name})
        except ChannelClosed:
            return self._decide_alone(key, "the supervisor is gone")
        verdict: asyncio.Future[Verdict] = self.loop.create_future()
        timer = self.loop.call_later(ASK_TIMEOUT_S, self._late, ident, verdict, key)
        reply.add_done_callback(lambda done: self._answered(done, ident, verdict, key, timer))
        return verdict

    def _answered(
        self,
        reply: asyncio.Future[Message],
        ident: int,
        verdict: asyncio.Future[Verdict],
        key: Key,
        timer: asyncio.TimerHandle,
    ) -> None:
        timer.cancel()
        if verdict.done():
            return
        if reply.cancelled() or reply.exception() is not None:
            verdict.set_result(self._decide_alone(key, "the supervisor is gone"))
            return
        message = reply.result()
        if self._alone:
            self._alone = False
            log.info("the supervisor answers again: key limits hold for the whole router")
        if message.get("granted"):
            verdict.set_result(_RemoteGrant(self.channel, ident))
        else:
            verdict.set_result(Refusal(message["limit"], message["message"], message["retry"]))

    def _late(self, ident: int, verdict: asyncio.Future[Verdict], key: Key) -> None:
        """No answer in time: decide here, and have the supervisor end what it grants."""
        self.channel.forget(ident)  # its answer, if it comes, is dropped
        self.channel.send({"op": "limit_end", "grant": ident, "tokens": 0})
        if not verdict.done():
            verdict.set_result(self._decide_alone(key, f"no answer in {ASK_TIMEOUT_S:g}s"))

    def _decide_alone(self, key: Key, why: str) -> Verdict:
        if not self._alone:
            self._alone = True
            log.warning(
                "key limits: the supervisor cannot be asked (%s); this worker keeps them alone",
                why,
            )
        return self.fallback.check(key)

    def under_way(self, name: str) -> int:
        return self.fallback.under_way(name)  # the supervisor's count is the router's

    def forget_others(self, names: set[str]) -> None:
        self.fallback.forget_others(names)

    async def aclose(self) -> None:
        pass


class _RemoteGrant:
    __slots__ = ("channel", "ident")

    def __init__(self, channel: Channel, ident: int) -> None:
        self.channel = channel
        self.ident = ident

    def end(self, tokens: int) -> None:
        self.channel.send({"op": "limit_end", "grant": self.ident, "tokens": tokens})


class Authority:
    """The supervisor's side: answers the workers' checks from its own limits (local,
    or Redis), and holds their grants until they end them or die.

    Grants are named by the worker's channel and the ask's id. An end may come before
    its grant when the worker stopped waiting: an ask still being decided (by Redis)
    is then marked, and its grant ended as soon as it is made."""

    def __init__(self, limits: Limits, keys: dict[str, Key]) -> None:
        self.limits = limits
        self.keys = keys
        self._grants: dict[tuple[Channel, int], Grant] = {}
        self._deciding: set[tuple[Channel, int]] = set()  # asks waiting for Redis
        self._ended_early: set[tuple[Channel, int]] = set()  # ... whose worker ended them

    def ask(self, channel: Channel, message: Message) -> None:
        key = self.keys.get(message["key"])
        if key is None:  # a reload removed it while the worker asked: not ours to refuse
            channel.reply(message, {"granted": True})
            return
        verdict = self.limits.check(key)
        if isinstance(verdict, asyncio.Future):
            self._deciding.add((channel, message["id"]))
            verdict.add_done_callback(lambda done: self._answer(channel, message, done.result()))
        else:
            self._answer(channel, message, verdict)

    def _answer(self, channel: Channel, message: Message, verdict: Verdict) -> None:
        held = (channel, message["id"])
        self._deciding.discard(held)
        if isinstance(verdict, Refusal):
            self._ended_early.discard(held)
            channel.reply(
                message,
                {"limit": verdict.limit, "message": verdict.message, "retry": verdict.retry_after},
            )
            return
        if channel.closed or held in self._ended_early:
            # The worker died, or stopped waiting, while Redis answered.
            self._ended_early.discard(held)
            verdict.end(0)
            return
        self._grants[held] = verdict
        channel.reply(message, {"granted": True})

    def end(self, channel: Channel, message: Message) -> None:
        held = (channel, message["grant"])
        grant = self._grants.pop(held, None)
        if grant is not None:
            grant.end(message["tokens"])
        elif held in self._deciding:
            self._ended_early.add(held)

    def forget(self, channel: Channel) -> None:
        """A worker died: the requests it had under way are over."""
        for held in [held for held in self._grants if held[0] is channel]:
            self._grants.pop(held).end(0)
        self._ended_early = {held for held in self._ended_early if held[0] is not channel}
