"""The engine's load as inference servers expose it: Prometheus text at ``/metrics``.

Under vLLM's names by default (``vllm:num_requests_running``,
``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``), or SGLang's
(``sglang:num_running_reqs``, ``sglang:num_queue_reqs``, ``sglang:token_usage``),
each labelled with ``model_name``; the figures are the engine's real batch, its
queue, and how full its prefix cache is.
"""

from __future__ import annotations

from lmproxy.sim.state import MockState

DIALECTS = ("vllm", "sglang", "none")
NAMES = {
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"),
    "sglang": ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"),
}


def engine_metrics(state: MockState) -> bytes:
    engine = state.engine
    running, waiting, usage = NAMES[state.metrics]
    cache = len(engine.cache) / engine.cache_blocks if engine.cache_blocks else 0.0
    label = (state.models[0] if state.models else "mock").replace('"', "")
    lines = []
    for name, value in ((running, engine.active), (waiting, len(engine.waiting)), (usage, cache)):
        lines += [f"# TYPE {name} gauge", f'{name}{{model_name="{label}"}} {float(value)}']
    return ("\n".join(lines) + "\n").encode()
