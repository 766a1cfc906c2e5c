"""The router's own endpoints: /health, /models, /v1/models, /services, /stats.

Each handler returns (status, JSON-able payload) from the registry's state; the
shapes are those of the InfiniLM-SVC router's API document, with additions
(``in_flight``, ``last_check``) that only add keys.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmproxy.logs import masked_url
from lmproxy.registry import name_models

if TYPE_CHECKING:
    from lmproxy.app import Router
    from lmproxy.registry import Service

Payload = tuple[int, Any]


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts).isoformat(timespec="seconds")


def health(router: Router) -> Payload:
    registry = router.registry
    healthy = len(registry.healthy())
    total = len(registry.services)
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "router": "stopping" if router.draining else "running",
        "healthy_services": f"{healthy}/{total}",
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    # 503 lets a load balancer or Kubernetes readiness probe take this router
    # out of rotation while it can serve nothing (or is shutting down).
    return (200 if healthy and not router.draining else 503), body


def _model_object(router: Router, model: str) -> dict[str, Any]:
    info = router.registry.known_models.get(model)
    return {
        "id": model,
        "object": "model",
        "created": info.created if info else router.registry.started_at,
        "owned_by": info.owned_by if info else "lmproxy",
    }


def models(router: Router) -> Payload:
    data = [_model_object(router, m) for m in router.registry.healthy_models()]
    return 200, {"object": "list", "data": data}


def model(router: Router, model_id: str) -> Payload:
    served = router.registry.healthy_models()
    if model_id not in served:
        available = name_models(served) or "none"
        return 404, {"error": f"model {model_id!r} not found; available models: {available}"}
    return 200, _model_object(router, model_id)


def service_entry(service: Service) -> dict[str, Any]:
    """One service as /services lists it."""
    return {
        "name": service.name,
        "url": masked_url(service.url),
        "healthy": service.healthy,
        "models": list(service.models),
        "weight": service.weight,
        "max_in_flight": service.spec.max_in_flight,
        "origin": service.origin,
    }


def services(router: Router) -> Payload:
    listed = [service_entry(s) for s in router.registry.services.values()]
    return 200, {"services": listed, "total": len(listed)}


def stats(router: Router) -> Payload:
    registry = router.registry
    listed = [
        {
            "name": s.name,
            "healthy": s.healthy,
            "request_count": s.request_count,
            "error_count": s.error_count,
            "response_time": round(s.mean_latency_s, 6),
            "in_flight": s.in_flight,
            "max_in_flight": s.spec.max_in_flight,
            "last_check": _iso(s.last_check),
            "last_error": s.last_error or None,
            "last_error_at": _iso(s.last_error_at),
        }
        for s in registry.services.values()
    ]
    return 200, {
        "total_services": len(listed),
        "healthy_services": len(registry.healthy()),
        "queue_length": router.queue_length,
        "services": listed,
    }


ROUTES: dict[bytes, Callable[[Router], Payload]] = {
    b"/health": health,
    b"/models": models,
    b"/v1/models": models,
    b"/services": services,
    b"/stats": stats,
}
# Open even when API keys are set: probes must not need a secret.
OPEN_PATHS = frozenset({b"/health"})
