"""infini-router's size-based routing: large prompts go to "static" KV-cache services.

InfiniLM serves a model with one of two KV caches, named in its registration's
``metadata.cache_type``: ``"paged"`` (blocks taken as sequences grow) or
``"static"`` (a region allocated up front, for long contexts). Its Rust router
(infini-router, ``src/proxy/handler.rs``) sends a POST whose prompt text is over
``CACHE_TYPE_ROUTING_THRESHOLD`` bytes (51,200 by default) to the healthy static
services of the model, and the rest to the paged ones. When the kind it wants has
no healthy service of the model, it falls back to all of them.

The prompt's size is measured as infini-router measures it: the UTF-8 bytes of the
text in ``messages[].content`` (a string, or each part's ``text`` and ``content``),
else of ``prompt`` (a string or a list of strings). A body with neither counts 0.
A body it cannot read so (a prompt of token ids, content of another type) is not
size-routed: the strategy picks among all of the model's services, as infini-router
does.

Here it is a rule the journey applies before the strategy picks, and only while some
healthy service is static (``Roster.any_static``). A fleet without one pays one
attribute read per request. One difference: the small side is every service that is
not static. infini-router takes only those labelled ``"paged"``, so an unlabelled
service there got small requests only when no paged one was healthy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import msgspec

if TYPE_CHECKING:
    from lmproxy.client.request import RequestHead, RouteRequest
    from lmproxy.fleet.roster import Service

STATIC = "static"
S = TypeVar("S", bound="Service")


class _Part(msgspec.Struct):
    text: str | None = None
    content: str | None = None


class _Message(msgspec.Struct):
    content: str | list[_Part] | None = None


_decode_messages = msgspec.json.Decoder(list[_Message] | None).decode
_decode_prompt = msgspec.json.Decoder(str | list[str] | None).decode


def _utf8(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _messages_size(messages: msgspec.Raw) -> int:
    """The bytes of the chat messages' text; raises what msgspec raises for messages
    that are not a list of chat messages."""
    total = 0
    for message in _decode_messages(messages) or ():
        content = message.content
        if isinstance(content, str):
            total += _utf8(content)
        elif content is not None:
            for part in content:
                total += _utf8(part.text or "") + _utf8(part.content or "")
    return total


def prompt_size(head: RequestHead) -> int | None:
    """The bytes of prompt text infini-router counts; None if it could not read them."""
    messages = head.messages
    try:
        if messages and bytes(memoryview(messages)[:4]) != b"null":
            return _messages_size(messages)
        prompt = head.prompt
        if not prompt:
            return 0
        value = _decode_prompt(prompt)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if value is None:
        return 0
    return _utf8(value) if isinstance(value, str) else sum(_utf8(p) for p in value)


def _over(head: RequestHead, threshold: int) -> bool | None:
    """Whether the prompt is over ``threshold`` bytes; None if it cannot be told."""
    # Text decoded from JSON is never longer than its JSON: a short one needs no decode.
    if len(head.messages) + len(head.prompt) <= threshold:
        return False
    size = prompt_size(head)
    return None if size is None else size > threshold


def by_cache_type(candidates: list[S], request: RouteRequest, threshold: int) -> list[S]:
    """The candidates for ``request`` under size-based routing: the static ones for a
    prompt over ``threshold`` bytes, the others for the rest; all of them when the
    side it belongs to has none, or when its size cannot be told."""
    head = request.head
    if head is None or not any(s.cache_type == STATIC for s in candidates):
        return candidates
    over = _over(head, threshold)
    if over is None:
        return candidates
    chosen = [s for s in candidates if (s.cache_type == STATIC) is over]
    return chosen or candidates
