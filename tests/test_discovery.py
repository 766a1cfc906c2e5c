"""DNS discovery against a real DNS server on a loopback port (tests/dns_server.py):
A/AAAA names and SRV records, addresses that come and go, a resolver that fails."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, STARTUP_TIMEOUT_S, Mock, Process, Router, wait_until

MODEL = "Qwen3-32B"
ONE_TOKEN = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


class DnsServer(Process):
    """``tests/dns_server.py``: its records are what ``set`` last wrote to its zone file."""

    def __init__(self, zone: Path) -> None:
        self.zone = zone
        self.set({})
        super().__init__(["tests/dns_server.py", "--zone", str(zone)])
        self.port = wait_until(self._port, STARTUP_TIMEOUT_S, "the DNS server to listen")

    def _port(self) -> int | None:
        match = re.search(r"dns listening on 127\.0\.0\.1:(\d+)", self.output)
        return int(match.group(1)) if match else None

    def set(self, records: dict, fail: bool = False) -> None:
        self.zone.write_text(json.dumps({"records": records, "fail": fail}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def served_by(router: Router, requests: int) -> set[str]:
    return {
        router.post("/v1/chat/completions", ONE_TOKEN).headers["x-mock-server"]
        for _ in range(requests)
    }


def discovering(spawn, dns: DnsServer, target: str, *extra: str) -> Router:
    return spawn(
        Router,
        "--discover", target,
        "--dns-server", f"127.0.0.1:{dns.port}",
        "--discover-interval", "0.2",
        "--health-interval", "0.5",
        "--service-removal-grace-period", "1",
        *extra,
    )  # fmt: skip


def test_a_name_s_addresses_are_the_services_as_they_come_and_go(spawn, tmp_path):
    port = free_port()  # one port, as a headless Service's pods share theirs
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    for i, host in enumerate(hosts):
        spawn(Mock, f"pod{i}", [MODEL], "--host", host, port=port)
    dns = spawn(DnsServer, tmp_path / "zone.json")
    dns.set({"vllm.test.": {"A": hosts[:1]}})
    router = discovering(spawn, dns, f"dns://vllm.test:{port}")
    router.wait_healthy(1)
    listed = router.listed()
    assert list(listed) == [f"127.0.0.2:{port}"] and listed[f"127.0.0.2:{port}"]["origin"] == "dns"
    assert router.post("/v1/chat/completions", ONE_TOKEN).status == 200
    # Scale to three: each address is a service, its model discovered from /v1/models.
    dns.set({"vllm.test.": {"A": hosts}})
    router.wait_healthy(3)
    served = {
        router.post("/v1/chat/completions", ONE_TOKEN).headers["x-mock-server"] for _ in range(9)
    }
    assert served == {"pod0", "pod1", "pod2"}
    # One leaves DNS: kept for the grace period, then removed.
    dns.set({"vllm.test.": {"A": [hosts[0], hosts[2]]}})
    wait_until(lambda: "is no longer in DNS" in router.output, 5, "the departure")
    wait_until(lambda: f"127.0.0.3:{port}" not in router.listed(), 5, "the removal")
    assert "gone from DNS for 1s" in router.output
    assert set(router.listed()) == {f"127.0.0.2:{port}", f"127.0.0.4:{port}"}


def test_srv_records_give_each_service_its_own_port(spawn, tmp_path):
    backends = [spawn(Mock, f"srv{i}", [MODEL]) for i in range(2)]
    dns = spawn(DnsServer, tmp_path / "zone.json")
    dns.set(
        {
            "_http._tcp.vllm.test.": {
                "SRV": [f"0 0 {b.port} node{i}.vllm.test." for i, b in enumerate(backends)]
            },
            "node0.vllm.test.": {"A": ["127.0.0.1"]},
            "node1.vllm.test.": {"A": ["127.0.0.1"]},
        }
    )
    router = discovering(spawn, dns, "srv://_http._tcp.vllm.test")
    router.wait_healthy(2)
    assert set(router.listed()) == {f"127.0.0.1:{b.port}" for b in backends}
    served = {
        router.post("/v1/chat/completions", ONE_TOKEN).headers["x-mock-server"] for _ in range(6)
    }
    assert served == {"srv0", "srv1"}


def test_a_failing_resolver_removes_nothing_and_is_logged_once(spawn, tmp_path):
    backend = spawn(Mock, "steady", [MODEL])
    dns = spawn(DnsServer, tmp_path / "zone.json")
    dns.set({"vllm.test.": {"A": ["127.0.0.1"]}})
    router = discovering(spawn, dns, f"dns://vllm.test:{backend.port}")
    router.wait_healthy(1)
    dns.set({}, fail=True)
    wait_until(lambda: "lookup failed" in router.output, 5, "the failure")
    # Eight failed lookups later (1.6 s, past the 1 s grace period): one log line, and
    # the service is still there and served.
    asked = dns.output.count("query ")
    wait_until(lambda: dns.output.count("query ") >= asked + 8, 10, "more lookups")
    assert router.get("/stats").json()["total_services"] == 1
    assert router.output.count("lookup failed") == 1
    assert router.post("/v1/chat/completions", ONE_TOKEN).status == 200
    dns.set({"vllm.test.": {"A": ["127.0.0.1"]}})
    wait_until(lambda: "resolves again" in router.output, 5, "the recovery")


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--discover", "vllm.test:8000"], "dns://NAME:PORT"),
        (["--discover", "dns://vllm.test"], "needs the services' port"),
        (["--discover", "srv://_http._tcp.x:80"], "each record's own port"),
        (["--discover", "dns://x:1", "--dns-server", "resolver.example"], "IP address"),
        (["--discover", "dns://x:1", "--discover-interval", "0"], "must be > 0"),
    ],
)
def test_bad_discovery_flags_say_what_to_change(flags, says):
    done = subprocess.run(
        [sys.executable, "-m", "lmproxy", "--port", "0", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and says in done.stderr, done.stderr


def test_discovery_from_the_config_file(spawn, tmp_path):
    backend = spawn(Mock, "filed", [MODEL])
    dns = spawn(DnsServer, tmp_path / "zone.json")
    dns.set({"vllm.test.": {"A": ["127.0.0.1"]}})
    config = tmp_path / "lmproxy.toml"
    config.write_text(
        f'discover = ["dns://vllm.test:{backend.port}"]\n'
        f'dns_server = "127.0.0.1:{dns.port}"\n'
        "discover_interval = 0.2\n"
    )
    router = spawn(Router, "--config", str(config))
    router.wait_healthy(1)
    assert router.listed()[f"127.0.0.1:{backend.port}"]["origin"] == "dns"


def test_https_services_found_in_dns_are_checked_against_the_name(spawn, tmp_path):
    """--discover-scheme https: each address is https://, and its certificate must name
    the DNS name it was found by (a headless Service's certificate names the Service,
    not each pod's address)."""
    import trustme

    ca = trustme.CA()
    pem, ca_file = tmp_path / "engine.pem", tmp_path / "ca.pem"
    ca.issue_cert("vllm.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca.cert_pem.write_to_path(str(ca_file))
    backend = spawn(Mock, "tls-engine", [MODEL], "--ssl-certfile", str(pem))
    dns = spawn(DnsServer, tmp_path / "zone.json")
    dns.set({"vllm.test.": {"A": ["127.0.0.1"]}})
    router = discovering(
        spawn, dns, f"dns://vllm.test:{backend.port}",
        "--discover-scheme", "https", "--backend-ca-certs", str(ca_file),
    )  # fmt: skip
    router.wait_healthy(1)
    assert router.listed()[f"127.0.0.1:{backend.port}"]["url"] == (
        f"https://127.0.0.1:{backend.port}"
    )
    assert served_by(router, 2) == {"tls-engine"}


def test_a_name_resolves_as_on_the_rest_of_the_machine(spawn):
    """Without --dns-server a name's addresses come from getaddrinfo, as for curl or
    nginx: ``localhost`` is in /etc/hosts (nsswitch), and no DNS server knows it."""
    port = free_port()
    spawn(Mock, "local", [MODEL], port=port)
    router = spawn(Router, "--discover", f"dns://localhost:{port}", "--discover-interval", "0.2")
    router.wait_healthy(1)
    listed = router.listed()
    assert listed[f"127.0.0.1:{port}"]["origin"] == "dns", listed
    assert router.post("/v1/chat/completions", ONE_TOKEN).status == 200
    assert "resolves to no address" not in router.output


def test_a_name_with_no_address_is_a_warning_naming_the_resolver(spawn, tmp_path):
    dns = spawn(DnsServer, tmp_path / "zone.json")
    dns.set({"other.test.": {"A": ["127.0.0.2"]}})
    router = discovering(spawn, dns, "dns://nothing.test:8000")
    says = f"resolves to no address (asked the DNS server 127.0.0.1:{dns.port} (--dns-server))"
    wait_until(lambda: says in router.output, 5, "the warning")
    # Logged once while it stays so, however many lookups follow (each asks A and AAAA).
    asked = dns.output.count("query nothing.test. A")
    wait_until(lambda: dns.output.count("query nothing.test. A") >= asked + 3, 5, "more lookups")
    assert router.output.count("resolves to no address") == 1, router.output
    assert "WARNING" in next(line for line in router.output.splitlines() if says in line)
