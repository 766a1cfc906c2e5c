"""TLS both ways: the router's own HTTPS listener, and https:// backends.

Serving: ``--ssl-certfile``/``--ssl-keyfile`` (uvicorn's names) turn the
listener into HTTPS, ALPN ``http/1.1``; ``--ssl-ca-certs`` with
``--ssl-cert-reqs`` 1 (optional) or 2 (required) asks clients for
certificates. SIGHUP loads the certificate files again into the same context:
connections already open keep their session, new handshakes get the new
certificate.

Backends: an ``https://`` service is verified against the system store (which
honours ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``), or the CA bundle given for it
or for every backend, with SNI and the host name check from its URL. A client
certificate and key make it mTLS. ``verify=false`` turns checking off, only
when asked for, and is warned about at start-up. Requests, health checks,
model discovery and load scraping all use the service's one context.

A file that is missing or does not hold what it should stops start-up with a
message that names it and the flag it came from.
"""

from __future__ import annotations

import functools
import os
import ssl

from lmproxy.config import Config, ConfigError

CERT_REQS = {0: ssl.CERT_NONE, 1: ssl.CERT_OPTIONAL, 2: ssl.CERT_REQUIRED}


def _load_chain(
    context: ssl.SSLContext, certfile: str, keyfile: str | None, password: str | None, flags: str
) -> None:
    try:
        context.load_cert_chain(certfile, keyfile, password)
    except ssl.SSLError as exc:
        hint = "; a key with a passphrase needs --ssl-keyfile-password" if "ssl" in flags else ""
        raise ConfigError(
            f"{flags}: {certfile}{' / ' + keyfile if keyfile else ''} is not a certificate "
            f"and its matching private key ({exc.reason or exc}){hint}"
        ) from None
    except OSError as exc:
        for path in (certfile, keyfile):
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"{flags}: cannot read {path}: {exc.strerror}") from None
        raise ConfigError(f"{flags}: {certfile}: {exc.strerror or exc}") from None


def _load_ca(context: ssl.SSLContext, cafile: str, flag: str) -> None:
    try:
        context.load_verify_locations(cafile)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{flag}: {cafile} holds no CA certificate in PEM ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {cafile}: {exc.strerror or exc}") from None


def server_context(config: Config) -> ssl.SSLContext | None:
    """The listener's context, or None when the router serves plain HTTP."""
    if not config.ssl_certfile:
        if config.ssl_keyfile or config.ssl_ca_certs:
            raise ConfigError("--ssl-keyfile and --ssl-ca-certs need --ssl-certfile")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_alpn_protocols(["http/1.1"])
    load_server_certificate(context, config)
    context.verify_mode = CERT_REQS[config.ssl_cert_reqs]
    if config.ssl_ca_certs:
        _load_ca(context, config.ssl_ca_certs, "--ssl-ca-certs")
    elif config.ssl_cert_reqs:
        raise ConfigError(
            "--ssl-cert-reqs asks clients for certificates: give --ssl-ca-certs, the CA "
            "that signs them"
        )
    return context


def load_server_certificate(context: ssl.SSLContext, config: Config) -> None:
    """(Re)load the listener's certificate and key into ``context``."""
    assert config.ssl_certfile
    args = (config.ssl_certfile, config.ssl_keyfile, config.ssl_keyfile_password)
    flags = "--ssl-certfile/--ssl-keyfile"
    # Tried on a scratch context first: a load that fails half-way (a new certificate,
    # an old key) would leave the live one unable to complete a handshake.
    _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), *args, flags)
    _load_chain(context, *args, flags)


@functools.cache
def client_context(
    cafile: str | None, certfile: str | None, keyfile: str | None, verify: bool
) -> ssl.SSLContext:
    """The context for backends with these settings (shared by every such service)."""
    if cafile:  # a private CA: it alone is trusted, not the system store besides
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, checks host names
        _load_ca(context, cafile, "backend CA bundle (--backend-ca-certs or ca=)")
    else:
        context = ssl.create_default_context()
    if certfile:
        _load_chain(context, certfile, keyfile, None, "backend client certificate (cert=/key=)")
    elif keyfile:
        raise ConfigError("a backend client key (key=) needs its certificate (cert=)")
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


# OpenSSL's reasons for the failures users meet, in words that say what to change.
_REASONS = {
    "WRONG_VERSION_NUMBER": "the service does not speak TLS on that port (is it http://?)",
    "RECORD_LAYER_FAILURE": "the service does not speak TLS on that port (is it http://?)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        "the service requires a client certificate (cert= and key=, or "
        "--backend-certfile and --backend-keyfile)"
    ),
    "SSLV3_ALERT_BAD_CERTIFICATE": "the service refused the client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the service does not trust the client certificate's CA",
}


def tls_reason(exc: ssl.SSLError) -> str:
    """What went wrong in a handshake, for last_error and the log."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc)
        if exc.verify_code in (19, 20, 21):  # self-signed in chain, unknown issuer
            message += " (give the CA that signed it with ca= or --backend-ca-certs)"
        return f"certificate verify failed: {message}"
    reason = exc.reason or ""
    return _REASONS.get(reason, reason or str(exc))
