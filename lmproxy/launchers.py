"""The Rust routers' launcher flags (sglang-router, now smg, and vllm-router).

So that their launchers (``python -m sglang_router.launch_router``, ``vllm-router``,
scripts and test fixtures written for them) can start lmproxy instead, every flag
they take is one of three kinds here, and none is dropped without a word:

- **mapped**: it sets lmproxy's own setting. Where the two mean the same, the Rust
  name is simply a second name of lmproxy's flag (``--max-payload-size`` is
  ``--max-body-size``); where they differ, the translation is in :func:`apply`
  (``--retry-max-retries N`` counts attempts, lmproxy's ``--retries`` counts
  retries: N - 1).
- **without effect**: a tuning knob of a mechanism lmproxy does differently, whose
  absence changes no answer (retry backoffs: lmproxy retries at once on another
  service). Accepted, and each one is named in one warning at start-up with the
  reason, since their own test fixtures pass them.
- **refused**: a feature lmproxy has not (gRPC workers, tokenizers, conversation
  history, the ``manual`` policy). Start-up stops with a message naming what to do
  instead.

Given any flag of the first two kinds that is not also lmproxy's own name,
``--any-model`` is on unless given: with one model served, the Rust routers send a
request for any model name to it.
"""

from __future__ import annotations

import argparse
from typing import Any

from lmproxy.config import ConfigError, ServiceSpec

# --policy NAME -> lmproxy strategy; the others are refused with the nearest one.
POLICIES = {
    "random": "random",
    "round_robin": "round-robin",
    "cache_aware": "cache-aware",
    "power_of_two": "power-of-two",
    # vllm-router's consistent hashing keeps a session on one worker: affinity's ring.
    "consistent_hash": "affinity",
}
NEAREST = {
    "manual": (
        "affinity",
        "it keeps a session (X-Session-ID, else the user field) on one service by "
        "consistent hashing, as manual keeps a routing key",
    ),
    "sticky_least_loaded": (
        "affinity",
        "a session stays on one service, and a loaded one passes it on (bounded loads)",
    ),
    "kv_aware": (
        "cache-aware",
        "it routes by the prompt prefixes each service was sent, without KV events",
    ),
    "bucket": ("cache-aware", "it places prompts by their prefix, and balances load"),
}

# Tuning knobs whose mechanism lmproxy does another way: accepted, warned about.
_AT_ONCE = "lmproxy retries at once, on another service, not after a backoff"
NO_EFFECT = {
    "--retry-initial-backoff-ms": _AT_ONCE,
    "--retry-max-backoff-ms": _AT_ONCE,
    "--retry-backoff-multiplier": _AT_ONCE,
    "--retry-jitter-factor": _AT_ONCE,
    "--cb-window-duration-secs": (
        "lmproxy's circuit breaker counts consecutive failures (--cb-failure-threshold), "
        "not failures within a window"
    ),
    "--worker-startup-timeout-secs": (
        "lmproxy does not wait for workers at start-up: each serves once it passes a health check"
    ),
    "--worker-startup-check-interval": (
        "lmproxy does not wait for workers at start-up: each serves once it passes a "
        "health check (--health-interval)"
    ),
    "--health-failure-threshold": (
        "a failed health check takes a service out at once, and --max-errors failed "
        "requests in a row do too"
    ),
    "--health-success-threshold": "one passing health check brings a service back",
    "--eviction-interval-secs": (
        "cache-aware forgets the oldest prefixes as it goes (its max_entries option, LRU)"
    ),
    "--max-tree-size": "cache-aware bounds its prefixes per service (its max_entries option)",
    "--enable-igw": "lmproxy always routes by model, to the services that serve it",
    "--request-id-headers": "lmproxy takes a request's id from X-Request-ID, and makes one without",
    "--kv-connector": (
        "with --pd-mode vllm the engines' own KV connector (NIXL, Mooncake) moves the KV cache"
    ),
}

# Features lmproxy has not: start-up stops, saying what to do instead.
_GRPC = "lmproxy routes HTTP (OpenAI API) services; it has no gRPC workers or tokenizer"
REFUSED = {
    "--dp-aware": "lmproxy has no data-parallel-aware routing; give each DP rank's HTTP URL "
    "as its own --worker-urls entry",
    "--intra-node-data-parallel-size": "lmproxy has no data-parallel-aware routing; give each "
    "DP rank's HTTP URL as its own --worker-urls entry",
    "--mini-lb": "lmproxy is its own load balancer; drop --mini-lb",
    "--disable-health-check": "lmproxy routes by its health checks; lengthen --health-interval "
    "instead",
    "--max-idle-secs": "it tunes the manual policy, which lmproxy has not (--policy "
    "consistent_hash, lmproxy's affinity, keeps sessions)",
    "--assignment-mode": "it tunes the manual policy, which lmproxy has not (--policy "
    "consistent_hash, lmproxy's affinity, keeps sessions)",
    "--bucket-adjust-interval-secs": "it tunes the bucket policy, which lmproxy has not",
    "--rate-limit-tokens-per-second": "lmproxy's --max-concurrent-requests counts requests "
    "under way, with no refill rate; per-key requests per minute are a [[keys]] rpm",
    "--cors-allowed-origins": "lmproxy sends no CORS headers; put a proxy that does in front "
    "of it for browser clients",
    "--log-dir": "lmproxy logs to stderr; redirect it (lmproxy ... 2>>router.log) or let "
    "systemd or Kubernetes keep it",
    "--prometheus-duration-buckets": "lmproxy's latency histograms have fixed buckets "
    "(docs/metrics.md)",
    "--enable-trace": "lmproxy exports OTLP over HTTP: give --otlp-endpoint "
    "http://COLLECTOR:4318/v1/traces",
    "--otlp-traces-endpoint": "lmproxy exports OTLP over HTTP: give --otlp-endpoint "
    "http://COLLECTOR:4318/v1/traces",
    "--control-plane-api-keys": "the admin API takes one token: --admin-token",
    "--control-plane-audit-enabled": "admin API changes are logged, one line each; there is "
    "no separate audit log",
    "--jwt-issuer": "the admin API takes a bearer token (--admin-token), not JWTs",
    "--jwt-audience": "the admin API takes a bearer token (--admin-token), not JWTs",
    "--jwt-jwks-uri": "the admin API takes a bearer token (--admin-token), not JWTs",
    "--jwt-role-mapping": "the admin API takes a bearer token (--admin-token), not JWTs",
    "--model-path": _GRPC,
    "--tokenizer-path": _GRPC,
    "--chat-template": _GRPC,
    "--tokenizer-cache-enable-l0": _GRPC,
    "--tokenizer-cache-l0-max-entries": _GRPC,
    "--tokenizer-cache-enable-l1": _GRPC,
    "--tokenizer-cache-l1-max-memory": _GRPC,
    "--reasoning-parser": _GRPC,
    "--tool-call-parser": _GRPC,
    "--mcp-config-path": "lmproxy has no MCP tool servers; the engines' own tool calling passes "
    "through",
    "--history-backend": "lmproxy keeps no conversation history; /v1/responses and "
    "conversations are the backends'",
    "--oracle-wallet-path": "lmproxy keeps no conversation history (no Oracle backend)",
    "--oracle-tns-alias": "lmproxy keeps no conversation history (no Oracle backend)",
    "--oracle-connect-descriptor": "lmproxy keeps no conversation history (no Oracle backend)",
    "--oracle-username": "lmproxy keeps no conversation history (no Oracle backend)",
    "--oracle-password": "lmproxy keeps no conversation history (no Oracle backend)",
    "--oracle-pool-min": "lmproxy keeps no conversation history (no Oracle backend)",
    "--oracle-pool-max": "lmproxy keeps no conversation history (no Oracle backend)",
    "--oracle-pool-timeout-secs": "lmproxy keeps no conversation history (no Oracle backend)",
    "--postgres-db-url": "lmproxy keeps no conversation history (no PostgreSQL backend)",
    "--postgres-pool-max": "lmproxy keeps no conversation history (no PostgreSQL backend)",
    "--redis-pool-max": "lmproxy keeps no conversation history; its --redis-url holds "
    "[[keys]] limits",
    "--redis-retention-days": "lmproxy keeps no conversation history; its --redis-url holds "
    "[[keys]] limits",
    "--router-temperature": "it tunes kv_aware, which lmproxy has not (--policy cache_aware is "
    "the nearest)",
    "--kv-penalty-host": "it tunes kv_aware, which lmproxy has not (--policy cache_aware is "
    "the nearest)",
    "--kv-penalty-external": "it tunes kv_aware, which lmproxy has not (--policy cache_aware "
    "is the nearest)",
    "--kv-penalty-disk": "it tunes kv_aware, which lmproxy has not (--policy cache_aware is "
    "the nearest)",
    "--kv-aware-session-affinity-ttl-secs": "it tunes kv_aware, which lmproxy has not "
    "(--policy consistent_hash, lmproxy's affinity, keeps sessions)",
    "--kv-event-source": "lmproxy reads no KV events; cache-aware routes by the prefixes it sent",
    "--kv-event-replay-source": "lmproxy reads no KV events; cache-aware routes by the "
    "prefixes it sent",
    "--kv-event-block-size": "lmproxy reads no KV events; cache-aware routes by the prefixes "
    "it sent",
    "--kv-event-model": "lmproxy reads no KV events; cache-aware routes by the prefixes it sent",
    "--pd-kv-events": "lmproxy reads no KV events; cache-aware routes by the prefixes it sent",
    "--vllm-discovery-address": "lmproxy finds services by --k8s-selector, --discover (DNS), "
    "--registry-url or POST /workers, not vLLM's discovery service",
    "--wasm-middleware": "lmproxy runs no WebAssembly middleware; a strategy plugin is its "
    "extension point (docs/strategies.md)",
    "--wasm-middleware-sha256": "lmproxy runs no WebAssembly middleware",
    "--wasm-middleware-route": "lmproxy runs no WebAssembly middleware",
    "--enable-program-scheduling": "lmproxy has no program-level scheduling",
    "--program-scheduling-config-json": "lmproxy has no program-level scheduling",
}

# The Rust names this module adds (not lmproxy's own): any of them turns --any-model on.
RUST_FLAGS = frozenset(
    {
        "--worker-urls",
        "--policy",
        "--prefill-policy",
        "--decode-policy",
        "--retry-max-retries",
        "--disable-retries",
        "--disable-circuit-breaker",
        "--max-payload-size",
        "--request-timeout-secs",
        "--queue-size",
        "--queue-timeout-secs",
        "--shutdown-grace-period-secs",
        "--health-check-interval-secs",
        "--health-check-timeout-secs",
        "--health-check-endpoint",
        "--cache-threshold",
        "--balance-abs-threshold",
        "--balance-rel-threshold",
        "--ca-cert-paths",
        "--client-cert-path",
        "--client-key-path",
        "--tls-cert-path",
        "--tls-key-path",
        *NO_EFFECT,
    }
)


class _Refuse(argparse.Action):
    """A flag lmproxy has no counterpart for: start-up stops here, saying why."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        raise ConfigError(
            f"{option_string} (sglang-router / vllm-router) is not supported: "
            f"{REFUSED[option_string or '']}"
        )


class _NoEffect(argparse.Action):
    """Accepted; named at start-up, with why it changes nothing here."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        seen: list[str] = getattr(namespace, self.dest) or []
        if option_string not in seen:
            seen.append(option_string or "")
        setattr(namespace, self.dest, seen)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The Rust-only flags that are not second names of lmproxy's own (cli.py has those)."""
    g = parser.add_argument_group(
        "sglang-router / vllm-router",
        "Their launcher flags, so that their launchers can start lmproxy (the table is in\n"
        "docs/configuration.md, 'Coming from sglang-router / vllm-router'). Any of them\n"
        "turns --any-model on unless --no-any-model is given. Flags of theirs for\n"
        "features lmproxy has not are refused with what to do instead.",
    )
    g.add_argument(
        "--worker-urls",
        nargs="*",
        dest="rust_worker_urls",
        metavar="URL",
        help="backend services, one --backend each",
    )
    choices = sorted([*POLICIES, *NEAREST])
    for flag, what in (
        ("--policy", "--strategy (and, unless given, the prefill and decode ones)"),
        ("--prefill-policy", "--prefill-strategy"),
        ("--decode-policy", "--decode-strategy"),
    ):
        g.add_argument(
            flag,
            dest="rust_" + flag[2:].replace("-", "_"),
            choices=choices,
            metavar="POLICY",
            help=(
                f"{what}: random, round_robin, cache_aware, power_of_two, consistent_hash "
                "(affinity); the others are refused with the nearest strategy"
            ),
        )
    g.add_argument(
        "--retry-max-retries",
        type=int,
        dest="rust_retry_max_retries",
        metavar="N",
        help="attempts in all, the first included: --retries N-1",
    )
    g.add_argument(
        "--disable-retries",
        action="store_true",
        default=None,
        dest="rust_disable_retries",
        help="--retries 0",
    )
    g.add_argument(
        "--queue-size",
        type=int,
        dest="rust_queue_size",
        metavar="N",
        help="--max-queue N; 0 (no queue: 429 at once) is --queue-timeout 0",
    )
    g.add_argument(
        "--health-check-endpoint",
        dest="rust_health_check_endpoint",
        metavar="PATH",
        help="the health path of the --worker-urls services",
    )
    for flag, option in (
        ("--cache-threshold", "min_match"),
        ("--balance-abs-threshold", "balance_abs"),
        ("--balance-rel-threshold", "balance_rel"),
    ):
        g.add_argument(
            flag,
            dest="rust_" + flag[2:].replace("-", "_"),
            metavar="X",
            help=f"cache-aware's {option} option (no effect with another strategy)",
        )
    g.add_argument(
        "--ca-cert-paths",
        nargs="*",
        dest="rust_ca_cert_paths",
        metavar="FILE",
        help="--backend-ca-certs (one bundle: concatenate several into one file)",
    )
    for flag in NO_EFFECT:
        g.add_argument(
            flag, nargs="*", action=_NoEffect, dest="rust_no_effect", help=argparse.SUPPRESS
        )
    for flag in REFUSED:
        g.add_argument(flag, nargs="*", action=_Refuse, dest="rust_refused", help=argparse.SUPPRESS)


def used(argv: list[str]) -> list[str]:
    """The Rust-only flags in ``argv``, in order, each once."""
    found: dict[str, None] = {}
    for token in argv:
        name = token.partition("=")[0]
        if name in RUST_FLAGS:
            found[name] = None
    return list(found)


def apply(args: dict[str, Any], argv: list[str]) -> list[str]:
    """Turn the Rust flags in ``args`` (argparse's values) into lmproxy's settings, in
    place; the flags given that have no effect, for the start-up warning."""
    if used(argv) and args.get("any_model") is None:
        args["any_model"] = True
    health = args.pop("rust_health_check_endpoint", None)
    for url in args.pop("rust_worker_urls", None) or []:
        try:
            spec = ServiceSpec(url=url, health_path=health or "/health")
        except ConfigError as exc:
            raise ConfigError(f"--worker-urls {url}: {exc}") from None
        args["services"].append(spec)
    policy = args.pop("rust_policy", None)
    sides = {
        "prefill_strategy": args.pop("rust_prefill_policy", None),
        "decode_strategy": args.pop("rust_decode_policy", None),
    }
    if policy is not None:
        args["strategy"] = strategy_of("--policy", policy)
        for side in sides:
            # sglang-router: --policy is the prefill's and decode's unless they are given.
            if sides[side] is None and args.get(side) is None:
                args[side] = args["strategy"]
    for side, given in sides.items():
        if given is not None:
            args[side] = strategy_of(f"--{side.split('_')[0]}-policy", given)
    attempts = args.pop("rust_retry_max_retries", None)
    if attempts is not None:
        if attempts < 1:
            raise ConfigError(
                f"--retry-max-retries {attempts}: it counts attempts, the first included; "
                "give 1 or more (1: no retry), or --disable-retries"
            )
        args["retries"] = attempts - 1
    if args.pop("rust_disable_retries", None):
        args["retries"] = 0
    size = args.pop("rust_queue_size", None)
    if size is not None:
        if size < 0:
            raise ConfigError(f"--queue-size must be >= 0, got {size}")
        args["max_queue"] = size
        if size == 0:
            args["queue_timeout"] = 0.0  # no queue: refused at once, as theirs does
    cas = args.pop("rust_ca_cert_paths", None)
    if cas:
        if len(cas) > 1:
            raise ConfigError(
                "--ca-cert-paths: lmproxy takes one CA bundle; concatenate them "
                f"(cat {' '.join(cas)} > bundle.pem) and give --backend-ca-certs bundle.pem"
            )
        args["backend_ca_certs"] = cas[0]
    notes = list(args.pop("rust_no_effect", None) or [])
    args.pop("rust_refused", None)
    tuning = {
        "min_match": args.pop("rust_cache_threshold", None),
        "balance_abs": args.pop("rust_balance_abs_threshold", None),
        "balance_rel": args.pop("rust_balance_rel_threshold", None),
    }
    given = {k: v for k, v in tuning.items() if v is not None}
    if given:
        if args.get("strategy") in (None, "cache-aware"):
            args["strategy_options"] = {**given, **(args.get("strategy_options") or {})}
        else:
            flags = {"min_match": "--cache-threshold", "balance_abs": "--balance-abs-threshold"}
            notes += [flags.get(k, "--balance-rel-threshold") for k in given]
    return notes


def strategy_of(flag: str, policy: str) -> str:
    """The lmproxy strategy of a Rust policy; ConfigError naming the nearest one."""
    strategy = POLICIES.get(policy)
    if strategy is not None:
        return strategy
    nearest, why = NEAREST[policy]
    rust = {v: k for k, v in POLICIES.items()}[nearest]
    raise ConfigError(
        f"{flag} {policy}: lmproxy has no such policy; the nearest is {flag} {rust} "
        f"(lmproxy's {nearest} strategy): {why}"
    )


def why(flag: str) -> str:
    """Why a flag given has no effect (the start-up warning)."""
    if flag in NO_EFFECT:
        return NO_EFFECT[flag]
    return "it tunes the cache_aware policy, and another one is in use"
