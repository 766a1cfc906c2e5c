"""A request's policies before routing: its key's models, priority and limits, aliases,
and fallbacks.

:func:`apply` runs them for a journey (a :class:`Policed`), writing what it keeps of
them (a priority, a grant, a chain of fallbacks, the header that names the model
that answers) or answering the refusal; :func:`fall_back` moves it to its model's
next fallback. Only requests of configured keys, aliases or fallbacks come here
(``ProxyHost.policies``): the others pay one attribute check.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from typing import TYPE_CHECKING, Protocol

from lmproxy.client.request import USAGE_PATHS, find_header, naming_model, with_stream_usage
from lmproxy.config import fallback_chain
from lmproxy.errors import Fault, ProxyError
from lmproxy.keys.limits import UNLIMITED, Refusal

if TYPE_CHECKING:
    from lmproxy.client.connection import ClientConnection, ClientRequest
    from lmproxy.client.request import RouteRequest
    from lmproxy.keys.limits import Grant, Key, Verdict
    from lmproxy.protocols import ProxyHost

log = logging.getLogger("lmproxy")


class Policed(Protocol):
    """A journey, as its policies see it (``journey.Journey``)."""

    router: ProxyHost
    request: ClientRequest
    client: ClientConnection
    route: RouteRequest | None
    priority: int
    grant: Grant | None
    fallbacks: list[str]
    fallen_from: str | None
    head_extra: bytes
    id_header: bytes
    request_id: bytes

    def proceed(self) -> None: ...

    def fail(self, error: ProxyError) -> None: ...

    def crash(self, exc: Exception) -> None: ...

    def end(self, status: int) -> None: ...


def apply(journey: Policed) -> bool:
    """The request's key (its models, priority and limits), then aliases and fallbacks.
    False: answered, or waiting for the limits' verdict (which goes on from there)."""
    route = journey.route
    assert route is not None
    key = journey.request.key
    if key is not None:
        priority = check_key(journey.router, journey.request, key, route)
        if isinstance(priority, ProxyError):
            journey.fail(priority)
            return False
        journey.priority = priority
        verdict = journey.router.limits.check(key) if key.limited else UNLIMITED
        if isinstance(verdict, asyncio.Future):
            verdict.add_done_callback(functools.partial(_limits_answered, journey))
            return False
        if not _granted(journey, verdict):
            return False
    _model_policies(journey, route)
    return True


def _granted(journey: Policed, verdict: Verdict) -> bool:
    key = journey.request.key
    assert key is not None
    grant = grant_of(journey.router, key, verdict)
    if isinstance(grant, ProxyError):
        journey.fail(grant)
        return False
    journey.grant = grant
    return True


def _limits_answered(journey: Policed, answer: asyncio.Future[Verdict]) -> None:
    """The verdict of another process (the supervisor, Redis) came."""
    try:
        verdict = answer.result()
        assert journey.route is not None
        if journey.client.closing:  # hung up meanwhile
            if not isinstance(verdict, Refusal):
                journey.grant = verdict  # for the journey's end to end
            journey.end(499)
        elif _granted(journey, verdict):
            _model_policies(journey, journey.route)
            journey.proceed()
    except Exception as exc:
        journey.crash(exc)


def _model_policies(journey: Policed, route: RouteRequest) -> None:
    if journey.router.model_policies:
        journey.fallbacks, named = model_policies(journey.router, route)
        if named and route.model is not None:
            journey.head_extra = journey.id_header + model_header(route.model)


_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_BAD_PRIORITY = (
    "X-Priority must be an integer of at most 12 characters (higher is served first; "
    "default: the key's priority)"
)


def header_value(text: str) -> bytes:
    """``text`` for a response header: UTF-8, no control characters."""
    return _CONTROL.sub(b"", text.encode("utf-8", "replace"))


def model_header(model: str) -> bytes:
    """The response header that names the model that answered."""
    return b"X-LMProxy-Model: %s\r\n" % header_value(model)


def check_key(
    router: ProxyHost, request: ClientRequest, key: Key, route: RouteRequest
) -> int | ProxyError:
    """The key may ask for this model (as asked: an alias is a model of its own), with
    this priority: the priority, or the refusal. Streams of a key with tpm are made to
    ask for their usage."""
    metrics = router.metrics
    model = route.model
    if key.models and model not in key.models:
        metrics.key_rejected(key.name, "model")
        allowed = ", ".join(sorted(key.models))
        return ProxyError(
            Fault.FORBIDDEN,
            f"API key {key.name!r} may not use model {model!r}; it may use: {allowed}"
            if model is not None
            else f"API key {key.name!r} may use only some models ({allowed}); name one in 'model'",
        )
    priority = key.priority
    if key.max_priority is not None:
        given = find_header(request.headers, b"x-priority")
        if given is not None:
            asked = _priority(given)
            if asked is None:
                return ProxyError(Fault.BAD_REQUEST, _BAD_PRIORITY)
            if asked > key.max_priority:
                metrics.key_rejected(key.name, "priority")
                return ProxyError(
                    Fault.FORBIDDEN,
                    f"X-Priority {asked} is above API key {key.name!r}'s "
                    f"max_priority, {key.max_priority}; send at most that",
                )
            priority = asked
    head = route.head
    if key.tpm and head is not None and head.stream and route.path in USAGE_PATHS:
        # Without usage a stream's tokens go uncounted, and tpm could be dodged.
        route.body = with_stream_usage(route.body)
    return priority


def _priority(given: bytes) -> int | None:
    if len(given) > 12:  # int() of a long one costs; none needs it
        return None
    try:
        return int(given)
    except ValueError:
        return None


def grant_of(router: ProxyHost, key: Key, verdict: Verdict) -> Grant | ProxyError:
    """The key's limits answered: its grant, or the 429 to answer."""
    if isinstance(verdict, Refusal):
        router.metrics.key_rejected(key.name, verdict.limit)
        error = ProxyError(Fault.RATE_LIMITED, verdict.message)
        error.retry_after = verdict.retry_after
        return error
    router.metrics.key_request(key.name)
    return verdict


def model_policies(router: ProxyHost, route: RouteRequest) -> tuple[list[str], bool]:
    """An alias becomes its served model (the one rewrite of the body's ``model``); a
    model with fallbacks gets its chain. (The chain, whether the response names the
    model that answered.)"""
    model = route.model
    if model is None:
        return [], False
    config = router.config
    named = False
    target = config.aliases.get(model)
    if target is not None:
        route.model = model = target
        route.body = naming_model(route, target)
        named = True
    chain = fallback_chain(config.models, model)
    return chain, named or bool(chain)


def fall_back(journey: Policed, error: ProxyError) -> str:
    """The journey's model gives way to its next fallback, named in the body as it is
    sent and in the response's header: that model."""
    route = journey.route
    assert route is not None and route.model is not None
    previous = route.model
    model = journey.fallbacks.pop(0)
    journey.router.metrics.fallback(previous, model)
    log.debug(
        "request %s: %s; falling back from model %s to %s",
        journey.request_id.decode(),
        error.message,
        previous,
        model,
    )
    if journey.fallen_from is None:
        journey.fallen_from = previous
    route.model = model
    route.body = naming_model(route, model)
    journey.head_extra = journey.id_header + model_header(model)
    return model
