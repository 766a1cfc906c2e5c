"""The router's configuration: defaults, the TOML file, ``--backend`` and static-services JSON.

Everything lands in one :class:`Config`. Precedence is defaults < config file <
command line; the command line only overrides what it was actually given.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import SplitResult, urlsplit

import msgspec

from lmproxy import decode
from lmproxy.errors import COMPAT, ERROR_FORMATS, encode_json

MiB = 1024 * 1024
# A worker heartbeats four times per --worker-timeout, at most once a second: a shorter
# timeout than this would take a busy moment for a hang.
MIN_WORKER_TIMEOUT_S = 1.0
# A service's name is a path segment of the admin API and goes into logs and metrics.
NAME_RULE = "1 to 128 of A-Z a-z 0-9 . _ : -, and not only dots"
_NAME = re.compile(r"(?!\.*\Z)[A-Za-z0-9._:-]{1,128}\Z")
# A health path goes into a request line: visible ASCII, no spaces.
PATH_RULE = "start with '/', then up to 1023 visible ASCII characters (no spaces or controls)"
_PATH = re.compile(r"/[\x21-\x7e]{0,1023}\Z")
_SHA256 = re.compile(r"[0-9A-Fa-f]{64}\Z")
_HOST = re.compile(r"[A-Za-z0-9._:%-]{1,255}\Z")
V1 = "/v1"  # dropped from the end of a service URL (see ServiceSpec.path_prefix)
# infini-router's default for size-based routing (its CACHE_TYPE_ROUTING_THRESHOLD).
CACHE_TYPE_ROUTING_THRESHOLD = 51200
THRESHOLD_ENV = "CACHE_TYPE_ROUTING_THRESHOLD"
# A registration's metadata the router keeps (and lists) at most, in bytes of JSON.
MAX_METADATA = 16 * 1024


class ConfigError(Exception):
    """A configuration mistake; the message says what to change."""


def url_port(parts: SplitResult) -> int:
    """A URL's port, or its scheme's default (443 for https, else 80)."""
    return parts.port or (443 if parts.scheme == "https" else 80)


def check_name(name: str) -> None:
    """Refuse a service name outside NAME_RULE (it is a path segment of the admin API)."""
    if not _NAME.match(name):
        raise ConfigError(f"service name {name!r} must be {NAME_RULE}")


class ModelCard(msgspec.Struct):
    """What /v1/models says of a model besides its id, when a registration tells it
    (the ``metadata.models_list`` of InfiniLM's babysitter)."""

    id: str
    created: int | None = None
    owned_by: str | None = None


class ServiceSpec(msgspec.Struct, forbid_unknown_fields=True):
    """One backend service as configured."""

    url: str
    name: str = ""
    weight: int = 1
    models: list[str] = []
    health_path: str = "/health"
    # Requests at once; past it they wait in the router's queue. 0: no limit.
    max_in_flight: int = 0
    model_cards: list[ModelCard] = []
    # TLS to an https:// service (tls.py); None: the router-wide --backend-* setting.
    ca: str | None = None  # CA bundle its certificate is checked against
    cert: str | None = None  # client certificate and key, for mTLS
    key: str | None = None
    verify: bool | None = None  # False: no certificate check (warned about)
    # The name its certificate is checked against (and SNI), when not the URL's host:
    # a discovered address whose certificate names the DNS name it was found by.
    server_name: str | None = None
    # Prefill/decode disaggregation (journey/pair.py): "prefill", "decode", or "both" (whole
    # requests, as ever). A prefill's bootstrap_port is where SGLang decodes fetch its KV.
    role: str = "both"
    bootstrap_port: int | None = None
    # An InfiniLM registration's metadata, listed as it came (within MAX_METADATA);
    # its cache_type ("static" or "paged") takes part in routing (strategies/size.py).
    metadata: dict[str, Any] = {}

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https"):
            raise ConfigError(
                f"service {self.name or self.url!r}: url {self.url!r} must start with "
                "http:// or https://"
            )
        if not parts.hostname:
            raise ConfigError(f"service url {self.url!r} has no host")
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError as exc:
            raise ConfigError(f"service url {self.url!r}: {exc}") from None
        if self.weight < 0:
            raise ConfigError(f"service {self.name or self.url!r}: weight must be >= 0")
        if self.max_in_flight < 0:
            raise ConfigError(f"service {self.name or self.url!r}: max_in_flight must be >= 0")
        if not _HOST.match(parts.hostname):
            raise ConfigError(f"service url {self.url!r}: the host has characters a host has not")
        if self.role not in ROLES:
            raise ConfigError(
                f"service {self.name or self.url!r}: role must be prefill, decode or both, "
                f"got {self.role!r}"
            )
        if self.bootstrap_port is not None and (
            self.role != "prefill" or not 0 < self.bootstrap_port < 65536
        ):
            raise ConfigError(
                f"service {self.name or self.url!r}: bootstrap_port is a prefill service's "
                "(role=prefill), 1-65535"
            )
        if self.server_name is not None and not _HOST.match(self.server_name):
            raise ConfigError(f"service {self.name or self.url!r}: server_name is not a host name")
        if parts.path and not _PATH.match(parts.path):
            raise ConfigError(f"service url {self.url!r}: its path must {PATH_RULE}")
        if not _PATH.match(self.health_path):
            raise ConfigError(
                f"service {self.name or self.url!r}: health_path {self.health_path!r} "
                f"must {PATH_RULE}"
            )
        if not self.tls and (self.ca or self.cert or self.key or self.verify is not None):
            raise ConfigError(
                f"service {self.name or self.url!r}: ca, cert, key and verify apply to "
                "https:// URLs; its URL is http://"
            )
        if not self.name:
            self.name = f"{parts.hostname}:{self.port}"
        check_name(self.name)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def tls(self) -> bool:
        return self.url.startswith("https:")

    @property
    def port(self) -> int:
        return url_port(urlsplit(self.url))

    @property
    def path_prefix(self) -> str:
        """What goes before each proxied path: the URL's path, less a final ``/v1``.

        Clients' paths carry their own ``/v1`` (``/v1/chat/completions``), so a URL
        pasted as ``http://host:port/v1`` would otherwise double it, and its health
        checks would ask ``/v1/health``.
        """
        path = urlsplit(self.url).path.rstrip("/")
        return path[: -len(V1)] if path.endswith(V1) else path

    @property
    def base_url(self) -> str:
        """The URL requests and checks go to: ``url`` less a final ``/v1``."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}{self.path_prefix}"


ROLES = ("both", "prefill", "decode")
PD_MODES = ("vllm", "sglang")


class ModelSettings(msgspec.Struct, forbid_unknown_fields=True):
    """Settings for one model (the ``[models."NAME"]`` tables of the config file)."""

    strategy: str | None = None
    strategy_options: dict[str, Any] = {}
    pd_mode: str | None = None  # its disaggregation protocol, if not the router's
    # Models to try, in order, when none of this one's services can answer (journey/journey.py).
    fallbacks: list[str] = []


class KeySpec(msgspec.Struct, forbid_unknown_fields=True):
    """An API key with a name and limits (the ``[[keys]]`` tables of the config file)."""

    name: str
    key: str | None = None  # the secret itself, or
    key_sha256: str | None = None  # its SHA-256, in hex, so the file need not hold it
    models: list[str] = []  # the models it may ask for; empty: every model
    rpm: int = 0  # requests per minute; 0: no limit
    tpm: int = 0  # tokens per minute, from the responses' usage; 0: no limit
    max_in_flight: int = 0  # its requests under way at once; 0: no limit
    priority: int = 0  # its requests' place in the admission queue: higher goes first
    # X-Priority may set a request's priority, up to this; None: the header is ignored.
    max_priority: int | None = None

    def check(self) -> None:
        where = f"[[keys]] {self.name!r}"
        if not _NAME.match(self.name):
            raise ConfigError(f"[[keys]] name {self.name!r} must be {NAME_RULE}")
        if (self.key is None) == (self.key_sha256 is None):
            raise ConfigError(f"{where}: give key or key_sha256, one of them")
        if self.key is not None and not self.key.strip():
            raise ConfigError(f"{where}: key is empty (was it set from an unset variable?)")
        if self.key is not None and self.key != self.key.strip():
            # A bearer token arrives stripped: this key could never match.
            raise ConfigError(f"{where}: key has spaces around it; remove them")
        if self.key_sha256 is not None and not _SHA256.match(self.key_sha256):
            raise ConfigError(
                f"{where}: key_sha256 must be 64 hex digits (printf %s KEY | sha256sum)"
            )
        for limit in ("rpm", "tpm", "max_in_flight"):
            if getattr(self, limit) < 0:
                raise ConfigError(f"{where}: {limit} must be >= 0 (0: no limit)")
        if self.max_priority is not None and self.max_priority < self.priority:
            raise ConfigError(f"{where}: max_priority must be >= its priority ({self.priority})")

    @property
    def digest(self) -> bytes:
        """The SHA-256 of the key: how a request's bearer token finds its entry."""
        if self.key_sha256 is not None:
            return bytes.fromhex(self.key_sha256)
        assert self.key is not None
        return hashlib.sha256(self.key.encode()).digest()


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Every setting; each is also a command-line flag and a key of the TOML file."""

    host: str = "0.0.0.0"
    port: int = 8000
    services: list[ServiceSpec] = []
    static_services: str | None = None
    health_interval: float = 30.0
    health_timeout: float = 5.0
    load_interval: float = 1.0  # seconds between scrapes of the engines' /metrics; 0: off
    max_errors: int = 3
    connect_timeout: float = 5.0
    request_timeout: float = 300.0
    retries: int = 2
    # A 500, 502, 503, 504 or 429 answered before any byte is retried elsewhere.
    retry_on_5xx: bool = True
    max_body_size: int = 32 * MiB
    default_model: str | None = None
    require_model: bool = False  # no model and several served: 400, not any service
    strategy: str = "cache-aware"
    strategy_options: dict[str, Any] = {}
    models: dict[str, ModelSettings] = {}
    aliases: dict[str, str] = {}  # public name -> served model (the [aliases] table)
    pool_max_idle: int = 64
    pool_idle_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    send_timeout: float = 60.0
    shutdown_timeout: float = 30.0
    max_connections: int = 0  # 0: as many as the open-file limit allows
    # A source address's share of max_connections (accept.py); 0: 1/8, at least 16.
    max_connections_per_ip: int = 0
    max_handshakes: int = 0  # TLS handshakes in progress at once; 0: 1/4 of the limit
    handshake_timeout: float = 5.0
    queue_timeout: float = 30.0
    api_keys: list[str] = []
    keys: list[KeySpec] = []  # named keys with models, limits and priorities (limits.py)
    # Limits shared by every replica: counters in Redis (or valkey); None: per router.
    redis_url: str | None = None
    redis_prefix: str = "lmproxy"
    max_queue: int = 0  # requests waiting for a slot at most; past it the lowest is shed
    # Requests under way at once in the whole router (admission.py); past it they wait
    # in the queue above, and one that waits --queue-timeout gets 408. 0: no limit.
    max_concurrent_requests: int = 0
    # A request for a model no service lists goes to the healthy services of every
    # model (as the Rust routers do with one model), its body unchanged; else 404.
    any_model: bool = False
    # Consumed by the circuit breaker (a service's consecutive failures open it; after
    # the timeout one request tries it; that many successes close it). 0 failures: off.
    # sglang-router's defaults.
    cb_failure_threshold: int = 10
    cb_success_threshold: int = 3
    cb_timeout_duration_secs: float = 60.0
    # A second listener that serves only /metrics (sglang-router's --prometheus-port);
    # 0: none. Its host: --prometheus-host, else --host.
    prometheus_port: int = 0
    prometheus_host: str | None = None
    admin_token: str | None = None
    registration_ttl: float = 0.0  # 0: registrations never expire by themselves
    registry_url: str | None = None
    registry_sync_interval: float = 10.0
    # InfiniLM-SVC: its routers' statuses ("infinilm") or lmproxy's ("none"); the shape
    # of the router's own errors ("plain": {"error": "text"}; "openai": OpenAI's object).
    compat: str = "none"
    error_format: str = "plain"
    # infini-router's size-based routing: a prompt of more bytes goes to a service whose
    # metadata.cache_type is "static", if the model has one; also CACHE_TYPE_ROUTING_THRESHOLD.
    cache_type_routing_threshold: int = CACHE_TYPE_ROUTING_THRESHOLD
    # DNS discovery (discovery.py): dns://NAME:PORT and srv://_service._proto.NAME.
    discover: list[str] = []
    discover_interval: float = 10.0
    dns_server: str | None = None  # HOST[:PORT]; default: the system's resolver
    # Kubernetes discovery (kube.py): the pods a label selector picks, watched.
    k8s_selector: list[str] = []  # KEY=VALUE terms, all of which a pod's labels match
    k8s_prefill_selector: list[str] = []  # pods that are prefill services (journey/pair.py)
    k8s_decode_selector: list[str] = []  # pods that are decode services
    k8s_namespace: str | None = None  # default: the router pod's own (or the kubeconfig's)
    k8s_port: int = 8000  # unless a pod's lmproxy.io/port annotation says otherwise
    kubeconfig: str | None = None  # outside a cluster; inside, the service account
    service_discovery: bool = False  # the Rust routers' switch; a selector is what counts
    discover_scheme: str = "http"  # of discovered services (DNS and Kubernetes)
    service_removal_grace_period: float = 60.0
    # Tracing (tracing.py): W3C trace context always; OTLP spans with an endpoint.
    otlp_endpoint: str | None = None  # http(s)://collector:4318/v1/traces
    otel_sample_ratio: float = 1.0
    # Prefill/decode disaggregation (journey/pair.py): the protocol, and each side's strategy.
    pd_mode: str = "vllm"
    prefill_strategy: str = "cache-aware"
    decode_strategy: str = "least-outstanding"
    workers: int = 1  # 0: one per core ("auto" on the command line)
    # A worker silent this long (no heartbeat) is killed and replaced; 0: never.
    worker_timeout: float = 10.0
    log_level: str = "info"
    access_log: str = "off"
    demo: bool = False
    demo_pd: bool = False  # --demo --pd: a disaggregated demo fleet
    # Serving HTTPS (uvicorn's names); tls.py.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_keyfile_password: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int = 0  # 0: no client certificate, 1: optional, 2: required
    # TLS to https:// backends, unless a service sets its own (ca=, cert=, key=, verify=).
    backend_ca_certs: str | None = None
    backend_certfile: str | None = None
    backend_keyfile: str | None = None
    backend_verify: bool = True

    @property
    def breaker_settings(self) -> tuple[int, int, float]:
        """Every service's circuit breaker's: failure threshold (0: no breaker), success
        threshold, seconds open."""
        return (self.cb_failure_threshold, self.cb_success_threshold, self.cb_timeout_duration_secs)

    def validate(self) -> None:
        positive = {
            "health_interval": self.health_interval,
            "health_timeout": self.health_timeout,
            "connect_timeout": self.connect_timeout,
            "request_timeout": self.request_timeout,
            "max_body_size": self.max_body_size,
            "keepalive_timeout": self.keepalive_timeout,
            "header_timeout": self.header_timeout,
            "handshake_timeout": self.handshake_timeout,
            "body_timeout": self.body_timeout,
            "send_timeout": self.send_timeout,
            "pool_idle_timeout": self.pool_idle_timeout,
            "registry_sync_interval": self.registry_sync_interval,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for name, value in {
            "max_errors": self.max_errors,
            "retries": self.retries,
            "pool_max_idle": self.pool_max_idle,
            "shutdown_timeout": self.shutdown_timeout,
            "max_connections": self.max_connections,
            "max_connections_per_ip": self.max_connections_per_ip,
            "max_handshakes": self.max_handshakes,
            "queue_timeout": self.queue_timeout,
            "registration_ttl": self.registration_ttl,
            "load_interval": self.load_interval,
            "service_removal_grace_period": self.service_removal_grace_period,
            "workers": self.workers,
            "max_queue": self.max_queue,
            "worker_timeout": self.worker_timeout,
            "max_concurrent_requests": self.max_concurrent_requests,
            "cb_failure_threshold": self.cb_failure_threshold,
            "cb_success_threshold": self.cb_success_threshold,
            "cb_timeout_duration_secs": self.cb_timeout_duration_secs,
        }.items():
            if value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if 0 < self.worker_timeout < MIN_WORKER_TIMEOUT_S:
            raise ConfigError(
                f"--worker-timeout must be 0 (off) or at least {MIN_WORKER_TIMEOUT_S:g} "
                f"seconds, got {self.worker_timeout:g}"
            )
        if self.compat not in COMPAT:
            raise ConfigError(f"--compat must be none or infinilm, got {self.compat!r}")
        if self.error_format not in ERROR_FORMATS:
            raise ConfigError(f"--error-format must be plain or openai, got {self.error_format!r}")
        if self.cache_type_routing_threshold < 0:
            raise ConfigError(
                "--cache-type-routing-threshold must be >= 0 bytes, got "
                f"{self.cache_type_routing_threshold}"
            )
        if self.access_log not in ("off", "text", "json"):
            raise ConfigError(f"--access-log must be off, text or json, got {self.access_log!r}")
        if self.registry_url is not None:
            check_http_url("--registry-url", self.registry_url, "http://127.0.0.1:8081")
        if not 0.0 <= self.otel_sample_ratio <= 1.0:
            raise ConfigError(
                f"--otel-sample-ratio must be between 0 and 1, got {self.otel_sample_ratio}"
            )
        if self.otlp_endpoint is not None:
            check_http_url("--otlp-endpoint", self.otlp_endpoint, "http://127.0.0.1:4318/v1/traces")
        if self.demo_pd and not self.demo:
            raise ConfigError("--pd is an option of --demo: give --demo --pd")
        if self.discover_interval <= 0:
            raise ConfigError(f"--discover-interval must be > 0, got {self.discover_interval}")
        for target in self.discover:
            parse_discover(target)
        if self.dns_server is not None:
            parse_dns_server(self.dns_server)
        for selector in (self.k8s_selector, self.k8s_prefill_selector, self.k8s_decode_selector):
            parse_selector(selector)
        any_selector = self.k8s_selector or self.k8s_prefill_selector or self.k8s_decode_selector
        if self.service_discovery and not any_selector:
            raise ConfigError(
                "--service-discovery needs a label selector: give --k8s-selector KEY=VALUE "
                "(or --selector KEY=VALUE), which picks the engine pods"
            )
        if not 0 < self.k8s_port < 65536:
            raise ConfigError(f"--k8s-port must be 1-65535, got {self.k8s_port}")
        if self.k8s_namespace is not None and not _NAMESPACE.match(self.k8s_namespace):
            raise ConfigError(
                f"--k8s-namespace {self.k8s_namespace!r} is not a namespace name "
                "(lower-case letters, digits and '-', at most 63)"
            )
        check_model_policies(self.aliases, self.models)
        for where, mode in [("--pd-mode", self.pd_mode)] + [
            (f"models.{name!r}.pd_mode", s.pd_mode) for name, s in self.models.items()
        ]:
            if mode is not None and mode not in PD_MODES:
                raise ConfigError(f"{where} must be vllm or sglang, got {mode!r}")
        if self.discover_scheme not in ("http", "https"):
            raise ConfigError(
                f"--discover-scheme must be http or https, got {self.discover_scheme!r}"
            )
        if self.ssl_cert_reqs not in (0, 1, 2):
            raise ConfigError(
                f"--ssl-cert-reqs must be 0 (none), 1 (optional) or 2 (required), "
                f"got {self.ssl_cert_reqs}"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0-65535, got {self.port}")
        if not 0 <= self.prometheus_port <= 65535:
            raise ConfigError(f"--prometheus-port must be 0-65535, got {self.prometheus_port}")
        if self.prometheus_port and self.workers != 1:
            raise ConfigError(
                "--prometheus-port serves one process's /metrics; with --workers, scrape "
                "/metrics on --port, which sums every worker's (or run --workers 1)"
            )
        if self.prometheus_port and self.prometheus_port == self.port:
            raise ConfigError(
                f"--prometheus-port {self.prometheus_port} is also --port: give the metrics "
                "listener a port of its own, or drop it (/metrics is on --port too)"
            )
        if any(not key.strip() for key in self.api_keys):
            raise ConfigError(
                "an API key is empty (--api-key '' or api_keys in the config; was it set from "
                "an unset variable?); give a real key, or none to leave the API open"
            )
        if self.admin_token is not None and not self.admin_token.strip():
            raise ConfigError(
                "--admin-token is empty (was it set from an unset variable?); give a real "
                "token, or none to keep the admin API to loopback clients"
            )
        check_keys(self.keys, self.api_keys)
        if self.redis_url is not None:
            parts = urlsplit(self.redis_url)
            if parts.scheme not in ("redis", "rediss", "unix", "valkey", "valkeys"):
                raise ConfigError(
                    f"--redis-url {self.redis_url!r} must be a redis://, rediss:// or unix:// URL "
                    "(e.g. redis://127.0.0.1:6379/0)"
                )
            if not self.keys:
                raise ConfigError(
                    "--redis-url shares the limits of [[keys]] across replicas, and the config "
                    "has no [[keys]]; add them, or drop --redis-url"
                )
        names: set[str] = set()
        for spec in self.services:
            if spec.name in names:
                raise ConfigError(
                    f"two services are named {spec.name!r}; give each --backend a unique "
                    "name (NAME=URL)"
                )
            names.add(spec.name)
            if self.port and points_at(spec, self.host, self.port):
                raise ConfigError(
                    f"service {spec.name!r} at {spec.url} is this router's own address "
                    f"({self.host}:{self.port}): requests would loop; give the backend's address"
                )

    @property
    def binds_publicly(self) -> bool:
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host != "localhost"


def check_http_url(flag: str, url: str, example: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{flag} {url!r} must be an http:// or https:// URL (e.g. {example})")


def check_keys(keys: list[KeySpec], api_keys: list[str]) -> None:
    """Each [[keys]] entry is whole, and names and secrets are each one entry's."""
    names: set[str] = set()
    digests = {hashlib.sha256(k.encode()).digest() for k in api_keys}
    for spec in keys:
        spec.check()
        if spec.name in names:
            raise ConfigError(f"two [[keys]] are named {spec.name!r}; give each its own name")
        names.add(spec.name)
        digest = spec.digest
        if digest in digests:
            raise ConfigError(
                f"[[keys]] {spec.name!r}: its key is also another entry's (or an --api-key); "
                "one secret must name one key"
            )
        digests.add(digest)


def check_model_policies(aliases: dict[str, str], models: dict[str, ModelSettings]) -> None:
    """Aliases name served models, not other aliases; no fallback chain comes back to a
    model it started from (it would never end); ConfigError saying which."""
    for alias, target in aliases.items():
        if not alias or not target:
            raise ConfigError(f"[aliases] {alias!r} = {target!r}: both names must be given")
        if target in aliases:
            raise ConfigError(
                f"[aliases] {alias!r} names {target!r}, which is an alias itself; name the "
                f"served model ({aliases[target]!r})"
            )

    def visit(path: list[str]) -> None:
        settings = models.get(path[-1])
        for nxt in settings.fallbacks if settings else []:
            if nxt in path:
                chain = " -> ".join([*path, nxt])
                raise ConfigError(f"models.{path[0]!r}.fallbacks loops ({chain}): a chain must end")
            visit([*path, nxt])

    for model in models:
        visit([model])


def fallback_chain(models: dict[str, ModelSettings], model: str) -> list[str]:
    """The models to try after ``model``, in order: its fallbacks, each followed by its
    own (depth first), none twice."""
    chain: list[str] = []

    def visit(current: str) -> None:
        settings = models.get(current)
        for nxt in settings.fallbacks if settings else []:
            if nxt != model and nxt not in chain:
                chain.append(nxt)
                visit(nxt)

    visit(model)
    return chain


def points_at(spec: ServiceSpec, host: str, port: int) -> bool:
    """Whether ``spec``'s URL is, as far as can be told without DNS, the router's own
    listening address ``host:port`` (a Via header catches every other loop)."""
    if spec.port != port:
        return False
    target, host = _address(spec.host), _address(host)
    if target == host:
        return True
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: any local address is us
        return target in _LOCAL or target.startswith("127.")
    return {target, host} <= {"localhost", "127.0.0.1", "::1"}


_LOCAL = frozenset({"localhost", "::1", "0.0.0.0", "::"})


def _address(host: str) -> str:
    host = host.lower().strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


# --- --discover and --dns-server (discovery.py) ------------------------------------

KINDS = ("dns", "srv")


class Target(NamedTuple):
    text: str  # as given, for the log
    kind: str  # "dns" or "srv"
    name: str
    port: int  # dns://: the services' port; srv://: 0 (each record has its own)


def parse_discover(text: str) -> Target:
    """``dns://NAME:PORT`` or ``srv://_service._proto.NAME``; ConfigError otherwise."""
    parts = urlsplit(text)
    if parts.scheme not in KINDS or not parts.hostname:
        raise ConfigError(
            f"--discover {text!r}: give dns://NAME:PORT (A/AAAA records) or "
            "srv://_service._proto.NAME (SRV records)"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"--discover {text!r}: {exc}") from None
    if parts.scheme == "dns" and not port:
        raise ConfigError(f"--discover {text!r}: dns:// needs the services' port (NAME:PORT)")
    if parts.scheme == "srv" and port:
        raise ConfigError(f"--discover {text!r}: srv:// takes each record's own port")
    return Target(text, parts.scheme, parts.hostname, port or 0)


def parse_dns_server(server: str) -> tuple[str, int]:
    host, sep, port = server.rpartition(":")
    if not sep or "]" in port or (host.count(":") and not host.startswith("[")):
        host, port = server, "53"  # a bare address, IPv6 included
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        raise ConfigError(
            f"--dns-server {server!r}: give the resolver's IP address, and its port if not "
            "53 (127.0.0.1:5353)"
        ) from None
    return host, number


# --- --k8s-selector and --k8s-namespace (kube.py) ------------------------------------

_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def parse_selector(items: list[str]) -> list[str]:
    """``KEY=VALUE`` terms, checked as the API server checks label keys and values
    (a term it would refuse is better refused at start-up)."""
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise ConfigError(
                f"--k8s-selector {item!r}: give KEY=VALUE with a label key and value "
                "(e.g. app=vllm or app.kubernetes.io/name=vllm)"
            )
    return items


# --- --backend NAME=URL,weight=N,model=M,health=/path -------------------------------

_BACKEND_KEYS = (
    "weight",
    "model",
    "health",
    "max_in_flight",
    "ca",
    "cert",
    "key",
    "verify",
    "role",
    "bootstrap_port",
)
_BACKEND_OPTIONS = (
    "weight=N, model=NAME (repeatable), health=/path, max_in_flight=N, role=prefill|decode "
    "(bootstrap_port=N for an SGLang prefill), and for https:// ca=FILE, cert=FILE, key=FILE "
    "and verify=false"
)


def parse_backend(text: str) -> ServiceSpec:
    """Parse one ``--backend`` value:
    ``[NAME=]URL[,weight=N][,model=M]...[,health=/path][,max_in_flight=N]``."""
    url, *options = text.split(",")
    name = ""
    head, sep, rest = url.partition("=")
    if sep and "://" not in head:
        name, url = head, rest
    numbers = {"weight": 1, "max_in_flight": 0, "bootstrap_port": 0}
    role = "both"
    models: list[str] = []
    health = "/health"
    files: dict[str, str] = {}
    verify: bool | None = None
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in _BACKEND_KEYS:
            raise ConfigError(
                f"--backend {text!r}: unknown option {option!r}; options are {_BACKEND_OPTIONS}"
            )
        if key in ("ca", "cert", "key"):
            files[key] = value
        elif key == "verify":
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"--backend {text!r}: verify must be true or false")
            verify = value.lower() == "true"
        elif key in numbers:
            try:
                numbers[key] = int(value)
            except ValueError:
                raise ConfigError(f"--backend {text!r}: {key} must be an integer") from None
        elif key == "model":
            models.append(value)
        elif key == "role":
            role = value
        else:
            health = value
    try:
        return ServiceSpec(
            url=url,
            name=name,
            models=models,
            health_path=health,
            weight=numbers["weight"],
            max_in_flight=numbers["max_in_flight"],
            ca=files.get("ca"),
            cert=files.get("cert"),
            key=files.get("key"),
            verify=verify,
            role=role,
            bootstrap_port=numbers["bootstrap_port"] or None,
        )
    except msgspec.ValidationError as exc:
        raise ConfigError(f"--backend {text!r}: {exc}") from None


def parse_prefill(values: list[str]) -> ServiceSpec:
    """``--prefill URL [BOOTSTRAP_PORT]``, as the Rust routers take it (the port may be
    ``none``); the URL may carry ``--backend``'s options."""
    if not 1 <= len(values) <= 2:
        raise ConfigError("--prefill takes URL [BOOTSTRAP_PORT]")
    spec = parse_backend(values[0] + ",role=prefill")
    if len(values) == 2 and values[1].lower() != "none":
        if not values[1].isdigit():
            raise ConfigError(f"--prefill {' '.join(values)}: the bootstrap port must be a number")
        spec = msgspec.structs.replace(spec, bootstrap_port=int(values[1]))
    return spec


# --- the TOML file --------------------------------------------------------------


def load_toml(path: str) -> dict[str, Any]:
    """Read the config file into plain values; keys use underscores or dashes."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}") from None
    try:
        data = msgspec.toml.decode(raw)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    return {key.replace("-", "_"): value for key, value in data.items()}


def build_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> Config:
    """Merge file and command line into a validated Config."""
    merged = {**file_values}
    cli_services = cli_values.pop("services", [])
    merged.update({k: v for k, v in cli_values.items() if v is not None})
    if merged.get("workers") == "auto":
        merged["workers"] = 0
    try:
        config = msgspec.convert(merged, Config, str_keys=True)
    except (msgspec.ValidationError, ConfigError) as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
    config.services = [*config.services, *cli_services]
    if config.static_services:
        config.services.extend(load_static_services(config.static_services))
    threshold = os.environ.get(THRESHOLD_ENV)
    if threshold is not None and "cache_type_routing_threshold" not in merged:
        # infini-router's setting, read as it reads it; the flag or the file wins.
        if not threshold.strip().isdigit():
            raise ConfigError(
                f"{THRESHOLD_ENV}={threshold!r} must be a number of bytes (e.g. 51200)"
            )
        config.cache_type_routing_threshold = int(threshold)
    env_keys = os.environ.get("LMPROXY_API_KEYS", "")
    config.api_keys = [*config.api_keys, *(k.strip() for k in env_keys.split(",") if k.strip())]
    if config.admin_token is None and os.environ.get("LMPROXY_ADMIN_TOKEN"):
        config.admin_token = os.environ["LMPROXY_ADMIN_TOKEN"]
    if config.workers == 0:
        config.workers = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
    config.validate()
    return config


# --- InfiniLM-SVC static services JSON --------------------------------------------


class _Metadata(msgspec.Struct):
    type: str | None = None
    models: list[str] | None = None
    model: str | None = None
    models_list: list[dict[str, Any]] | None = None
    role: str | None = None  # disaggregation: "prefill" or "decode"
    bootstrap_port: int | None = None


class _StaticEntry(msgspec.Struct):
    name: str | None = None
    host: str | None = None
    port: int | None = None
    url: str | None = None
    weight: int = 1
    metadata: _Metadata = msgspec.field(default_factory=_Metadata)
    health_path: str = "/health"
    models: list[str] | None = None
    max_in_flight: int = 0
    role: str | None = None  # or in metadata
    bootstrap_port: int | None = None


def load_static_services(path: str) -> list[ServiceSpec]:
    """Every variant the InfiniLM-SVC routers accept.

    ``{"services": [...]}``, a bare ``[...]``, or ``{"static_services": [...]}``;
    models in ``metadata.models``, ``metadata.model`` or ``metadata.models_list``;
    ``metadata.type`` may be absent, and entries of another type are skipped as
    the seed's registry does.
    """
    try:
        data = decode.json(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read static services file {path!r}: {exc.strerror}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"static services file {path!r} is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        entries = data.get("services", data.get("static_services"))
        if isinstance(entries, dict):  # {"static_services": {"services": [...]}}
            entries = entries.get("services")
    else:
        entries = data
    if not isinstance(entries, list):
        raise ConfigError(
            f"static services file {path!r}: expected a list of services, "
            '{"services": [...]} or {"static_services": [...]}'
        )
    specs = []
    for index, item in enumerate(entries):
        try:
            spec = spec_from_entry(item)
        except ConfigError as exc:
            raise ConfigError(f"static services file {path!r}, entry {index}: {exc}") from None
        if spec is not None:
            specs.append(spec)
    return specs


def entry_url(url: str | None, host: str | None, port: int | None) -> str:
    """An InfiniLM-style entry's address: its ``url``, else ``host`` and ``port``."""
    if url:
        return url
    if host and port:
        return f"http://{host}:{port}"
    raise ConfigError("needs host and port, or url")


def kept_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """What the router keeps of a registration's metadata: all of it within MAX_METADATA
    bytes of JSON; past that, its scalar fields (type, cache_type, ...), which routing
    and listings read. The bulk of a large one is ``models_list``, taken as models."""
    if len(encode_json(metadata)) <= MAX_METADATA:
        return metadata
    scalars = {
        k: v
        for k, v in metadata.items()
        if isinstance(v, bool | int | float | None) or (isinstance(v, str) and len(v) <= 256)
    }
    kept: dict[str, Any] = {}
    size = 2
    for key, value in scalars.items():
        size += len(encode_json({key: value}))
        if size > MAX_METADATA:
            break
        kept[key] = value
    return kept


def spec_from_entry(item: Any) -> ServiceSpec | None:
    """One service in the InfiniLM-SVC format (static files, its registry, registrations);
    None for an entry of another ``metadata.type``, which the InfiniLM router skips too."""
    try:
        entry = msgspec.convert(item, _StaticEntry)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None
    meta = entry.metadata
    if meta.type not in (None, "openai-api"):
        return None
    url = entry_url(entry.url, entry.host, entry.port)
    models = list(meta.models or [])
    if meta.model:
        models.append(meta.model)
    cards = [
        ModelCard(
            str(m["id"]),
            m.get("created") if isinstance(m.get("created"), int) else None,
            m.get("owned_by") if isinstance(m.get("owned_by"), str) else None,
        )
        for m in meta.models_list or []
        if "id" in m
    ]
    models.extend(card.id for card in cards)
    models.extend(entry.models or [])
    raw = item.get("metadata") if isinstance(item, dict) else None
    try:
        return ServiceSpec(
            url=url,
            name=entry.name or "",
            weight=entry.weight,
            models=list(dict.fromkeys(models)),
            health_path=entry.health_path,
            max_in_flight=entry.max_in_flight,
            model_cards=cards,
            role=entry.role or meta.role or "both",
            bootstrap_port=entry.bootstrap_port or meta.bootstrap_port,
            metadata=kept_metadata(raw) if isinstance(raw, dict) else {},
        )
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None
