"""``--redis-url``: the ``[[keys]]`` limits kept in Redis (or valkey), for every replica.

Each check is one Lua script, so it is atomic whichever replica runs it: it
reads the key's buckets (``limits.py`` explains them) with Redis's own clock,
refuses or takes, and counts the request under way. Requests under way are a
hash per key with one field per replica, and each replica keeps a heartbeat
key alive; a replica that died stops counting once its heartbeat lapses. With
each heartbeat a replica also writes its own count as it knows it (the grants
it holds), so a count that drifted (a check that timed out after Redis had
counted it) is right again within ``HEARTBEAT_S``.

While Redis cannot be reached (refused, timed out, or any error), the process
keeps the limits with its own counts (``LocalLimits``), says so once, and
checks every ``PROBE_S`` whether Redis answers again. A request is ended
where it was admitted.

Every reply is checked for the type and range the command or script promises
(:class:`WrongAnswer` otherwise): a server that answers something else (not
Redis, a proxy in the way, a script that changed under us) is treated as one
that cannot be reached, and nothing it said becomes a verdict, a wait or a
metric's label. The heartbeat runs the end script as a no-op too, so that the
probe succeeds only when the scripts answer as they should.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from typing import Any

from lmproxy.config import ConfigError
from lmproxy.keys.limits import Key, LocalLimits, Verdict, refusal

log = logging.getLogger("lmproxy")

TIMEOUT_S = 0.5  # one Redis call, connecting included; past it, local counts
MAX_CONNECTIONS = 32  # to Redis, per process
PROBE_S = 1.0  # how often a process counting alone asks whether Redis is back
HEARTBEAT_S = 5.0
HEARTBEAT_TTL_MS = 15_000

# KEYS: the key's buckets, its requests under way. ARGV: rpm, tpm, max_in_flight,
# this replica, the heartbeat keys' prefix. Times in milliseconds, Redis's clock.
_CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local window = 60000
local rpm, tpm, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local requests_full = tonumber(redis.call('HGET', KEYS[1], 'r') or 0)
local tokens_full = tonumber(redis.call('HGET', KEYS[1], 't') or 0)
local full_at = math.max(requests_full, now)
if rpm > 0 then
  full_at = full_at + window / rpm
  if full_at - now > window then return {'rpm', tostring(full_at - now - window)} end
end
if tpm > 0 and tokens_full - now >= window then
  return {'tpm', tostring(tokens_full - now - window)}
end
if most > 0 then
  local under_way = 0
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    if redis.call('EXISTS', ARGV[5] .. all[i]) == 1 then
      under_way = under_way + tonumber(all[i + 1])
    else
      redis.call('HDEL', KEYS[2], all[i])
    end
  end
  if under_way >= most then return {'max_in_flight', '1000'} end
  redis.call('HINCRBY', KEYS[2], ARGV[4], 1)
end
if rpm > 0 then
  redis.call('HSET', KEYS[1], 'r', tostring(full_at))
  redis.call('PEXPIRE', KEYS[1], math.ceil(math.max(full_at, tokens_full) - now + window))
end
return {'', '0'}
"""

# KEYS: as above. ARGV: tokens used, tpm, this replica, 1 if counted under way.
_END = """
if ARGV[4] == '1' then
  if redis.call('HINCRBY', KEYS[2], ARGV[3], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[3]) end
end
local tokens, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if tokens > 0 and tpm > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  local full_at = math.max(tonumber(redis.call('HGET', KEYS[1], 't') or 0), now)
  full_at = full_at + tokens * 60000 / tpm
  redis.call('HSET', KEYS[1], 't', tostring(full_at))
  local requests_full = tonumber(redis.call('HGET', KEYS[1], 'r') or 0)
  redis.call('PEXPIRE', KEYS[1], math.ceil(math.max(full_at, requests_full) - now + 60000))
end
return 1
"""


# What the check script answers as its first element: no limit, or the limit hit.
_LIMITS = {b"": "", b"rpm": "rpm", b"tpm": "tpm", b"max_in_flight": "max_in_flight"}
MAX_WAIT_BYTES = 32  # a wait is a Lua number's text; longer is not one
SHOWN_BYTES = 80  # of a wrong answer, in the log line


class WrongAnswer(Exception):
    """Redis answered, but not what the command or script promises."""


def _text(value: Any) -> bytes | None:
    """A bulk string as bytes (``decode_responses`` in the URL makes it a str)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return None


def _shown(reply: Any) -> str:
    shown = repr(reply)
    return shown if len(shown) <= SHOWN_BYTES else shown[:SHOWN_BYTES] + "..."


def check_reply(reply: Any, key: Key) -> tuple[str, float]:
    """The check script's ``[limit, wait_ms]``: the limit hit (one of the key's own, or
    "" for none) and the wait, a finite number of milliseconds >= 0; anything else
    raises :class:`WrongAnswer`."""
    if not isinstance(reply, list) or len(reply) != 2:
        raise WrongAnswer(f"the limit check answered {_shown(reply)}, not [limit, wait]")
    name, wait = _text(reply[0]), _text(reply[1])
    limit = _LIMITS.get(name) if name is not None else None
    if limit is None or (limit and not getattr(key, limit)):
        raise WrongAnswer(
            f"the limit check answered the limit {_shown(reply[0])}, which key "
            f"{key.name!r} does not have"
        )
    try:
        if wait is None or len(wait) > MAX_WAIT_BYTES:
            raise ValueError
        wait_ms = float(wait)
    except ValueError:
        wait_ms = math.nan
    if not (math.isfinite(wait_ms) and wait_ms >= 0):
        raise WrongAnswer(
            f"the limit check answered the wait {_shown(reply[1])}, not milliseconds >= 0"
        )
    return limit, wait_ms


def check_ended(reply: Any) -> None:
    """The end script answers 1."""
    if type(reply) is not int or reply != 1:
        raise WrongAnswer(f"the end of a request answered {_shown(reply)}, not 1")


def check_heartbeat(replies: Any, counts: int) -> None:
    """The heartbeat's pipeline: SET (True), ``counts`` HSET or HDEL (integers >= 0),
    then the end script as a no-op (1)."""
    if not isinstance(replies, list) or len(replies) != counts + 2:
        raise WrongAnswer(f"the heartbeat answered {_shown(replies)}")
    if replies[0] is not True:
        raise WrongAnswer(f"the heartbeat's SET answered {_shown(replies[0])}, not OK")
    for reply in replies[1:-1]:
        if type(reply) is not int or reply < 0:
            raise WrongAnswer(f"the heartbeat's count answered {_shown(reply)}, not a count")
    check_ended(replies[-1])


class RedisLimits:
    """Limits kept in Redis; this process's own counts while it cannot be reached."""

    def __init__(self, url: str, prefix: str, replica: str) -> None:
        try:
            import redis.asyncio as redis_asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
        except ImportError:
            raise ConfigError(
                "--redis-url needs the Redis client: pip install 'lmproxy[redis]'"
            ) from None
        self.url = url
        self.loop = asyncio.get_running_loop()
        # At most MAX_CONNECTIONS to Redis, whatever the load: a check waits for a free
        # one (within its TIMEOUT_S). One retry, at once: a pooled connection that died
        # with a restarted Redis is replaced by a new one.
        pool = redis_asyncio.BlockingConnectionPool.from_url(
            # valkey speaks the same protocol; the client knows only Redis's schemes.
            re.sub(r"^valkey(s?)://", r"redis\1://", url),
            max_connections=MAX_CONNECTIONS,
            timeout=TIMEOUT_S,
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
        )
        self.client: Any = redis_asyncio.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 1))
        self._check = self.client.register_script(_CHECK)
        self._end = self.client.register_script(_END)
        self.prefix = prefix
        self.replica = replica
        self.heartbeat_key = f"{prefix}:replica:{replica}"
        self.local = LocalLimits()
        # Requests this replica has under way on Redis's count, by key name: the truth
        # each heartbeat writes back.
        self.under_way_here: dict[str, int] = {}
        self.reachable = True
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heart = self.loop.create_task(self._beat())

    def check(self, key: Key) -> Verdict | asyncio.Future[Verdict]:
        if not self.reachable:
            return self.local.check(key)
        return self._spawn(self._ask(key))

    async def _ask(self, key: Key) -> Verdict:
        try:
            async with asyncio.timeout(TIMEOUT_S):
                reply = await self._check(
                    keys=self._keys(key),
                    args=[
                        key.rpm,
                        key.tpm,
                        key.max_in_flight,
                        self.replica,
                        f"{self.prefix}:replica:",
                    ],
                )
            limit, wait_ms = check_reply(reply, key)
        except Exception as exc:  # any failure, a wrong answer too: count here, say why
            self._lost(exc)
            if key.max_in_flight:  # Redis may have counted it: the heartbeat says not
                self.under_way_here.setdefault(key.name, 0)
            return self.local.check(key)
        if limit:
            return refusal(key, limit, wait_ms / 1000)
        counted = key.max_in_flight > 0
        if counted:
            self.under_way_here[key.name] = self.under_way_here.get(key.name, 0) + 1
        return _RedisGrant(self, key, counted)

    def end(self, key: Key, tokens: int, counted: bool) -> None:
        if counted:
            self.under_way_here[key.name] -= 1
        elif not (tokens > 0 and key.tpm):
            return
        self._spawn(self._finish(key, tokens, counted))

    async def _finish(self, key: Key, tokens: int, counted: bool) -> None:
        try:
            async with asyncio.timeout(TIMEOUT_S):
                reply = await self._end(
                    keys=self._keys(key),
                    args=[tokens, key.tpm, self.replica, "1" if counted else "0"],
                )
            check_ended(reply)
        except Exception as exc:
            self._lost(exc)
            # Redis's count of this request lapses with the heartbeat; its tokens are
            # at least counted here.
            self.local.charge(key, tokens)

    def _keys(self, key: Key) -> list[str]:
        return [f"{self.prefix}:key:{key.name}", f"{self.prefix}:in_flight:{key.name}"]

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _lost(self, exc: BaseException) -> None:
        if self.reachable:
            self.reachable = False
            if isinstance(exc, WrongAnswer):
                log.warning(
                    "key limits: the server at %s answers as Redis does not (%s); this "
                    "router keeps the limits with its own counts until it answers right "
                    "(is --redis-url a Redis or valkey?)",
                    self.url,
                    exc,
                )
                return
            log.warning(
                "key limits: Redis at %s cannot be reached (%s); this router keeps the "
                "limits with its own counts until it answers again",
                self.url,
                _describe(exc),
            )

    async def _beat(self) -> None:
        """Keep this replica's heartbeat alive, and its counts right; while Redis is
        lost, look for it."""
        while True:
            try:
                async with asyncio.timeout(TIMEOUT_S):
                    await self._heartbeat()
            except Exception as exc:
                self._lost(exc)
            else:
                if not self.reachable:
                    self.reachable = True
                    log.info(
                        "key limits: Redis at %s answers again; the limits are shared again",
                        self.url,
                    )
            await asyncio.sleep(PROBE_S if not self.reachable else HEARTBEAT_S)

    async def _heartbeat(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.heartbeat_key, b"1", px=HEARTBEAT_TTL_MS)
        # Every key this replica has counted, at none too: a field that drifted up
        # while none was under way is put right as well. (As many as there are keys.)
        counts = list(self.under_way_here.items())
        for name, count in counts:
            where = f"{self.prefix}:in_flight:{name}"
            if count > 0:
                pipe.hset(where, self.replica, count)
            else:
                pipe.hdel(where, self.replica)
        # The end script, ending nothing: Redis is back only when its scripts answer.
        await self._end(
            keys=[self.heartbeat_key, self.heartbeat_key],
            args=[0, 0, self.replica, "0"],
            client=pipe,
        )
        check_heartbeat(await pipe.execute(), len(counts))

    def under_way(self, name: str) -> int:
        """This replica's: on Redis's count, and on its own while Redis was lost."""
        return self.under_way_here.get(name, 0) + self.local.under_way(name)

    def forget_others(self, names: set[str]) -> None:
        # Redis's counts lapse by themselves; what is under way here still ends here.
        self.local.forget_others(names)

    async def aclose(self) -> None:
        self._heart.cancel()
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self.client.delete(self.heartbeat_key)
        with contextlib.suppress(Exception):
            await self.client.aclose()


class _RedisGrant:
    __slots__ = ("counted", "key", "limits")

    def __init__(self, limits: RedisLimits, key: Key, counted: bool) -> None:
        self.limits = limits
        self.key = key
        self.counted = counted

    def end(self, tokens: int) -> None:
        self.limits.end(self.key, tokens, self.counted)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {TIMEOUT_S:g}s"
    return str(exc) or type(exc).__name__
