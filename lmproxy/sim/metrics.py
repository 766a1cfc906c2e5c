"""The engine's load as inference servers expose it: Prometheus text at ``/metrics``.

Under vLLM's names by default (``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``), or SGLang's
(``sglang:num_running_reqs``, ``sglang:num_queue_reqs``, ``sglang:token_usage``),
each labelled with ``model_name``; the figures are the engine's real batch, its
queue, and how full its prefix cache is.
"""

from __future__ import annotations

import functools

from lmproxy.sim.state import MockState

DIALECTS = ("vllm", "sglang", "none")
NAMES = {
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"),
    "sglang": ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"),
}


FLOOD_SERIES = 70_000
FLOOD_LINES = 200_000
FLOOD_BYTES = 4 * 1024 * 1024 - 1024  # under the probe's 4 MiB, so that a router reads it


@functools.cache  # made once: the simulator must not be the slow side
def flood_metrics() -> bytes:
    """A page as large as a router reads: 200,000 lines, the first 70,000 of them
    series of one family (what ``metrics-flood`` answers)."""
    lines = [f'vllm:num_requests_running{{engine="{i}"}} 1' for i in range(FLOOD_SERIES)]
    lines += [f"x{i} 1" for i in range(FLOOD_LINES - FLOOD_SERIES - 1)]
    page = ("\n".join(lines) + "\n").encode()
    return page + b"#" * (FLOOD_BYTES - len(page) - 1) + b"\n"


def engine_metrics(state: MockState) -> bytes:
    engine = state.engine
    running, waiting, usage = NAMES[state.metrics]
    cache = len(engine.cache) / engine.cache_blocks if engine.cache_blocks else 0.0
    label = (state.models[0] if state.models else "mock").replace('"', "")
    lines = []
    for name, value in ((running, engine.active), (waiting, len(engine.waiting)), (usage, cache)):
        lines += [f"# TYPE {name} gauge", f'{name}{{model_name="{label}"}} {float(value)}']
    return ("\n".join(lines) + "\n").encode()
