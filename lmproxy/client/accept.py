"""Every client connection counts from its accept: the gate, and TLS handshakes.

A connection costs the router a descriptor and memory from the moment it is
accepted, whatever it has sent, so it is counted then (``Gate``), not once it
has become an HTTP connection:

- ``--max-connections``: every connection, a TLS handshake in progress
  included. Derived from the open-file limit, or capped by it, so that a
  reserve of descriptors is always left for what the router opens itself:
  backend connections (one per client connection at most, proxied), health
  checks, load scrapes, discovery. Clients cannot make a health check fail
  with "Too many open files", which would mark a healthy backend down.
- ``--max-connections-per-ip``: one source address's share of that limit,
  so one client cannot take every slot. An IPv6 source is its /64, which one
  host usually holds whole.
- ``--max-handshakes``: TLS handshakes in progress at once, a smaller number
  (a handshake costs tens of KiB and CPU before anything is known of the
  client), each source a share of it in the same proportion; each has
  ``--handshake-timeout``.

Plain HTTP is admitted by ``server.ClientConnection.connection_made`` (a refusal
is a 503). Over TLS, the listener is a plain one whose protocol is a
``Handshake``: asyncio and uvloop call a protocol's ``connection_made`` only
after the handshake, and nothing at all when it fails, so the handshake is
driven here, by the event loop's own TLS protocol, and its end, however it
ends, releases what its accept took. A refusal before the handshake can only
be a close.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ipaddress
import logging
import ssl
from collections.abc import Callable
from typing import Any, Protocol

from lmproxy.errors import Fault, error_response

log = logging.getLogger("lmproxy")

# Descriptors kept from client connections for the router's own: its listener, event
# loop, logs and control channel, health checks, load scrapes, discovery, Redis, and
# the backend connections kept idle in the pools.
FD_RESERVE = 256
MIN_CONNECTIONS = 16
PER_SOURCE_FRACTION = 8  # a source may hold 1/8 of the limit by default...
PER_SOURCE_FLOOR = 16  # ...but at least this many (one client's ordinary parallelism)
HANDSHAKE_FRACTION = 4  # handshakes in progress: 1/4 of the limit by default...
MAX_AUTO_HANDSHAKES = 1024  # ...at most: more than a core completes in a second
# Logged again only once the count has come this far below its limit, so that a
# router hovering at a limit logs it once, not at every refusal.
RELOG_FRACTION = 0.75


def connection_budget(fd_limit: int) -> int:
    """Client connections the open-file limit leaves room for: each may hold a backend
    connection, and ``FD_RESERVE`` descriptors stay the router's own."""
    return max(MIN_CONNECTIONS, (fd_limit - FD_RESERVE) // 2)


def connection_limit(configured: int, fd_limit: int) -> int:
    """--max-connections as served: the budget when unset, and never more than it."""
    budget = connection_budget(fd_limit)
    if not configured:
        return budget
    if configured > budget:
        log.warning(
            "--max-connections %d is more than the open-file limit (%d) leaves room for: "
            "serving at most %d client connections, so that backend connections and "
            "health checks always find a descriptor; raise the limit (ulimit -n, "
            "LimitNOFILE=) to serve more",
            configured,
            fd_limit,
            budget,
        )
        return budget
    return configured


def source_of(peer: Any) -> str:
    """The source a connection counts against: its address; for IPv6, its /64."""
    if not peer:
        return ""  # not an IP socket: one source
    host: str = peer[0]
    if ":" not in host or host.startswith("::ffff:"):  # IPv4, or IPv4 mapped into IPv6
        return host
    try:
        return str(ipaddress.IPv6Network((host.partition("%")[0], 64), strict=False))
    except ValueError:
        return host


class Gate:
    """The client connections admitted: how many, from which sources, and how many are
    still in their TLS handshake. A connection is admitted once (``admit`` or
    ``admit_handshake``) and released once (``release``, or ``handshake_ended``
    for a handshake that failed); the counts change nowhere else."""

    __slots__ = (
        "_handshakes_by_source",
        "_limit_logged",
        "_logged_sources",
        "_sources",
        "at_limit",
        "handshake_limit",
        "handshakes_per_source",
        "handshaking",
        "limit",
        "open",
        "per_source",
        "refused_at_limit",
        "refused_handshakes",
        "refused_per_source",
        "source_full",
    )

    def __init__(self, limit: int, per_source: int = 0, handshakes: int = 0) -> None:
        self.limit = limit
        self.per_source = (
            min(limit, per_source)
            if per_source
            else max(limit // PER_SOURCE_FRACTION, min(limit, PER_SOURCE_FLOOR))
        )
        self.handshake_limit = (
            min(limit, handshakes)
            if handshakes
            else max(1, min(limit // HANDSHAKE_FRACTION, MAX_AUTO_HANDSHAKES))
        )
        # A source's share of the handshakes is its share of the limit.
        self.handshakes_per_source = max(1, self.handshake_limit * self.per_source // limit)
        self.open = 0  # admitted and not yet released, handshakes included
        self.handshaking = 0
        self._sources: dict[str, int] = {}
        self._handshakes_by_source: dict[str, int] = {}
        self.refused_at_limit = 0
        self.refused_per_source = 0
        self.refused_handshakes = 0
        self._limit_logged: set[str] = set()  # which of the router's limits were logged
        self._logged_sources: set[str] = set()  # sources logged at their share
        self.at_limit = error_response(
            Fault.AT_CONNECTION_LIMIT,
            f"the router is at its connection limit ({limit}, --max-connections); retry shortly",
            False,
        )
        self.source_full = error_response(
            Fault.AT_CONNECTION_LIMIT,
            f"this address already holds {self.per_source} connections to the router, its "
            "share (--max-connections-per-ip); reuse them (keep-alive) or close some",
            False,
        )

    def admit(self, source: str) -> bytes | None:
        """Count a new connection from ``source``; or, if it may not have one, what to
        answer it (a 503, then the connection closes)."""
        if self.open >= self.limit:
            self.refused_at_limit += 1
            self._log_limit("--max-connections", self.limit)
            return self.at_limit
        sources = self._sources
        held = sources.get(source, 0)
        if held >= self.per_source:
            self.refused_per_source += 1
            self._log_source(source)
            return self.source_full
        sources[source] = held + 1
        self.open += 1
        return None

    def release(self, source: str) -> None:
        """A connection ``admit`` counted has closed."""
        self.open -= 1
        if self._limit_logged and self.open < self.limit * RELOG_FRACTION:
            self._limit_logged.discard("--max-connections")
        if _one_less(self._sources, source):
            self._logged_sources.discard(source)

    def admit_handshake(self, source: str) -> bool:
        """Count a new TLS connection, in its handshake until ``handshake_ended``;
        False: it may not have one (it is closed: no HTTP can be said before TLS)."""
        if self.handshaking >= self.handshake_limit:
            self.refused_handshakes += 1
            self._log_limit("--max-handshakes", self.handshake_limit)
            return False
        by_source = self._handshakes_by_source
        held = by_source.get(source, 0)
        if held >= self.handshakes_per_source:
            self.refused_per_source += 1
            self._log_source(source)
            return False
        if self.admit(source) is not None:
            return False
        by_source[source] = held + 1
        self.handshaking += 1
        return True

    def handshake_ended(self, source: str, completed: bool) -> None:
        """The handshake is over: a completed one is a connection (released when it
        closes); a failed one is released now."""
        self.handshaking -= 1
        if self._limit_logged and self.handshaking < self.handshake_limit * RELOG_FRACTION:
            self._limit_logged.discard("--max-handshakes")
        _one_less(self._handshakes_by_source, source)
        if not completed:
            self.release(source)

    def figures(self) -> dict[str, Any]:
        """For /stats: what is held, the limits, and the refusals so far."""
        return {
            "open": self.open,
            "handshaking": self.handshaking,
            "sources": len(self._sources),
            "limit": self.limit,
            "per_ip_limit": self.per_source,
            "handshake_limit": self.handshake_limit,
            "refused": {
                "at_limit": self.refused_at_limit,
                "per_ip": self.refused_per_source,
                "handshakes": self.refused_handshakes,
            },
        }

    def _log_limit(self, flag: str, limit: int) -> None:
        if flag not in self._limit_logged:
            self._limit_logged.add(flag)
            log.warning("at %s (%d): refusing new client connections until some end", flag, limit)

    def _log_source(self, source: str) -> None:
        # Once per source while it holds connections: its entry, and this, go with the last.
        if source not in self._logged_sources and source in self._sources:
            self._logged_sources.add(source)
            log.warning(
                "%s holds its share of the router's connections (%d, "
                "--max-connections-per-ip; %d of them in TLS handshakes): refusing more from it",
                source or "a local socket",
                self.per_source,
                self.handshakes_per_source,
            )


def _one_less(counts: dict[str, int], source: str) -> bool:
    """One fewer for ``source``; whether that was its last (its entry is then gone: a
    source holding nothing costs no memory)."""
    held = counts[source] - 1
    if held:
        counts[source] = held
        return False
    del counts[source]
    return True


class TLSClient(Protocol):
    """The HTTP side of a TLS connection (``server.ClientConnection``)."""

    @property
    def transport(self) -> asyncio.BaseTransport | None: ...  # set once the handshake is done


class HandshakeHost(Protocol):
    """What a handshake needs of the router (``app.Router``)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def gate(self) -> Gate: ...

    @property
    def handshakes(self) -> set[Handshake]: ...

    @property
    def ssl(self) -> ssl.SSLContext | None: ...

    @property
    def handshake_timeout(self) -> float: ...

    @property
    def tls_protocol(self) -> Callable[..., asyncio.BaseProtocol]: ...

    def tls_client(self, source: str) -> TLSClient: ...


class Handshake(asyncio.Protocol):
    """A TLS connection from its accept to its handshake's end.

    Admitted at accept (``connection_made`` of the raw socket). Then the event
    loop's TLS protocol takes the socket over, wrapping the client's HTTP side,
    whose ``connection_made`` it calls once the handshake is done; the waiter it
    resolves, whatever the end (done, failed, timed out, hung up, dropped at
    shutdown), is where this handshake's count ends.
    """

    __slots__ = ("_client", "_host", "_source", "_transport")

    def __init__(self, host: HandshakeHost) -> None:
        self._host = host
        self._source = ""
        self._client: TLSClient | None = None
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        host = self._host
        source = source_of(transport.get_extra_info("peername"))
        if not host.gate.admit_handshake(source):
            transport.abort()  # type: ignore[attr-defined]
            return
        self._source = source
        self._transport = transport
        client = self._client = host.tls_client(source)
        loop = host.loop
        waiter = loop.create_future()
        waiter.add_done_callback(self._ended)
        tls = host.tls_protocol(
            loop,
            client,
            host.ssl,
            waiter,
            server_side=True,
            ssl_handshake_timeout=host.handshake_timeout,
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)
        host.handshakes.add(self)

    def abort(self) -> None:
        """Drop the handshake at once (shutdown); its waiter still ends the count."""
        if self._transport is not None:
            self._transport.abort()  # type: ignore[attr-defined]

    def _ended(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.cancelled():
            waiter.exception()  # retrieved: a failed handshake is no error of the router's
        host = self._host
        host.handshakes.discard(self)
        # The waiter's result does not tell: an abort resolves it as if all went well.
        client = self._client
        completed = client is not None and client.transport is not None
        host.gate.handshake_ended(self._source, completed)
        if not completed and self._transport is not None:
            self._transport.abort()  # type: ignore[attr-defined]
        self._transport = None
        self._client = None

    def data_received(self, data: bytes) -> None:
        pass  # never called: the TLS protocol takes the socket over in connection_made


def tls_protocol_for(loop: asyncio.AbstractEventLoop) -> Callable[..., asyncio.BaseProtocol]:
    """The event loop's own server-side TLS protocol: uvloop's (what its
    ``create_server(ssl=...)`` uses), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.sslproto.SSLProtocol
    if isinstance(loop, uvloop.Loop):
        tls: Callable[..., asyncio.BaseProtocol] = uvloop.loop.SSLProtocol  # type: ignore[attr-defined]
        return tls
    return asyncio.sslproto.SSLProtocol
