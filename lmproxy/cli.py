"""The command line: flags + config file -> Config, then run the router."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from types import ModuleType
from typing import Any

import strategies
from lmproxy import __version__, launchers
from lmproxy.config import (
    PD_MODES,
    Config,
    ConfigError,
    build_config,
    load_toml,
    parse_backend,
    parse_prefill,
)
from lmproxy.errors import COMPAT, ERROR_FORMATS
from lmproxy.telemetry import logs

DEFAULTS = Config()
_log = logging.getLogger("lmproxy")

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """Bytes from '33554432', '32MiB', '32m', '512k'..."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1048576, 512KiB or 32MiB)")
    number, unit = match.groups()
    return int(number) * _UNITS[(unit or "")[:1].lower()]


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def _workers(text: str) -> int:
    if text == "auto":
        return 0
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 1:
        raise argparse.ArgumentTypeError(f"--workers takes a count >= 1 or 'auto', got {text!r}")
    return count


def _backend(text: str) -> Any:
    if "://" not in text and text.lower() in _RUST_BACKENDS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a service: lmproxy's --backend takes [NAME=]URL. sglang-router's "
            "--backend (the runtime: sglang, openai) has no counterpart: drop it; lmproxy "
            "routes to HTTP services, whatever engine serves them"
        )
    try:
        return parse_backend(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_RUST_BACKENDS = ("sglang", "openai", "vllm", "trtllm", "grpc")


def _log_level(text: str) -> str:
    """lmproxy's levels, and the Rust routers' names for two of them."""
    return {"warn": "warning", "critical": "error"}.get(text.lower(), text.lower())


def _concurrency(text: str) -> int:
    """A count >= 0, and the Rust routers' -1 (no limit), which is lmproxy's 0."""
    try:
        count = int(text)
    except ValueError:
        count = -2
    if count < -1:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 (0: no limit), got {text!r}")
    return max(count, 0)


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    parser = argparse.ArgumentParser(
        prog="lmproxy",
        description=(
            "A fast OpenAI-compatible router for LLM inference services. It sends each\n"
            "request to a healthy backend service that serves the request's model and\n"
            "streams the answer back. A drop-in for the InfiniLM-SVC router."
        ),
        epilog=(
            "examples:\n"
            "  lmproxy --demo                      router + two simulated backends\n"
            "  lmproxy --demo --pd --pd-mode sglang  ... with Qwen3-32B disaggregated\n"
            "  lmproxy --backend a=http://10.0.0.5:8100 --backend http://10.0.0.6:8100,weight=2\n"
            "  lmproxy --config lmproxy.toml --port 9000\n"
            "  lmproxy --static-services services.json --router-port 8000\n"
            "  lmproxy --k8s-selector app=vllm     the Ready pods labelled app=vllm\n\n"
            "Every option can also be set in the TOML config file, with underscores\n"
            "(health_interval = 10); the command line wins over the file.\n\n"
            "sglang-router's and vllm-router's launcher flags are taken too (--worker-urls,\n"
            "--policy, --retry-max-retries...; see docs/configuration.md); given any of\n"
            "them, --any-model is on unless --no-any-model says otherwise."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lmproxy {__version__}")
    g = parser.add_argument_group("serving")
    g.add_argument("--host", help=f"address to listen on (default: {d.host})")
    g.add_argument(
        "--port",
        "--router-port",
        dest="port",
        type=int,
        help=f"port to listen on; 0 picks a free one (default: {d.port})",
    )
    g.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config file (see README); SIGHUP re-reads it and applies services and strategy",
    )
    g.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help=(
            "serving processes sharing the port (SO_REUSEPORT); 'auto' = one per core. "
            "A supervisor probes services once for all and restarts a worker that dies "
            f"(default: {d.workers})"
        ),
    )
    g.add_argument(
        "--worker-timeout",
        type=float,
        metavar="S",
        help=(
            "with --workers: a worker that sends no heartbeat for S seconds (stopped, or "
            "its loop stuck) is killed and replaced, as one that dies is; 0 = never "
            f"(default: {d.worker_timeout:g})"
        ),
    )
    g.add_argument(
        "--demo",
        action="store_true",
        default=None,
        help="also start two simulated backends (models Qwen3-32B and 9g_8b_thinking)",
    )
    g.add_argument(
        "--pd",
        dest="demo_pd",
        action="store_true",
        default=None,
        help=(
            "with --demo: serve Qwen3-32B disaggregated, by two prefill and two decode "
            "simulators speaking --pd-mode's protocol"
        ),
    )
    g.add_argument(
        "--log-level",
        type=_log_level,
        choices=["debug", "info", "warning", "error"],
        help=f"log verbosity; warn and critical are taken too (default: {d.log_level})",
    )
    g.add_argument(
        "--prometheus-port",
        type=int,
        metavar="PORT",
        help=(
            "also serve /metrics, and only it, on this port (sglang-router's flag; /metrics "
            "is on --port as well); 0 = none (default: 0)"
        ),
    )
    g.add_argument(
        "--prometheus-host",
        metavar="ADDRESS",
        help="address of the --prometheus-port listener (default: --host)",
    )
    g.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help=(
            "export one OpenTelemetry span per proxied request to this OTLP/HTTP traces "
            "URL (e.g. http://127.0.0.1:4318/v1/traces; needs pip install 'lmproxy[otel]'). "
            "W3C traceparent is passed to backends with or without it"
        ),
    )
    g.add_argument(
        "--otel-sample-ratio",
        type=float,
        metavar="R",
        help=(
            "share of new traces exported, 0-1; a caller's sampled traceparent is always "
            f"followed (default: {d.otel_sample_ratio:g})"
        ),
    )
    g.add_argument(
        "--access-log",
        choices=["off", "text", "json"],
        help=(
            "one line per request (model, service, status, bytes, time to first byte, "
            f"total time, request id) on stderr (default: {d.access_log})"
        ),
    )
    g = parser.add_argument_group("services")
    g.add_argument(
        "--backend",
        action="append",
        type=_backend,
        dest="services",
        metavar="[NAME=]URL[,OPT]",
        help=(
            "a backend service; repeatable. Options after commas: weight=N, model=NAME "
            "(repeatable; otherwise models are discovered from /v1/models), health=/path, "
            "max_in_flight=N (requests at once; more wait in the queue), role=prefill|decode "
            "(and bootstrap_port=N; see disaggregation below); for an https:// "
            "URL, ca=FILE, cert=FILE, key=FILE and verify=false (see TLS below). "
            "e.g. service_9g8b_8100=http://10.0.0.5:8100,weight=2"
        ),
    )
    g.add_argument(
        "--static-services",
        metavar="FILE",
        help="InfiniLM-SVC static services JSON file",
    )
    g.add_argument(
        "--health-interval",
        "--health-check-interval-secs",
        dest="health_interval",
        type=float,
        metavar="S",
        help=f"seconds between active health checks (default: {d.health_interval:g})",
    )
    g.add_argument(
        "--health-timeout",
        "--health-check-timeout-secs",
        dest="health_timeout",
        type=float,
        metavar="S",
        help=f"seconds a health check may take (default: {d.health_timeout:g})",
    )
    g.add_argument(
        "--load-interval",
        type=float,
        metavar="S",
        help=(
            "seconds between scrapes of each service's /metrics for the engine's own load "
            "(vLLM's or SGLang's running and waiting requests), which the load-aware "
            f"strategies add to the router's count; 0 turns it off (default: {d.load_interval:g})"
        ),
    )
    g.add_argument(
        "--max-errors",
        type=int,
        metavar="N",
        help=(
            "consecutive failed requests that eject a service until its next passing "
            f"health check; 0 never ejects (default: {d.max_errors})"
        ),
    )
    g.add_argument(
        "--registry-url",
        metavar="URL",
        help=(
            "an InfiniLM-SVC registry (e.g. http://127.0.0.1:8081) polled for services "
            "(GET /services?healthy=true); the router's own checks still decide health"
        ),
    )
    g.add_argument(
        "--registry-sync-interval",
        type=float,
        metavar="S",
        help=f"seconds between registry polls (default: {d.registry_sync_interval:g})",
    )
    g = parser.add_argument_group("InfiniLM-SVC compatibility")
    g.add_argument(
        "--compat",
        choices=COMPAT,
        help=(
            "infinilm: answer with the InfiniLM routers' statuses where lmproxy's differ: "
            "503, not 502, for a backend that refuses connections, and 503, not 404, for a "
            "model no service lists (InfiniLM's clients retry on 503) (default: none)"
        ),
    )
    g.add_argument(
        "--error-format",
        choices=ERROR_FORMATS,
        help=(
            'shape of the router\'s own errors: plain {"error": "message"}, as the InfiniLM '
            'API document gives it, or openai {"error": {"message", "type", "param", "code"}}, '
            "whose message and code the OpenAI SDKs and litellm show (default: plain)"
        ),
    )
    g.add_argument(
        "--cache-type-routing-threshold",
        type=parse_size,
        metavar="SIZE",
        help=(
            "infini-router's size-based routing: a request whose prompt text is over SIZE "
            "bytes goes to the model's services whose metadata.cache_type is static, the "
            "rest to its other services; on only while some service is static. Also the "
            "CACHE_TYPE_ROUTING_THRESHOLD environment variable, as infini-router reads it "
            f"(default: {d.cache_type_routing_threshold} = 50 KiB)"
        ),
    )
    g.add_argument(
        "--discover",
        action="append",
        metavar="URL",
        help=(
            "find services in DNS; repeatable: dns://NAME:PORT (every A/AAAA record of NAME "
            "is a service at PORT: a Kubernetes headless Service, Docker Compose, Consul) or "
            "srv://_service._proto.NAME (every SRV record, at its own port)"
        ),
    )
    g.add_argument(
        "--discover-interval",
        type=float,
        metavar="S",
        help=f"seconds between DNS lookups of --discover names (default: {d.discover_interval:g})",
    )
    g.add_argument(
        "--dns-server",
        metavar="HOST[:PORT]",
        help="DNS server for --discover, asked alone (default: names resolve as on the "
        "rest of the machine, by getaddrinfo: /etc/hosts, nsswitch, DNS; SRV records "
        "from /etc/resolv.conf)",
    )
    g.add_argument(
        "--discover-scheme",
        choices=("http", "https"),
        help=(
            "scheme of the services --discover and --k8s-selector find; https uses the "
            f"--backend-* TLS settings (default: {d.discover_scheme})"
        ),
    )
    g.add_argument(
        "--k8s-selector",
        "--selector",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help=(
            "find services in Kubernetes: the pods whose labels match every KEY=VALUE "
            "(repeatable), listed then watched; a pod serves while Running and Ready. "
            "--selector takes the Rust routers' form (KEY=VALUE KEY=VALUE)"
        ),
    )
    g.add_argument(
        "--k8s-prefill-selector",
        "--prefill-selector",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help=(
            "as --k8s-selector, for pods that are prefill services (disaggregation); the "
            "lmproxy.io/bootstrap-port or sglang.ai/bootstrap-port annotation gives an SGLang "
            "prefill's bootstrap port"
        ),
    )
    g.add_argument(
        "--k8s-decode-selector",
        "--decode-selector",
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="as --k8s-selector, for pods that are decode services (disaggregation)",
    )
    g.add_argument(
        "--k8s-namespace",
        "--service-discovery-namespace",
        metavar="NAME",
        help=(
            "namespace of the --k8s-selector pods (default: the router pod's own, or the "
            "kubeconfig context's)"
        ),
    )
    g.add_argument(
        "--k8s-port",
        "--service-discovery-port",
        type=int,
        metavar="PORT",
        help=(
            "port of the --k8s-selector pods, unless a pod's lmproxy.io/port annotation "
            f"says otherwise (default: {d.k8s_port})"
        ),
    )
    g.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help=(
            "outside a cluster, the kubeconfig whose current context --k8s-selector uses "
            "(default: in a pod its service account, else $KUBECONFIG or ~/.kube/config)"
        ),
    )
    g.add_argument(
        "--service-discovery",
        action="store_const",
        const=True,
        help="accepted for the Rust routers' users: --k8s-selector alone turns discovery on",
    )
    g.add_argument(
        "--service-removal-grace-period",
        type=float,
        metavar="S",
        help=(
            "seconds a service that left the registry or DNS is kept "
            f"(default: {d.service_removal_grace_period:g})"
        ),
    )
    g.add_argument(
        "--admin-token",
        metavar="TOKEN",
        help=(
            "require 'Authorization: Bearer TOKEN' on the admin API (POST /services, "
            "DELETE /services/NAME, POST /services/NAME/heartbeat); also "
            "LMPROXY_ADMIN_TOKEN. Without one, the admin API answers loopback clients only"
        ),
    )
    g.add_argument(
        "--registration-ttl",
        type=float,
        metavar="S",
        help=(
            "seconds a registered service lives without a heartbeat, unless its registration "
            "gives a ttl; 0 = until deregistered (default: 0)"
        ),
    )
    g = parser.add_argument_group("requests")
    g.add_argument(
        "--connect-timeout",
        type=float,
        metavar="S",
        help=f"seconds to connect to a backend (default: {d.connect_timeout:g})",
    )
    g.add_argument(
        "--request-timeout",
        "--request-timeout-secs",
        dest="request_timeout",
        type=float,
        metavar="S",
        help=(
            "seconds to wait for a backend's response head, and the longest silence "
            f"between stream chunks; never limits a healthy stream (default: {d.request_timeout:g})"
        ),
    )
    g.add_argument(
        "--retries",
        type=int,
        metavar="N",
        help=(
            "times a request is retried on another service when it could not be delivered; "
            f"never once a response byte reached the client (default: {d.retries})"
        ),
    )
    g.add_argument(
        "--retry-on-5xx",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "retry a request whose service answered 500, 502, 503, 504 or 429 before any "
            "byte reached the client on another service, within --retries; the answer is "
            "dropped. With no other service or no retry left, it is relayed (default: "
            f"{'on' if d.retry_on_5xx else 'off'})"
        ),
    )
    g.add_argument(
        "--max-body-size",
        "--max-payload-size",
        dest="max_body_size",
        type=parse_size,
        metavar="SIZE",
        help=f"largest request body, e.g. 32MiB (default: {d.max_body_size // 2**20}MiB)",
    )
    g.add_argument(
        "--default-model",
        metavar="MODEL",
        help=(
            "model for requests that name none (default: the only served model if there is "
            "just one, else any healthy service, as the InfiniLM routers do)"
        ),
    )
    g.add_argument(
        "--require-model",
        action="store_true",
        default=None,
        help=(
            "answer 400 to a request that names no model while several models are served "
            "(and no --default-model is set), instead of sending it to any healthy service"
        ),
    )
    g.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help=(
            "require 'Authorization: Bearer KEY' on API endpoints; repeatable "
            "(also LMPROXY_API_KEYS, comma-separated). /health, /readiness and /liveness "
            "stay open. Keys with names, models, limits and priorities are [[keys]] "
            "in the --config file"
        ),
    )
    g.add_argument(
        "--queue-timeout",
        "--queue-timeout-secs",
        dest="queue_timeout",
        type=float,
        metavar="S",
        help=(
            "seconds a request waits for a free slot when every eligible service is at its "
            "max_in_flight, before 429 with Retry-After (408 when it waited for the router's "
            "--max-concurrent-requests); 0 = refuse at once "
            f"(default: {d.queue_timeout:g})"
        ),
    )
    g.add_argument(
        "--max-queue",
        type=int,
        metavar="N",
        help=(
            "requests that may wait for a slot at once; past it the lowest priority is "
            "shed with 429 (the newest of equals); 0 = no limit but --max-connections "
            f"(default: {d.max_queue})"
        ),
    )
    g.add_argument(
        "--max-concurrent-requests",
        type=_concurrency,
        metavar="N",
        help=(
            "requests under way at once in the whole router; past it they wait in the "
            "admission queue (--max-queue, --queue-timeout): 429 when it is full, 408 after "
            "--queue-timeout. -1 or 0 = no limit (default: 0)"
        ),
    )
    g.add_argument(
        "--redis-url",
        metavar="URL",
        help=(
            "keep the [[keys]] limits (rpm, tpm, max_in_flight) in Redis or valkey, so "
            "they hold across replicas (e.g. redis://127.0.0.1:6379/0; needs pip install "
            "'lmproxy[redis]'); while it cannot be reached, each router keeps them alone"
        ),
    )
    g.add_argument(
        "--redis-prefix",
        metavar="TEXT",
        help=(
            "prefix of the router's Redis keys, so that separate routers (not replicas of "
            f"one) can share a Redis (default: {d.redis_prefix})"
        ),
    )
    g = parser.add_argument_group("routing")
    g.add_argument(
        "--strategy",
        metavar="NAME",
        help=f"routing strategy, by name or module:Class (default: {d.strategy})",
    )
    g.add_argument(
        "--strategy-opt",
        action="append",
        type=_option,
        dest="strategy_options",
        metavar="KEY=VALUE",
        help="an option for the strategy; repeatable",
    )
    g.add_argument(
        "--list-strategies", action="store_true", help="list the installed strategies and exit"
    )
    g.add_argument(
        "--any-model",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "send a request whose model no service lists to the healthy services of the "
            "served models (the strategy chooses; the body is unchanged), as the Rust routers "
            "do with one model served, instead of 404. On when their launcher flags are used "
            "(default: off)"
        ),
    )
    g.add_argument(
        "--cb-failure-threshold",
        type=int,
        metavar="N",
        help=(
            "consecutive failures (5xx answers, connect failures) that open a service's "
            f"circuit breaker; 0 = no breaker (default: {d.cb_failure_threshold})"
        ),
    )
    g.add_argument(
        "--cb-success-threshold",
        type=int,
        metavar="N",
        help=(
            "successes of a half-open breaker's trial requests that close it "
            f"(default: {d.cb_success_threshold})"
        ),
    )
    g.add_argument(
        "--cb-timeout-duration-secs",
        type=float,
        metavar="S",
        help=(
            "seconds an open breaker keeps its service out before one trial request "
            f"(default: {d.cb_timeout_duration_secs:g})"
        ),
    )
    g.add_argument(
        "--disable-circuit-breaker",
        dest="cb_failure_threshold",
        action="store_const",
        const=0,
        help="--cb-failure-threshold 0",
    )
    g.add_argument(
        "--alias",
        action="append",
        type=_option,
        dest="aliases",
        metavar="PUBLIC=SERVED",
        help=(
            "a model name clients may use for a served model; repeatable (the config's "
            "[aliases] table; fallbacks are set per model there)"
        ),
    )
    g = parser.add_argument_group(
        "prefill/decode disaggregation",
        "A model with prefill and decode services is served in two steps: a prefill "
        "service computes the prompt's KV cache, a decode service generates from it.",
    )
    g.add_argument(
        "--prefill",
        action="append",
        nargs="+",
        metavar=("URL", "BOOTSTRAP_PORT"),
        help=(
            "a prefill service; repeatable. BOOTSTRAP_PORT: its SGLang bootstrap port "
            "(--disaggregation-bootstrap-port; omitted or 'none': the engine's default). "
            "The URL may carry --backend's options"
        ),
    )
    g.add_argument(
        "--decode",
        action="append",
        metavar="URL",
        help="a decode service; repeatable; the URL may carry --backend's options",
    )
    g.add_argument(
        "--pd-mode",
        choices=PD_MODES,
        help=(
            "the disaggregation protocol: vllm (prefill first, then decode with its "
            "kv_transfer_params; NIXL and other KV connectors) or sglang (both at once, with "
            f"a bootstrap room; Mooncake, NIXL); per model in the config (default: {d.pd_mode})"
        ),
    )
    g.add_argument(
        "--vllm-pd-disaggregation",
        dest="pd_mode",
        action="store_const",
        const="vllm",
        help="vllm-router's name for --pd-mode vllm",
    )
    g.add_argument(
        "--pd-disaggregation",
        dest="pd_mode",
        action="store_const",
        const="sglang",
        help="sglang-router's name for --pd-mode sglang",
    )
    g.add_argument(
        "--prefill-strategy",
        metavar="NAME",
        help=(
            "strategy that picks the prefill service, where the prompt's cached prefix "
            f"matters (default: {d.prefill_strategy})"
        ),
    )
    g.add_argument(
        "--decode-strategy",
        metavar="NAME",
        help=f"strategy that picks the decode service (default: {d.decode_strategy})",
    )
    g = parser.add_argument_group(
        "TLS",
        "Serving HTTPS takes uvicorn's flags; SIGHUP reloads the certificate.\n"
        "An https:// service is checked against the system's CA store (SSL_CERT_FILE\n"
        "and SSL_CERT_DIR apply) unless a CA bundle is given. A service may set its\n"
        "own: ca=, cert=, key= and verify=false in --backend, or in the config file.",
    )
    g.add_argument(
        "--ssl-certfile",
        "--tls-cert-path",
        dest="ssl_certfile",
        metavar="FILE",
        help="serve HTTPS with this certificate",
    )
    g.add_argument(
        "--ssl-keyfile",
        "--tls-key-path",
        dest="ssl_keyfile",
        metavar="FILE",
        help="its private key (default: in the certificate file)",
    )
    g.add_argument(
        "--ssl-keyfile-password", metavar="PASSWORD", help="the private key's passphrase"
    )
    g.add_argument(
        "--ssl-ca-certs",
        metavar="FILE",
        help="CA bundle that client certificates must be signed by (with --ssl-cert-reqs)",
    )
    g.add_argument(
        "--ssl-cert-reqs",
        type=int,
        choices=[0, 1, 2],
        help="client certificates: 0 not asked, 1 optional, 2 required (default: 0)",
    )
    g.add_argument(
        "--backend-ca-certs",
        metavar="FILE",
        help="CA bundle to check https:// services against, instead of the system's",
    )
    g.add_argument(
        "--backend-certfile",
        "--client-cert-path",
        dest="backend_certfile",
        metavar="FILE",
        help="client certificate for https:// services that require one (mTLS)",
    )
    g.add_argument(
        "--backend-keyfile",
        "--client-key-path",
        dest="backend_keyfile",
        metavar="FILE",
        help="its private key (default: in the certificate)",
    )
    g.add_argument(
        "--backend-no-verify",
        dest="backend_verify",
        action="store_const",
        const=False,
        default=None,
        help="do not check https:// services' certificates (warned about at start-up)",
    )
    g = parser.add_argument_group("connections")
    g.add_argument(
        "--pool-max-idle",
        type=int,
        metavar="N",
        help=f"idle keep-alive connections kept per service (default: {d.pool_max_idle})",
    )
    g.add_argument(
        "--pool-idle-timeout",
        type=float,
        metavar="S",
        help=f"seconds an idle backend connection is kept (default: {d.pool_idle_timeout:g})",
    )
    g.add_argument(
        "--keepalive-timeout",
        type=float,
        metavar="S",
        help=f"seconds an idle client connection is kept open (default: {d.keepalive_timeout:g})",
    )
    g.add_argument(
        "--header-timeout",
        type=float,
        metavar="S",
        help=(
            "seconds a client may take to send request headers, and a new connection to "
            f"begin its first request; past it 408 (default: {d.header_timeout:g})"
        ),
    )
    g.add_argument(
        "--body-timeout",
        type=float,
        metavar="S",
        help=(
            "longest silence while a request body is being received; past it the client "
            f"gets 408 and a close (default: {d.body_timeout:g})"
        ),
    )
    g.add_argument(
        "--send-timeout",
        type=float,
        metavar="S",
        help=(
            "longest a client may leave its answer unread (its receive buffer full); past "
            f"it the connection, and the backend's, is closed (default: {d.send_timeout:g})"
        ),
    )
    g.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help=(
            "client connections at once, counted from their accept (TLS handshakes "
            "included); past it new ones get 503 and are closed at once (default: 0 = "
            "as many as the open-file limit allows, leaving descriptors for backend "
            "connections and health checks; a larger N is capped at that)"
        ),
    )
    g.add_argument(
        "--max-connections-per-ip",
        type=int,
        metavar="N",
        help=(
            "connections one client address (an IPv6 /64) may hold at once, so that one "
            "client cannot take every slot; past it 503 (default: 0 = an eighth of "
            "--max-connections, at least 16; behind a load balancer that connects from "
            "a few addresses, set it to --max-connections)"
        ),
    )
    g.add_argument(
        "--max-handshakes",
        type=int,
        metavar="N",
        help=(
            "HTTPS: TLS handshakes in progress at once (each address its share of them, "
            "as of --max-connections); past it new connections are closed at once "
            "(default: 0 = a quarter of --max-connections, at most 1024)"
        ),
    )
    g.add_argument(
        "--handshake-timeout",
        type=float,
        metavar="S",
        help=(
            "HTTPS: seconds a new connection may take to finish its TLS handshake; then "
            "it is closed. --header-timeout counts from the handshake's end "
            f"(default: {d.handshake_timeout:g})"
        ),
    )
    g.add_argument(
        "--shutdown-timeout",
        "--shutdown-grace-period-secs",
        dest="shutdown_timeout",
        type=float,
        metavar="S",
        help=(
            "on SIGTERM/SIGINT, seconds to let requests in flight finish "
            f"(default: {d.shutdown_timeout:g})"
        ),
    )
    launchers.add_flags(parser)
    return parser


def load_config(argv: list[str] | None = None) -> Config | None:
    """Parse flags and the config file; None when the command only printed something."""
    return parse(sys.argv[1:] if argv is None else argv)[0]


def parse(argv: list[str]) -> tuple[Config | None, list[str]]:
    """The Config (None when the command only printed something), and the Rust routers'
    flags given that have no effect here (for the start-up warning)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if args.pop("list_strategies"):
        for name, summary in strategies.available().items():
            print(f"{name:20} {summary}")
        return None, []
    config_path = args.pop("config")
    file_values = load_toml(config_path) if config_path else {}
    if args.get("strategy_options") is not None:
        args["strategy_options"] = dict(args["strategy_options"])
    if args.get("aliases") is not None:
        args["aliases"] = {**file_values.get("aliases", {}), **dict(args["aliases"])}
    args["services"] = args["services"] or []
    for values in args.pop("prefill") or []:
        args["services"].append(parse_prefill(values))
    for url in args.pop("decode") or []:
        args["services"].append(parse_backend(url + ",role=decode"))
    notes = launchers.apply(args, argv)
    return build_config(file_values, args), notes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, notes = parse(argv)
    except ConfigError as exc:
        print(f"lmproxy: error: {exc}", file=sys.stderr)
        return 2
    if config is None:
        return 0
    logs.configure(config.log_level, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    rust = launchers.used(argv)
    if rust:
        _log.info(
            "sglang-router / vllm-router flags given (%s): --any-model is %s%s",
            " ".join(rust),
            "on" if config.any_model else "off",
            " (a request for a model no service lists goes to the served models' services; "
            "--no-any-model answers 404)"
            if config.any_model
            else "",
        )
    for flag in notes:
        _log.warning("%s has no effect in lmproxy: %s", flag, launchers.why(flag))
    uvloop: ModuleType | None
    try:
        import uvloop
    except ImportError:  # Windows: plain asyncio still works, only slower
        uvloop = None
    from lmproxy.startup import serve
    from lmproxy.workers.supervisor import supervise

    def reload() -> Config:
        config = load_config(argv)
        assert config is not None
        return config

    main_coro = serve(config, reload) if config.workers == 1 else supervise(config, reload)
    try:
        if uvloop is not None:
            uvloop.run(main_coro)
        else:
            asyncio.run(main_coro)
    except (strategies.StrategyError, ConfigError) as exc:
        print(f"lmproxy: error: {exc}", file=sys.stderr)
        return 2
    return 0
