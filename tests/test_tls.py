"""TLS both ways, with certificates made here (trustme): lmproxy serving HTTPS, and
lmproxy to https:// simulators, mTLS included; each refusal names its cause."""

from __future__ import annotations

import datetime
import json
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import trustme
from conftest import ROOT, Mock, Registry, Router, request, wait_until

MODEL = "Qwen3-32B"
ONE_TOKEN = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


class Certs:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, and
    the broken ones: expired, for another host, and from a CA nobody trusts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_pem = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.server = self._leaf("server", self.ca.issue_cert("127.0.0.1", "localhost"))
        self.client = self._leaf("client", self.ca.issue_cert("lmproxy-client"))
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
        expired = self.ca.issue_cert(
            "127.0.0.1", not_before=past - datetime.timedelta(days=30), not_after=past
        )
        self.expired = self._leaf("expired", expired)
        self.other_host = self._leaf("other", self.ca.issue_cert("example.org"))
        self.stranger = self._leaf("stranger", trustme.CA().issue_cert("127.0.0.1"))

    def _write(self, name: str, data: bytes) -> str:
        path = self.folder / name
        path.write_bytes(data)
        return str(path)

    def _leaf(self, name: str, cert: trustme.LeafCert) -> tuple[str, str]:
        chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
        return (
            self._write(f"{name}.pem", chain),
            self._write(f"{name}.key", cert.private_key_pem.bytes()),
        )

    def client_context(self) -> ssl.SSLContext:
        """What a client that trusts the CA uses to reach lmproxy over HTTPS."""
        return ssl.create_default_context(cafile=self.ca_pem)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


def https_mock(spawn, certs: Certs, name: str, leaf: tuple[str, str], *extra: str) -> Mock:
    backend = spawn(
        Mock, name, [MODEL], "--ssl-certfile", leaf[0], "--ssl-keyfile", leaf[1], *extra
    )
    backend.context = certs.client_context()
    if "--ssl-ca-certs" in extra:  # it asks for ours: stats() shows who we are
        backend.context.load_cert_chain(*certs.client)
    return backend


def serving(certs: Certs) -> list[str]:
    return ["--ssl-certfile", certs.server[0], "--ssl-keyfile", certs.server[1]]


def test_the_openai_sdk_streams_through_https_lmproxy_to_an_mtls_simulator(spawn, certs):
    backend = https_mock(
        spawn, certs, "secure", certs.server, "--ssl-ca-certs", certs.ca_pem, "--tokens", "12"
    )
    cert, key = certs.client
    option = f"ca={certs.ca_pem},cert={cert},key={key}"
    router = spawn(
        Router,
        *serving(certs),
        "--backend",
        backend.backend_arg(option),
        context=certs.client_context(),
    )
    router.wait_healthy(1)
    assert "listening on https://" in router.output
    client = openai.OpenAI(
        base_url=f"https://127.0.0.1:{router.port}/v1",
        api_key="unused",
        http_client=openai.DefaultHttpxClient(verify=certs.client_context()),
        max_retries=0,
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    words = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta]
    assert len([w for w in words if w]) == 12
    # curl too, as users try it first.
    done = subprocess.run(
        ["curl", "-sS", "--cacert", certs.ca_pem, f"https://localhost:{router.port}/v1/models"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0 and MODEL in done.stdout, done.stderr
    # The pool reuses TLS connections as it does plain ones: sequential requests, one
    # connection (the health checks come on their own, one each).
    before = backend.stats()["total_connections"]
    for _ in range(5):
        resp = router.post("/v1/chat/completions", ONE_TOKEN)
        assert resp.status == 200
    assert backend.stats()["total_connections"] - before <= 2
    # A plain-HTTP client at the HTTPS port gets nowhere, and the router lives on.
    with socket.create_connection(("127.0.0.1", router.port), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(100)
    assert router.get("/health").status == 200


def test_an_mtls_backend_refuses_a_router_without_a_client_certificate(spawn, certs):
    backend = https_mock(spawn, certs, "strict", certs.server, "--ssl-ca-certs", certs.ca_pem)
    router = spawn(
        Router, "--backend", backend.backend_arg(f"ca={certs.ca_pem}"), "--health-interval", "0.5"
    )

    def refused() -> str:
        return router.stats_of("strict")["last_error"] or ""

    wait_until(lambda: "client certificate" in refused(), 10, "the refusal")
    assert not router.stats_of("strict")["healthy"]
    resp = router.post("/v1/chat/completions", ONE_TOKEN)
    assert resp.status == 503 and "client certificate" in resp.json()["error"]


@pytest.mark.parametrize(
    ("leaf", "cause"),
    [
        ("expired", "certificate has expired"),
        ("other_host", "mismatch"),
        ("stranger", "unable to get local issuer certificate"),
    ],
)
def test_a_bad_backend_certificate_is_refused_with_its_cause(spawn, certs, leaf, cause):
    backend = https_mock(spawn, certs, "bad", getattr(certs, leaf))
    router = spawn(
        Router,
        "--backend",
        backend.backend_arg(),
        "--backend-ca-certs",
        certs.ca_pem,
        "--health-interval",
        "0.5",
    )
    wait_until(lambda: cause in (router.stats_of("bad")["last_error"] or ""), 10, cause)
    error = router.stats_of("bad")["last_error"]
    assert "certificate verify failed" in error and not router.stats_of("bad")["healthy"]
    if leaf == "stranger":
        assert "--backend-ca-certs" in error  # says what to change


def test_verify_false_is_taken_only_when_asked_and_warned_about(spawn, certs):
    backend = https_mock(spawn, certs, "selfmade", certs.stranger)
    router = spawn(Router, "--backend", backend.backend_arg("verify=false"))
    router.wait_healthy(1)
    assert "are not checked (verify=false: selfmade)" in router.output
    resp = router.post("/v1/chat/completions", ONE_TOKEN)
    assert resp.status == 200


@pytest.mark.parametrize(
    "flags",
    [
        ["--ssl-certfile", "/nonexistent/cert.pem"],
        ["--backend", "https://127.0.0.1:1,ca=/nonexistent/ca.pem"],
        ["--backend-ca-certs", "/nonexistent/ca.pem", "--backend", "https://127.0.0.1:1"],
    ],
)
def test_an_unreadable_tls_file_stops_startup_with_its_name(flags):
    done = subprocess.run(
        [sys.executable, "-m", "lmproxy", "--port", "0", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "/nonexistent/" in done.stderr and "no such file" in done.stderr.lower(), done.stderr


def test_a_key_that_does_not_match_stops_startup(certs):
    done = subprocess.run(
        [sys.executable, "-m", "lmproxy", "--port", "0", "--ssl-certfile", certs.server[0],
         "--ssl-keyfile", certs.client[1]],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and certs.server[0] in done.stderr, done.stderr


def _serial(port: int, context: ssl.SSLContext) -> int:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_reloads_the_certificate_without_dropping_connections(spawn, certs, tmp_path):
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    cert.write_bytes(Path(certs.server[0]).read_bytes())
    key.write_bytes(Path(certs.server[1]).read_bytes())
    backend = spawn(Mock, "plain", [MODEL])
    context = certs.client_context()
    router = spawn(
        Router,
        "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
        "--backend", backend.backend_arg(),
        context=context,
    )  # fmt: skip
    router.wait_healthy(1)
    first = _serial(router.port, context)
    # A keep-alive connection open across the reload.
    import http.client

    kept = http.client.HTTPSConnection("127.0.0.1", router.port, context=context, timeout=5)
    kept.request("GET", "/health")
    assert kept.getresponse().read()
    renewed = certs.ca.issue_cert("127.0.0.1", "localhost")
    cert.write_bytes(b"".join(b.bytes() for b in renewed.cert_chain_pems))
    key.write_bytes(renewed.private_key_pem.bytes())
    router.signal(signal.SIGHUP)
    wait_until(lambda: _serial(router.port, context) != first, 10, "the new certificate")
    kept.request("GET", "/health")
    assert kept.getresponse().status == 200  # the old connection still serves
    kept.close()
    # A reload with a broken file keeps the certificate in use, and says so.
    key.write_bytes(b"not a key")
    router.signal(signal.SIGHUP)
    wait_until(lambda: "keeping the certificate in use" in router.output, 10, "the refusal")
    assert router.get("/health").status == 200


def test_https_with_workers(spawn, certs):
    backend = spawn(Mock, "plain", [MODEL])
    router = spawn(
        Router, *serving(certs), "--workers", "2", "--backend", backend.backend_arg(),
        context=certs.client_context(),
    )  # fmt: skip
    router.wait_healthy(1)
    for _ in range(6):
        resp = router.post("/v1/chat/completions", ONE_TOKEN)
        assert resp.status == 200


def test_client_certificates_required_by_the_router(spawn, certs, tmp_path):
    """--ssl-cert-reqs 2 with --ssl-ca-certs: no client certificate, no answer; and the
    key may be encrypted (--ssl-keyfile-password)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(Path(certs.server[1]).read_bytes(), None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    backend = spawn(Mock, "plain", [MODEL])
    with_cert = certs.client_context()
    with_cert.load_cert_chain(*certs.client)
    router = spawn(
        Router,
        "--ssl-certfile", certs.server[0], "--ssl-keyfile", str(locked),
        "--ssl-keyfile-password", "s3cret",
        "--ssl-ca-certs", certs.ca_pem, "--ssl-cert-reqs", "2",
        "--backend", backend.backend_arg(),
        context=with_cert,
    )  # fmt: skip
    router.wait_healthy(1)
    assert router.post("/v1/chat/completions", ONE_TOKEN).status == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        response = request(router.port, "GET", "/health", context=certs.client_context())
        raise AssertionError(f"served without a client certificate: {response.status}")
    # The wrong passphrase stops start-up, naming the flag to fix.
    done = subprocess.run(
        [sys.executable, "-m", "lmproxy", "--port", "0", "--ssl-certfile", certs.server[0],
         "--ssl-keyfile", str(locked), "--ssl-keyfile-password", "wrong"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and "--ssl-keyfile-password" in done.stderr, done.stderr


def test_router_wide_backend_tls_flags(spawn, certs):
    """--backend-ca-certs, --backend-certfile and --backend-keyfile for every https://
    service; --backend-no-verify for a CA nobody trusts."""
    strict = https_mock(spawn, certs, "strict", certs.server, "--ssl-ca-certs", certs.ca_pem)
    router = spawn(
        Router,
        "--backend", strict.backend_arg(),
        "--backend-ca-certs", certs.ca_pem,
        "--backend-certfile", certs.client[0], "--backend-keyfile", certs.client[1],
    )  # fmt: skip
    router.wait_healthy(1)
    assert router.post("/v1/chat/completions", ONE_TOKEN).status == 200
    assert strict.stats()["last_headers"]  # it served us, certificate and all
    selfmade = https_mock(spawn, certs, "selfmade", certs.stranger)
    unchecked = spawn(Router, "--backend", selfmade.backend_arg(), "--backend-no-verify")
    unchecked.wait_healthy(1)
    assert "are not checked (--backend-no-verify: selfmade)" in unchecked.output


def test_tls_settings_in_the_config_file(spawn, certs, tmp_path):
    strict = https_mock(spawn, certs, "strict", certs.server, "--ssl-ca-certs", certs.ca_pem)
    config = tmp_path / "lmproxy.toml"
    config.write_text(
        f'ssl_certfile = "{certs.server[0]}"\n'
        f'ssl_keyfile = "{certs.server[1]}"\n'
        f'backend_ca_certs = "{certs.ca_pem}"\n'
        "[[services]]\n"
        'name = "strict"\n'
        f'url = "{strict.url}"\n'
        f'cert = "{certs.client[0]}"\n'
        f'key = "{certs.client[1]}"\n'
    )
    router = spawn(Router, "--config", str(config), context=certs.client_context())
    router.wait_healthy(1)
    assert router.post("/v1/chat/completions", ONE_TOKEN).status == 200


def test_https_services_from_a_registration_and_a_static_file(spawn, certs, tmp_path):
    """Every place a URL is accepted takes https://: here the admin API and the
    InfiniLM-style static-services file, checked with --backend-ca-certs."""
    registered = https_mock(spawn, certs, "registered", certs.server)
    listed = https_mock(spawn, certs, "listed", certs.server)
    static = tmp_path / "services.json"
    entry = {"name": "listed", "url": listed.url, "metadata": {"models": [MODEL]}}
    static.write_text(json.dumps({"services": [entry]}))
    router = spawn(Router, "--static-services", str(static), "--backend-ca-certs", certs.ca_pem)
    resp = router.post("/services", {"name": "registered", "url": registered.url})
    assert resp.status == 201, resp
    router.wait_healthy(2)
    served = {
        router.post("/v1/chat/completions", ONE_TOKEN).headers["x-mock-server"] for _ in range(8)
    }
    assert served == {"registered", "listed"}


def test_an_https_infinilm_registry(spawn, certs):
    """--registry-url https://: the registry is read with the --backend-* TLS settings."""
    registry = spawn(Registry, "--ssl-certfile", certs.server[0], "--ssl-keyfile", certs.server[1])
    registry.context = certs.client_context()
    backend = spawn(Mock, "listed", [MODEL])
    registry.register("listed", backend)
    router = spawn(
        Router,
        "--registry-url", f"https://127.0.0.1:{registry.port}",
        "--registry-sync-interval", "0.2",
        "--backend-ca-certs", certs.ca_pem,
    )  # fmt: skip
    router.wait_healthy(1)
    assert router.listed()["listed"]["origin"] == "registry"


def test_a_client_that_never_finishes_its_handshake_is_closed_at_the_handshake_timeout(
    spawn, certs
):
    """Before its handshake a TLS client is not yet the server's: it gets its own deadline,
    --handshake-timeout, not the event loop's default minute."""
    backend = spawn(Mock, "plain", [MODEL])
    router = spawn(
        Router, *serving(certs), "--handshake-timeout", "1", "--backend", backend.backend_arg(),
        context=certs.client_context(),
    )  # fmt: skip
    router.wait_healthy(1)
    # Waited less than the next deadline, --header-timeout's 10 s: only the handshake
    # timeout can close them in time.
    silent = socket.create_connection(("127.0.0.1", router.port), timeout=8)
    half = socket.create_connection(("127.0.0.1", router.port), timeout=8)
    half.sendall(b"\x16\x03\x01\x00\xff")  # a ClientHello's record header, then nothing
    try:
        for sock in (silent, half):
            assert sock.recv(100) == b""  # closed by the router
    finally:
        silent.close()
        half.close()
    assert router.get("/health").status == 200
