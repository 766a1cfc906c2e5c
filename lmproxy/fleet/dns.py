"""DNS discovery: the services behind a name, read again every ``--discover-interval``.

- ``dns://NAME:PORT``: every A and AAAA record of NAME is a service at that port
  (a Kubernetes headless Service, Docker Compose, Consul or Nomad DNS);
- ``srv://_service._proto.NAME``: every SRV record is a service at its target's
  addresses and its port.

Without ``--dns-server``, a name's addresses come from the system's own
resolution, ``getaddrinfo`` (``/etc/hosts``, nsswitch, then DNS), off the event
loop: a name resolves as it does for every other program on the machine (curl,
nginx), ``localhost`` and Docker Compose's names included. With ``--dns-server
HOST[:PORT]`` only that server is asked. SRV records are always asked of DNS.
Each address becomes an ``http://ADDRESS:PORT`` service named
``ADDRESS:PORT``, whose models come from ``/v1/models`` as for any other; with
``--discover-scheme https`` it is ``https://ADDRESS:PORT``, whose certificate must
name the name it was found by (NAME, or the SRV record's target). As a source of
the fleet (``DnsDiscovery``), an address that disappears is kept for
``--service-removal-grace-period``; a lookup that fails removes nothing and is
logged once, until one succeeds again; a name that resolves to no address is a
warning, once, naming the resolver asked. dnspython asks for SRV records, and
asks ``--dns-server``: more than the standard library offers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from lmproxy.config import Config, ServiceSpec, Target, parse_discover, parse_dns_server
from lmproxy.fleet.sources import Members, Polled

log = logging.getLogger("lmproxy")

MAX_ADDRESSES = 256  # per name: one answer cannot flood the registry


class DiscoveryError(Exception):
    """A name could not be resolved this time; the message says why."""


def make_resolver(server: str | None, timeout_s: float) -> dns.asyncresolver.Resolver:
    """The system's resolver, or one that asks ``server`` (``HOST[:PORT]``) only."""
    if server is None:
        resolver = dns.asyncresolver.Resolver()
    else:
        host, port = parse_dns_server(server)
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [host]
        resolver.port = port
    resolver.lifetime = timeout_s
    return resolver


def resolver_named(server: str | None) -> str:
    """The resolver a lookup asks, in words for the log."""
    if server is None:
        return "the system's resolver (getaddrinfo: /etc/hosts, nsswitch, DNS)"
    return f"the DNS server {server} (--dns-server)"


async def lookup(
    target: Target, resolver: dns.asyncresolver.Resolver, system: bool = False
) -> list[tuple[str, int, str]]:
    """The (address, port, host name) the name stands for now, sorted; DiscoveryError if
    the resolver could not say (a name that exists with no records is an empty list).
    ``system``: addresses from getaddrinfo, not from ``resolver``."""
    if target.kind == "dns":
        pairs = [
            (address, target.port, target.name)
            for address in await _addresses(target.name, resolver, system)
        ]
    else:
        try:
            answer = await resolver.resolve(target.name, "SRV")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []  # the name says: nothing there now
        except dns.exception.DNSException as exc:
            raise DiscoveryError(_why(exc)) from None
        pairs = []
        for record in answer:
            host = record.target.to_text(omit_final_dot=True)
            for address in await _addresses(host, resolver, system):
                pairs.append((address, int(record.port), host))
    return sorted(set(pairs))[:MAX_ADDRESSES]


async def _addresses(
    name: str, resolver: dns.asyncresolver.Resolver, system: bool = False
) -> list[str]:
    try:
        return [str(ipaddress.ip_address(name))]  # already an address
    except ValueError:
        pass
    if system:
        return await _system_addresses(name)
    found: list[str] = []
    for kind in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, kind)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as exc:
            raise DiscoveryError(_why(exc)) from None
        found += [record.to_text() for record in answer]
    return found


# getaddrinfo's answers that say the name has no address (rather than that it
# could not be asked): nothing there now.
_NO_ADDRESS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


async def _system_addresses(name: str) -> list[str]:
    """A and AAAA as the machine resolves them (its resolver runs in the loop's thread
    pool, never on the loop)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NO_ADDRESS:
            return []
        raise DiscoveryError(f"getaddrinfo: {exc.strerror or exc}") from None
    found: list[str] = []
    for family, _, _, _, address in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            found.append(str(ipaddress.ip_address(address[0])))
    return found


def _why(exc: dns.exception.DNSException) -> str:
    if isinstance(exc, dns.resolver.LifetimeTimeout | dns.exception.Timeout):
        return "the resolver did not answer in time"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no resolver could answer (SERVFAIL or refused)"
    return str(exc) or type(exc).__name__


class DnsDiscovery(Polled):
    """The services behind the ``--discover`` names, looked up again and again."""

    origin = "dns"
    what = "DNS"
    loop_name = "DNS discovery"

    def __init__(self, members: Members, config: Config) -> None:
        super().__init__(members, config)
        # Each name's services at its last good lookup, and the names whose lookups
        # fail now (logged once until they answer again).
        self._members: dict[str, set[str]] = {}
        self._failing: set[str] = set()
        self._empty: set[str] = set()  # names that resolved to nothing (warned once)

    def wanted(self, config: Config) -> bool:
        return bool(config.discover)

    def interval(self, config: Config) -> float:
        return config.discover_interval

    def unfollowed(self) -> None:
        self._members.clear()
        self.members.mark_gone(self.origin, set(), "came from DNS discovery, no longer configured")

    def found(self) -> set[str]:
        return set().union(*self._members.values())

    async def sync(self) -> None:
        """One lookup of every --discover name: DNS decides membership, never health."""
        resolver = make_resolver(self.config.dns_server, self.config.health_timeout)
        listed: set[str] = set()
        for text in self.config.discover:
            names = await self._resolve(text, resolver)
            listed |= self._members.get(text, set()) if names is None else names
        self.members.mark_gone(self.origin, listed, "is no longer in DNS")

    async def _resolve(self, text: str, resolver: dns.asyncresolver.Resolver) -> set[str] | None:
        """The services of one name, claimed; None (logged once) when it cannot be read."""
        try:
            system = self.config.dns_server is None
            pairs = await lookup(parse_discover(text), resolver, system)
        except DiscoveryError as exc:
            if text not in self._failing:
                log.warning("discovery %s: lookup failed (%s); keeping its services", text, exc)
            self._failing.add(text)
            return None
        if text in self._failing:
            self._failing.discard(text)
            log.info("discovery %s: the name resolves again", text)
        names = set()
        scheme = self.config.discover_scheme
        for address, port, host_name in pairs:
            host = f"[{address}]" if ":" in address else address
            spec = ServiceSpec(
                url=f"{scheme}://{host}:{port}",
                name=f"{address}:{port}",
                server_name=host_name if scheme == "https" else None,
            )
            names.add(spec.name)
            self.members.claim(spec, self.origin)
        if not names and text not in self._empty:
            self._empty.add(text)
            log.warning(
                "discovery %s: the name resolves to no address (asked %s); check the name, "
                "or give --dns-server",
                text,
                resolver_named(self.config.dns_server),
            )
        elif names:
            self._empty.discard(text)
        if names != self._members.get(text):
            log.info("discovery %s: %d addresses", text, len(names))
        self._members[text] = names
        return names
