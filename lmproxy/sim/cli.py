"""``python -m lmproxy.sim`` (or ``python -m lmproxy.mock``): one simulated backend."""

from __future__ import annotations

import argparse
import asyncio
import ssl

from lmproxy.sim.engine import Engine
from lmproxy.sim.faults import FAULTS
from lmproxy.sim.metrics import DIALECTS
from lmproxy.sim.pd import Disaggregation
from lmproxy.sim.server import start_mock
from lmproxy.sim.state import MockState
from lmproxy.system import raise_open_file_limit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmproxy.mock",
        description="A simulated OpenAI-compatible LLM backend with fault modes, for tests, "
        "demos and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8100, help="port; 0 picks one (default: 8100)")
    parser.add_argument("--name", default="", help="name in responses (default: mock-PORT)")
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="a model to serve; repeatable (default: Qwen3-32B)",
    )
    parser.add_argument("--ttft", type=float, default=0.0, help="seconds to first token")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument(
        "--tokens", type=int, default=16, help="tokens per answer without max_tokens (default 16)"
    )
    parser.add_argument(
        "--stream-usage",
        choices=("always", "asked"),
        default="asked",
        help=(
            "a stream ends with a usage chunk only when the request asks "
            "(stream_options.include_usage), as OpenAI, vLLM and SGLang do (default), "
            "or always, as an engine that forces it (vLLM's --enable-force-include-usage)"
        ),
    )
    parser.add_argument("--fault", choices=FAULTS, default="none", help="fault mode at start")
    g = parser.add_argument_group("engine capacity (see Engine)")
    g.add_argument(
        "--max-batch",
        type=int,
        default=0,
        help="sequences generated at once; more wait (default 0: unbounded)",
    )
    g.add_argument(
        "--batch-slowdown",
        type=float,
        default=0.0,
        help="extra time per token per additional sequence in the batch, as a "
        "fraction of --token-delay (default 0)",
    )
    g.add_argument(
        "--prefill-per-token",
        type=float,
        default=0.0,
        help="seconds of prefill per uncached prompt token (~4 bytes) (default 0)",
    )
    g.add_argument(
        "--prefix-cache-blocks",
        type=int,
        default=0,
        help="128-byte prompt blocks kept in the prefix cache (default 0: none)",
    )
    parser.add_argument(
        "--metrics",
        choices=DIALECTS,
        default="vllm",
        help="the engine's load at /metrics under vLLM's names, SGLang's, or none (404) "
        "(default vllm)",
    )
    parser.add_argument(
        "--no-v1-models",
        action="store_true",
        help="answer 404 on /v1/models (only /models), like older InfiniLM servers",
    )
    g = parser.add_argument_group(
        "disaggregation (sim/pd.py)", "play one side of a prefill/decode fleet"
    )
    g.add_argument(
        "--pd-role",
        choices=("prefill", "decode"),
        help="serve as a prefill or a decode service (default: whole requests)",
    )
    g.add_argument(
        "--pd-mode",
        choices=("vllm", "sglang"),
        default="vllm",
        help="the protocol checked: vllm (kv_transfer_params) or sglang (bootstrap rooms) "
        "(default vllm)",
    )
    g.add_argument(
        "--bootstrap-port",
        type=int,
        metavar="PORT",
        help="SGLang prefill: also serve the bootstrap server on this port (0 picks one); "
        "the HTTP port serves it too",
    )
    g.add_argument(
        "--bootstrap-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="decode: seconds to wait for the prefill's KV or room (default 10)",
    )
    g = parser.add_argument_group("TLS (an https:// backend)")
    g.add_argument("--ssl-certfile", metavar="FILE", help="serve HTTPS with this certificate")
    g.add_argument("--ssl-keyfile", metavar="FILE", help="its key (default: in the certificate)")
    g.add_argument(
        "--ssl-ca-certs",
        metavar="FILE",
        help="require client certificates signed by this CA (mTLS)",
    )
    args = parser.parse_args(argv)
    context = None
    if args.ssl_certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
        context.set_alpn_protocols(["http/1.1"])
        if args.ssl_ca_certs:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(args.ssl_ca_certs)
    elif args.ssl_keyfile or args.ssl_ca_certs:
        parser.error("--ssl-keyfile and --ssl-ca-certs need --ssl-certfile")

    if args.bootstrap_port is not None and not (
        args.pd_role == "prefill" and args.pd_mode == "sglang"
    ):
        parser.error("--bootstrap-port is an SGLang prefill's (--pd-role prefill --pd-mode sglang)")
    raise_open_file_limit()

    async def run() -> None:
        state = MockState(
            args.name,
            args.models or ["Qwen3-32B"],
            args.ttft,
            args.token_delay,
            args.tokens,
            args.fault,
            v1_models=not args.no_v1_models,
            stream_usage=args.stream_usage,
            metrics=args.metrics,
            engine=Engine(
                args.max_batch,
                args.batch_slowdown,
                args.prefill_per_token,
                args.prefix_cache_blocks,
            ),
            pd=Disaggregation(args.pd_role, args.pd_mode, args.bootstrap_timeout)
            if args.pd_role
            else None,
        )
        server = await start_mock(state, args.host, args.port, context)
        port = server.sockets[0].getsockname()[1]
        state.name = state.name or f"mock-{port}"
        servers = [server]
        if state.pd is not None:
            state.pd.host, state.pd.port = args.host, port
        if args.bootstrap_port is not None:
            bootstrap = await start_mock(state, args.host, args.bootstrap_port)
            servers.append(bootstrap)
            bound = bootstrap.sockets[0].getsockname()[1]
            print(f"bootstrap server on {args.host}:{bound}", flush=True)
        scheme = "https" if context else "http"
        role = f" ({args.pd_mode} {args.pd_role})" if args.pd_role else ""
        print(
            f"mock backend {state.name}{role} listening on {scheme}://{args.host}:{port}",
            flush=True,
        )
        await asyncio.gather(*(s.serve_forever() for s in servers))

    try:
        import uvloop

        uvloop.run(run())
    except ImportError:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0
