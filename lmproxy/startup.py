"""Starting and reloading the router: the demo backends, the first warnings, SIGHUP.

``serve`` runs one serving process; with ``--workers`` the supervisor
(``supervisor.py``) uses the same pieces around its workers.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import strategies
from lmproxy.app import Router, load_strategies
from lmproxy.config import Config, ConfigError, ServiceSpec

log = logging.getLogger("lmproxy")


async def serve(config: Config, reload: Callable[[], Config] | None = None) -> None:
    """Run the router until SIGTERM or SIGINT, then shut down gracefully.

    SIGHUP calls ``reload`` (the command line and config file read again) and
    applies the result without closing a connection.
    """
    loop = asyncio.get_running_loop()
    demo_servers, demo_specs = await start_demo(config)
    router = Router(config)
    await router.start()
    startup_warnings(config, len(router.roster.services), router.port)

    def on_hangup() -> None:
        new = reread(reload, demo_specs)
        if new is not None:
            router.apply(new)
            log.info("reloaded: %d services, strategy %s", len(new.services), new.strategy)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await stop.wait()
    log.info("shutting down")
    await router.shutdown()
    for server in demo_servers:
        server.close()
    log.info("stopped")


async def start_demo(config: Config) -> tuple[list[asyncio.Server], list[ServiceSpec]]:
    """With --demo, start the simulated backends and add them to ``config``'s services."""
    if not config.demo:
        return [], []
    from lmproxy.sim.demo import start_demo_backends

    servers, specs = await start_demo_backends(config.pd_mode if config.demo_pd else None)
    config.services = [*config.services, *specs]
    return servers, specs


def reread(reload: Callable[[], Config] | None, demo_specs: list[ServiceSpec]) -> Config | None:
    """The config as the command line and file now say, or None (logged) if it is wrong."""
    if reload is None:
        log.warning("SIGHUP ignored: nothing to reload")
        return None
    try:
        config = reload()
    except (ConfigError, strategies.StrategyError) as exc:
        log.error("reload failed, keeping the running config: %s", exc)
        return None
    config.services = [*config.services, *demo_specs]
    try:
        load_strategies(config)  # fail here, before anything changes
    except strategies.StrategyError as exc:
        log.error("reload failed, keeping the running config: %s", exc)
        return None
    return config


def startup_warnings(config: Config, services: int, port: int) -> None:
    unchecked = [
        s.name
        for s in config.services
        if s.tls and (s.verify is False or (s.verify is None and not config.backend_verify))
    ]
    if unchecked or not config.backend_verify:
        log.warning(
            "TLS certificates of https:// services are not checked (%s: %s): anyone on "
            "the path can read and change the traffic; give their CA (--backend-ca-certs "
            "or ca=) instead",
            "verify=false" if config.backend_verify else "--backend-no-verify",
            ", ".join(unchecked) or "every https:// service",
        )
    discovering = config.discover or config.k8s_selector or config.k8s_prefill_selector
    if not services and not (config.registry_url or discovering or config.k8s_decode_selector):
        log.warning(
            "no backend services configured: give --backend URL, --config, --registry-url, "
            "--discover, --k8s-selector or --demo, or register them (POST /services)"
        )
    if config.redis_url and not any(k.rpm or k.tpm or k.max_in_flight for k in config.keys):
        log.warning(
            "--redis-url is set, but no [[keys]] entry has a limit (rpm, tpm, "
            "max_in_flight): Redis holds nothing until one has"
        )
    if config.binds_publicly and not (config.api_keys or config.keys):
        log.warning(
            "listening on %s with no API keys: anyone who can reach port %d can use "
            "every backend; set --api-key or LMPROXY_API_KEYS, or bind --host 127.0.0.1",
            config.host,
            port,
        )
