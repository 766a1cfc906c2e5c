"""``lmproxy --demo``: two simulated backends, paced so that streaming is visible."""

from __future__ import annotations

import asyncio

from lmproxy.config import ServiceSpec
from lmproxy.sim.server import start_mock
from lmproxy.sim.state import MockState

DEMO_BACKENDS = (("demo-qwen3-32b", "Qwen3-32B"), ("demo-9g-8b-thinking", "9g_8b_thinking"))


async def start_demo_backends() -> tuple[list[asyncio.Server], list[ServiceSpec]]:
    """Two simulated backends on free loopback ports, paced so streaming is visible."""
    servers, specs = [], []
    for name, model in DEMO_BACKENDS:
        state = MockState(name, [model], ttft_s=0.05, token_delay_s=0.02, tokens=32)
        server = await start_mock(state)
        port = server.sockets[0].getsockname()[1]
        servers.append(server)
        specs.append(ServiceSpec(url=f"http://127.0.0.1:{port}", name=name))
    return servers, specs
