"""``lmproxy --demo``: two simulated backends, paced so that streaming is visible.

``--demo --pd``: Qwen3-32B is served disaggregated instead, by two prefill and
two decode simulators speaking ``--pd-mode``'s protocol (an SGLang prefill's
bootstrap server is its HTTP port); 9g_8b_thinking stays whole.
"""

from __future__ import annotations

import asyncio

from lmproxy.config import ServiceSpec
from lmproxy.sim.pd import Disaggregation
from lmproxy.sim.server import start_mock
from lmproxy.sim.state import MockState

DEMO_BACKENDS = (("demo-qwen3-32b", "Qwen3-32B"), ("demo-9g-8b-thinking", "9g_8b_thinking"))


async def start_demo_backends(
    pd_mode: str | None = None,
) -> tuple[list[asyncio.Server], list[ServiceSpec]]:
    """Simulated backends on free loopback ports, paced so streaming is visible; with
    ``pd_mode``, the first model's are two prefill and two decode services."""
    servers, specs = [], []
    fleet: list[tuple[str, str, str]] = [(name, model, "both") for name, model in DEMO_BACKENDS]
    if pd_mode is not None:
        _, model, _ = fleet.pop(0)
        fleet[:0] = [
            (f"demo-{role}-{i}", model, role) for role in ("prefill", "decode") for i in (0, 1)
        ]
    for name, model, role in fleet:
        pd = Disaggregation(role, pd_mode) if pd_mode is not None and role != "both" else None
        state = MockState(name, [model], ttft_s=0.05, token_delay_s=0.02, tokens=32, pd=pd)
        server = await start_mock(state)
        port = server.sockets[0].getsockname()[1]
        if pd is not None:
            pd.port = port
        servers.append(server)
        specs.append(
            ServiceSpec(
                url=f"http://127.0.0.1:{port}",
                name=name,
                role=role,
                bootstrap_port=port if role == "prefill" and pd_mode == "sglang" else None,
            )
        )
    return servers, specs
