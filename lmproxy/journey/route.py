"""What routing reads of a request, and which services may take it.

``route`` decodes only the fields routing needs (the ``model``, ``stream``, what
cache-aware hashes) into a :class:`~lmproxy.client.request.RouteRequest` and raises the
400/404/503 a request deserves; ``candidates`` is the healthy services of its model,
or the reason there are none, in words that say what to change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmproxy.client.request import (
    MODEL_PATHS,
    RequestHead,
    RouteRequest,
    decode_head,
    form_model,
    forwarded_head,
    is_form,
    with_model,
)
from lmproxy.errors import Fault, ProxyError
from lmproxy.fleet.roster import LOGGED_SERVICES, name_models
from lmproxy.journey.admission import has_room
from strategies.size import by_cache_type

if TYPE_CHECKING:
    from lmproxy.client.connection import ClientRequest
    from lmproxy.fleet.roster import Service
    from lmproxy.protocols import ProxyHost


def route(router: ProxyHost, request: ClientRequest) -> RouteRequest:
    """Decode what routing needs; raise the 400/404/503 a request deserves."""
    path = request.path
    body = request.body
    if path not in MODEL_PATHS:
        return route_other(router, request)
    head = decode_head(path, body)
    model = head.model
    if model is None:
        config = router.config
        model = config.default_model
        if model is None:
            served = router.roster.served_models()
            if len(served) == 1:
                model = served[0]
            elif config.require_model:
                raise ProxyError(
                    Fault.BAD_REQUEST,
                    "'model' is required (--require-model); served models: "
                    + (name_models(served) or "none yet"),
                )
        if model is not None:
            body = with_model(body, model)
        # Else any healthy service takes it, with the body as sent (the InfiniLM
        # routers' way): the backend answers with the model it serves.
    return RouteRequest(path, model, head, body, request.headers)


def route_other(router: ProxyHost, request: ClientRequest) -> RouteRequest:
    """Any other path: another /v1/ one (rerank, audio...) or one the router forwards
    whole (SGLang's /generate, vLLM's /tokenize...). Its model is the JSON body's, or a
    form's ``model`` field; without one, --default-model's services take it (the body
    as sent: such APIs do not all take a ``model``), else any healthy service."""
    path = request.path
    body = request.body
    head: RequestHead | None = None
    model: str | None = None
    if body:
        if request.is_json or body.lstrip()[:1] == b"{":
            # The OpenAI API's fields are checked on its own paths only.
            head = decode_head(path, body) if path.startswith(b"/v1/") else forwarded_head(body)
            if head is not None:
                model = head.model
        else:
            content_type = request.header(b"content-type")
            if is_form(content_type):
                assert content_type is not None
                model = form_model(body, content_type)
    if model is None:
        model = router.config.default_model
    return RouteRequest(path, model, head, body, request.headers)


def any_model(router: ProxyHost, route: RouteRequest) -> None:
    """--any-model, before routing: a name no service lists is the one model served, as
    the Rust routers take it (so a disaggregated model is split as its own name would
    be); with several served, a request without a model (see candidates)."""
    roster = router.roster
    if route.model in roster.known_models or not roster.services:
        return
    if roster.discovery_pending():
        return  # it may yet be listed: _candidates decides
    served = list(roster.known_models)
    route.model = served[0] if len(served) == 1 else None


def candidates(router: ProxyHost, route: RouteRequest) -> list[Service]:
    """The healthy services of the route's model; else the error that says why none."""
    roster = router.roster
    model = route.model
    if model is None:
        found = roster.whole()
        if not found:
            raise ProxyError(Fault.NO_HEALTHY_SERVICE, roster.why_unavailable(None))
        return found
    found = roster.candidates(model)
    if found:
        return found
    if model in roster.known_models or not roster.services:
        raise ProxyError(Fault.NO_HEALTHY_SERVICE, roster.why_unavailable(model))
    if router.config.any_model:
        # A name no service lists (--any-model): it goes on as a request without a
        # model, to every healthy service, its body as sent. Its name is not kept: a
        # client's invented names must not become metric labels or strategy state.
        route.model = None
        return candidates(router, route)
    raise _unknown(router, model)


def _unknown(router: ProxyHost, model: str) -> ProxyError:
    """Why no service lists ``model``: discovery is still pending, or none serves it."""
    roster = router.roster
    if roster.discovery_pending():
        pending = [s for s in roster.services.values() if not s.models_known]
        if any(s.last_check is None for s in pending):
            return ProxyError(
                Fault.NO_HEALTHY_SERVICE,
                f"model {model!r} is not known yet: model discovery is still pending on "
                f"{name_models((s.name for s in pending), 'GET /services', LOGGED_SERVICES)}; "
                "retry shortly",
            )
        # Every service that might serve it has failed its check: say why, not "pending".
        return ProxyError(Fault.NO_HEALTHY_SERVICE, roster.why_unavailable(model, pending))
    models = name_models(roster.known_models) or "none"
    return ProxyError(
        Fault.MODEL_NOT_FOUND, f"model {model!r} not found; available models: {models}"
    )


def choices(router: ProxyHost, route: RouteRequest, tried: list[Service]) -> list[Service]:
    """The services a whole-request try may choose from: the model's healthy ones not
    tried yet (none left: an empty list), by infini-router's size rule where it applies."""
    model = route.model
    found = router.roster.candidates(model) if model is not None else None
    if not found:  # the reasons why not, or a request without a model
        found = candidates(router, route)
    if tried:
        found = [s for s in found if s not in tried]
    if found and router.roster.any_static:
        found = by_cache_type(found, route, router.config.cache_type_routing_threshold)
    return found


def may_start(router: ProxyHost, route: RouteRequest, tried: list[Service]) -> bool:
    """Whether a queued request would now find room (or an error to report)."""
    try:
        found = candidates(router, route)
    except ProxyError:
        return True
    return any(has_room(s) for s in found if s not in tried)


def may_retry_on(router: ProxyHost, route: RouteRequest, tried: list[Service]) -> list[Service]:
    """The services a retry could go to (the caller leaves out the one that failed)."""
    try:
        found = candidates(router, route)
    except ProxyError:
        return []
    return [s for s in found if s not in tried]
