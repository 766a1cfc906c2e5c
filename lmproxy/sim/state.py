"""One simulated backend's settings and counters (what ``GET /mock/stats`` reports)."""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

from lmproxy.sim.engine import Engine
from lmproxy.sim.pd import Disaggregation


class MockState:
    """Settings and counters of one simulated backend."""

    def __init__(
        self,
        name: str,
        models: list[str],
        ttft_s: float = 0.0,
        token_delay_s: float = 0.0,
        tokens: int = 16,
        fault: str = "none",
        v1_models: bool = True,
        engine: Engine | None = None,
        metrics: str = "vllm",
        pd: Disaggregation | None = None,
        stream_usage: str = "asked",
    ) -> None:
        self.stream_usage = stream_usage  # "always": even unasked
        self.pd = pd  # a prefill or decode service (sim/pd.py); None: whole requests
        self.name = name
        self.metrics = metrics  # /metrics under vLLM's names, SGLang's, or "none" (404)
        self.v1_models = v1_models
        self.engine = engine or Engine()
        self.models = models
        self.ttft_s = ttft_s
        self.token_delay_s = token_delay_s
        self.health_delay_s = 0.0  # /health answers after this: a slow check
        self.tokens = tokens
        self.fault = fault
        self.ids = itertools.count(1)
        self.requests = 0
        self.completed = 0
        self.streams_started = 0
        self.streams_completed = 0
        self.client_disconnects = 0  # a response the client stopped before its end
        self.write_pauses = 0  # times the client's back-pressure stopped an answer
        self.last_disconnect_at = 0.0
        self.open_connections = 0
        self.total_connections = 0
        self.last_headers: dict[str, str] = {}
        self.last_body = b""
        self.bodies: deque[bytes] = deque(maxlen=20)  # the last requests', for tests
        self.paths: list[str] = []

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fault": self.fault,
            "requests": self.requests,
            "completed": self.completed,
            "streams_started": self.streams_started,
            "streams_completed": self.streams_completed,
            "client_disconnects": self.client_disconnects,
            "write_pauses": self.write_pauses,
            "last_disconnect_at": self.last_disconnect_at,
            "open_connections": self.open_connections,
            "total_connections": self.total_connections,
            "last_headers": self.last_headers,
            "last_body": self.last_body[:4096].decode("utf-8", "replace"),
            "bodies": [b[:65536].decode("utf-8", "replace") for b in self.bodies],
            "pd": self.pd.stats() if self.pd is not None else None,
            "paths": self.paths[-50:],
            "active": self.engine.active,
            "peak_active": self.engine.peak_active,
            "waiting": len(self.engine.waiting),
            "prompt_tokens": self.engine.prompt_tokens,
            "cached_tokens": self.engine.cached_tokens,
        }
