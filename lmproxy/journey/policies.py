"""A request's policies before routing: its key's models and priority, aliases, fallbacks.

Each is a function of the router's settings and the request, returning what the
journey keeps (a priority, a grant, a chain of fallbacks) or the error to answer;
the journey applies it. Only requests of configured keys, aliases or fallbacks
come here (``ProxyHost.policies``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from lmproxy.config import fallback_chain
from lmproxy.errors import Fault, ProxyError
from lmproxy.limits import Refusal
from lmproxy.request import USAGE_PATHS, find_header, naming_model, with_stream_usage

if TYPE_CHECKING:
    from lmproxy.limits import Grant, Key, Verdict
    from lmproxy.protocols import ProxyHost
    from lmproxy.request import RouteRequest
    from lmproxy.server import ClientRequest

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
