"""The router's own endpoints: /health, /readiness, /liveness, /models, /services, /stats.

Each handler returns (status, JSON-able payload) from the registry's state; the
shapes are those of the InfiniLM-SVC router's API document, with the fields its
routers' code adds (``registry_url``, ``message``; per service ``host``, ``port``,
``babysitter_url``, ``metadata``; ``last_check`` in epoch seconds, as both give it)
and lmproxy's own (``in_flight``, ``last_error``...), which only add keys.
``/health`` answers 200 while the router runs, as the InfiniLM routers' does (their
launch scripts wait on it before any service exists); ``/readiness`` and
``/liveness`` are the Rust routers' probes for load balancers and Kubernetes.
"""

from __future__ import annotations

import datetime
import time
from typing import TYPE_CHECKING, Any

from lmproxy.errors import Fault, error_payload
from lmproxy.fleet.infinilm import followed
from lmproxy.fleet.roster import babysitter_url, kept_entry, name_models, service_entry
from lmproxy.telemetry.logs import iso_time, masked_url

if TYPE_CHECKING:
    from lmproxy.fleet.roster import Service
    from lmproxy.protocols import RouterState

Payload = tuple[int, Any]


def health(router: RouterState) -> Payload:
    roster = router.roster
    healthy = len(roster.healthy())
    total = len(roster.services)
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "router": "stopping" if router.draining else "running",
        "healthy_services": f"{healthy}/{total}",
        "registry_url": registry_url(router),
        "message": None if healthy else "No healthy services available",
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    return 200, body


def registry_url(router: RouterState) -> str | None:
    """The registry followed (--registry-url), as the InfiniLM routers list it."""
    return followed(router.config)


def discovery(router: RouterState) -> dict[str, Any]:
    """The fleet's sources' fields in /stats. A worker has no fleet (its supervisor
    answers its /stats): then the registry its config names."""
    fleet = router.fleet
    return fleet.status() if fleet is not None else {"registry_url": registry_url(router)}


def readiness(router: RouterState) -> Payload:
    """200 while a request could be served; 503, with why, while none could."""
    roster = router.roster
    healthy = len(roster.healthy())
    body: dict[str, Any] = {
        "status": "ready",
        "healthy_services": healthy,
        "total_services": len(roster.services),
    }
    if router.draining:
        reason = "the router is shutting down"
    elif not healthy:
        reason = roster.why_unavailable(None)
    else:
        return 200, body
    # A load balancer or Kubernetes takes the router out of rotation meanwhile.
    return 503, {**body, "status": "not ready", "error": reason}


def liveness(router: RouterState) -> Payload:
    """200 while the process serves: a probe that restarts the router must not
    restart it for its backends' faults."""
    return 200, {"status": "alive", "router": "stopping" if router.draining else "running"}


def _model_object(router: RouterState, model: str) -> dict[str, Any]:
    """A model as /v1/models lists it; an alias with its served model's card."""
    info = router.roster.known_models.get(router.config.aliases.get(model, model))
    created = info.created if info is not None else None
    owned_by = info.owned_by if info is not None else None
    # Told by no service: the router's start and its own name stand in.
    return {
        "id": model,
        "object": "model",
        "created": router.roster.started_at if created is None else created,
        "owned_by": owned_by or "lmproxy",
    }


def listed_models(router: RouterState, allowed: frozenset[str] = frozenset()) -> list[str]:
    """The healthy services' models, then each alias whose served model is among them;
    with ``allowed`` (a [[keys]] key's models), only those."""
    served = router.roster.healthy_models()
    aliases = router.config.aliases
    if aliases:
        known = set(served)
        served = served + [a for a, target in aliases.items() if target in known and a not in known]
    if allowed:
        return [m for m in served if m in allowed]
    return served


def models(router: RouterState, allowed: frozenset[str] = frozenset()) -> Payload:
    data = [_model_object(router, m) for m in listed_models(router, allowed)]
    return 200, {"object": "list", "data": data}


def model(router: RouterState, model_id: str, allowed: frozenset[str] = frozenset()) -> Payload:
    served = listed_models(router, allowed)
    if model_id not in served:
        available = name_models(served) or "none"
        return error_payload(
            Fault.NOT_FOUND, f"model {model_id!r} not found; available models: {available}"
        )
    return 200, _model_object(router, model_id)


def services(router: RouterState) -> Payload:
    roster = router.roster
    listed = [service_entry(s) for s in roster.services.values()]
    listed += [kept_entry(e) for e in roster.entries.values()]
    return 200, {"services": listed, "total": len(listed), "registry_url": registry_url(router)}


def engine_figures(service: Service) -> dict[str, Any] | None:
    """What the engine's /metrics said at the last scrape, and how long ago; None if
    the router has no figure (none yet, no /metrics, or --load-interval 0)."""
    if service.engine_at is None:
        return None
    return {
        "running": service.engine_running,
        "waiting": service.engine_waiting,
        "kv_cache_usage": service.engine_kv,
        "age_s": round(max(0.0, time.time() - service.engine_at), 3),
        "counted": service.engine_extra,  # what the load-aware strategies add
        "models": {
            model: {"running": running, "waiting": waiting}
            for model, (running, waiting) in service.engine_models.items()
        },
    }


def stats(router: RouterState) -> Payload:
    roster = router.roster
    listed = [
        {
            "name": s.name,
            "host": s.host,
            "port": s.port,
            "url": masked_url(s.url),
            "babysitter_url": babysitter_url(s),
            "healthy": s.healthy,
            "request_count": s.request_count,
            "error_count": s.error_count,
            "response_time": round(s.mean_latency_s, 6),
            "weight": s.weight,
            "metadata": s.spec.metadata,
            "in_flight": s.in_flight,
            "max_in_flight": s.spec.max_in_flight,
            # Epoch seconds, 0 before the first check: what both InfiniLM routers give.
            "last_check": round(s.last_check, 3) if s.last_check is not None else 0,
            "last_error": s.last_error or None,
            "last_error_at": iso_time(s.last_error_at),
            "engine": engine_figures(s),
            "role": s.role,
            "circuit": s.breaker.state_name,
            "circuit_opened": s.breaker.opened_total,
        }
        for s in roster.services.values()
    ]
    payload = {
        "total_services": len(listed),
        "healthy_services": len(roster.healthy()),
        **discovery(router),
        "queue_length": router.queue_length,
        "connections": router.connection_figures(),
        "services": listed,
    }
    if roster.pd_models:
        payload["disaggregation"] = disaggregation(router)
    if router.config.keys:
        # By name, never the key: requests, tokens and refusals by reason.
        payload["keys"] = router.key_counts()
    return 200, payload


def disaggregation(router: RouterState) -> dict[str, Any]:
    """Per role: services, healthy ones, requests and errors (summed from the services),
    and the steps of disaggregated requests by outcome."""
    roles: dict[str, dict[str, Any]] = {}
    for s in router.roster.services.values():
        role = roles.setdefault(
            s.role, {"services": 0, "healthy": 0, "request_count": 0, "error_count": 0}
        )
        role["services"] += 1
        role["healthy"] += s.healthy
        role["request_count"] += s.request_count
        role["error_count"] += s.error_count
    steps = router.pd_counts()
    for name, role in roles.items():
        role["steps"] = steps.get(name, {})
    return {"models": sorted(router.roster.pd_models), "roles": roles}
