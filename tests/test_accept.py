"""Every connection counts from its accept: TLS handshakes in progress against
--max-connections and their own cap and deadline, one address's share of the limit,
and the descriptors kept for health checks whatever the clients hold."""

from __future__ import annotations

import json
import socket

import pytest
from conftest import Mock, Router, wait_until
from test_tls import Certs, serving

from lmproxy.client.accept import Gate, connection_budget, connection_limit, source_of
from lmproxy.config import Config, ConfigError

MODEL = "Qwen3-32B"
# The first 11 bytes of a TLS ClientHello: a handshake begun and never finished.
PARTIAL_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
PARTIAL_REQUEST = b"GET /health HT"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


def open_stalled(port: int, count: int, first_bytes: bytes, source: str = "127.0.0.1") -> list:
    """``count`` connections from ``source`` that send ``first_bytes`` and stop."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(first_bytes)
        sock.setblocking(False)
        socks.append(sock)
    return socks


class Closures:
    """Which of a list of sockets the router has answered or closed."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = socks
        self.received: dict[int, bytes] = {}
        self.closed: set[int] = set()

    def count(self) -> int:
        for index, sock in enumerate(self.socks):
            while index not in self.closed:
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    break
                except OSError:  # reset
                    data = b""
                if data:
                    self.received[index] = self.received.get(index, b"") + data
                else:
                    self.closed.add(index)
        return len(self.closed)

    def still_open(self) -> int:
        self.count()
        return len(self.socks) - len(self.closed)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def get_from(source: str, port: int, path: str = "/health") -> bytes:
    """A plain-HTTP GET from the address ``source``: the whole answer, as bytes."""
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode())
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:  # a refusal closes with the request unread
            pass
        return data


def test_tls_handshakes_count_from_accept_with_their_own_cap_and_deadline(spawn, certs):
    backend = spawn(Mock, "b", [MODEL])
    router = spawn(
        Router,
        *serving(certs),
        "--backend",
        backend.backend_arg(),
        "--max-connections",
        "20",
        "--max-connections-per-ip",
        "20",  # the handshake cap alone: every attacker comes from 127.0.0.1
        "--handshake-timeout",
        "5",
        "--header-timeout",
        "60",  # on main, the handshake deadline
        context=certs.client_context(),
    )
    router.wait_healthy(1)
    cap = 20 // 4  # --max-handshakes' default: a quarter of --max-connections
    attackers = Closures(open_stalled(router.port, 40, PARTIAL_HELLO))
    try:
        # Past the cap, a new handshake is closed at once: the router holds at most the cap.
        wait_until(lambda: attackers.count() >= 40 - cap, 10, "the handshakes past the cap closed")
        assert attackers.still_open() <= cap
        assert not attackers.received  # closed before the handshake: nothing said
        # The stalled ones are closed at their deadline...
        wait_until(lambda: attackers.count() == 40, 30, "the stalled handshakes closed")
    finally:
        attackers.close()
    # ...and a real TLS client is served, its connection counted from its accept.
    assert router.get("/health").status == 200
    connections = router.get("/stats").json()["connections"]
    assert connections["handshaking"] == 0 and connections["open"] == 1
    assert connections["handshake_limit"] == cap and connections["limit"] == 20
    assert connections["refused"]["handshakes"] >= 40 - cap
    wait_until(lambda: router.get("/stats").json()["connections"]["open"] == 1, 10, "all released")


def test_one_address_cannot_take_every_connection(spawn):
    backend = spawn(Mock, "b", [MODEL])
    router = spawn(
        Router, "--backend", backend.backend_arg(), "--max-connections", "64",
        "--header-timeout", "60",
    )  # fmt: skip
    router.wait_healthy(1)
    share = 16  # the default share of 64: an eighth, at least 16
    attackers = Closures(open_stalled(router.port, 100, PARTIAL_REQUEST))
    try:
        # Accepted in order: once a later connection from the same address is refused,
        # every attacker before it has been counted.
        assert not get_from("127.0.0.1", router.port).startswith(b"HTTP/1.1 200")
        # Another address is served all the same, however long the attackers hold on.
        answer = get_from("127.0.0.2", router.port)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        wait_until(lambda: attackers.count() >= 100 - share, 10, "the attackers past the share")
        # What a refusal can say before its close (the kernel may drop it for the unread
        # request): a 503 naming the flag.
        answered = [attackers.received[i] for i in attackers.closed if i in attackers.received]
        assert answered and all(
            r.startswith(b"HTTP/1.1 503") and b"--max-connections-per-ip" in r for r in answered
        )
        assert attackers.still_open() == share
        stats = json.loads(get_from("127.0.0.3", router.port, "/stats").partition(b"\r\n\r\n")[2])
        assert stats["connections"]["open"] == share + 1  # and this request
        assert stats["connections"]["refused"]["per_ip"] >= 100 - share
        assert router.output.count("holds its share of the router's connections") == 1
    finally:
        attackers.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_clients_cannot_take_the_descriptors_health_checks_need(spawn, certs, scheme):
    backend = spawn(Mock, "b", [MODEL])
    tls = scheme == "https"
    router = spawn(
        Router,
        *(serving(certs) if tls else []),
        "--backend",
        backend.backend_arg(),
        "--health-interval",
        "0.2",
        "--load-interval",
        "0",
        "--max-connections",
        "1000",  # more than 400 descriptors can serve
        "--max-connections-per-ip",
        "1000",
        "--header-timeout",
        "60",
        "--handshake-timeout",
        "60",
        nofile=400,
        context=certs.client_context() if tls else None,
    )
    router.wait_healthy(1)
    budget = (400 - 256) // 2  # what the limit leaves room for
    assert "is more than the open-file limit (400) leaves room for" in router.output
    attackers = Closures(open_stalled(router.port, 600, PARTIAL_HELLO if tls else PARTIAL_REQUEST))
    try:
        # Accepted in order: once a later connection is refused, every attacker is in.
        assert not get_from("127.0.0.1", router.port).startswith(b"HTTP/1.1 200")
        # While they hold on, health checks go on connecting to the backend, and pass.
        before = backend.stats()["total_connections"]
        wait_until(
            lambda: backend.stats()["total_connections"] >= before + 10, 30, "ten more checks"
        )
        assert attackers.still_open() <= budget
    finally:
        attackers.close()
    stats = router.stats_of("b")
    assert stats["healthy"] and stats["last_error"] is None, stats
    assert "unhealthy" not in router.output and "Too many open files" not in router.output


# --- the gate's counts, without sockets -------------------------------------------------


def test_the_gate_counts_every_connection_once_and_each_source_its_share():
    gate = Gate(limit=64)  # defaults: 16 per source (an eighth, at least 16), 16 handshakes
    assert (gate.per_source, gate.handshake_limit, gate.handshakes_per_source) == (16, 16, 4)
    assert all(gate.admit("10.0.0.1") is None for _ in range(16))
    refusal = gate.admit("10.0.0.1")
    assert refusal is not None and b"503" in refusal and b"--max-connections-per-ip" in refusal
    assert gate.admit("10.0.0.2") is None  # another source is not held up
    gate.release("10.0.0.1")
    assert gate.admit("10.0.0.1") is None  # a slot that came back is its own again
    for _ in range(16):
        gate.release("10.0.0.1")
    gate.release("10.0.0.2")
    assert gate.figures()["open"] == 0 and gate.figures()["sources"] == 0
    assert gate.figures()["refused"] == {"at_limit": 0, "per_ip": 1, "handshakes": 0}


def test_a_handshake_counts_as_a_connection_and_a_failed_one_is_released():
    gate = Gate(limit=8, per_source=8, handshakes=2)
    assert gate.admit_handshake("a") and gate.admit_handshake("b")
    assert not gate.admit_handshake("c")  # the handshake cap
    assert gate.figures()["open"] == 2 and gate.handshaking == 2
    gate.handshake_ended("a", completed=True)  # now a connection: still counted
    gate.handshake_ended("b", completed=False)  # failed: released at once
    assert gate.figures()["open"] == 1 and gate.handshaking == 0
    assert all(gate.admit(f"s{i}") is None for i in range(7))
    assert gate.admit("t") is not None and not gate.admit_handshake("t")  # at the limit
    assert gate.figures()["refused"] == {"at_limit": 2, "per_ip": 0, "handshakes": 1}


def test_an_ipv6_source_is_its_64_and_an_ipv4_one_its_address():
    assert source_of(("192.0.2.7", 5000)) == "192.0.2.7"
    assert source_of(("::ffff:192.0.2.7", 5000, 0, 0)) == "::ffff:192.0.2.7"
    assert source_of(("2001:db8:1:2:aaaa::1", 5000, 0, 0)) == "2001:db8:1:2::/64"
    assert source_of(("2001:db8:1:2:bbbb::9", 5000, 0, 0)) == "2001:db8:1:2::/64"
    assert source_of(None) == ""


def test_the_limit_leaves_descriptors_for_the_router_and_caps_a_larger_one():
    assert connection_budget(1024) == 384
    assert connection_limit(0, 1024) == 384
    assert connection_limit(100, 1024) == 100
    assert connection_limit(5000, 1024) == 384


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"max_connections_per_ip": -1}, "--max-connections-per-ip must be >= 0"),
        ({"max_handshakes": -1}, "--max-handshakes must be >= 0"),
        ({"handshake_timeout": 0}, "--handshake-timeout must be > 0"),
    ],
)
def test_the_connection_settings_are_checked(setting, message):
    with pytest.raises(ConfigError, match=message):
        Config(**setting).validate()
