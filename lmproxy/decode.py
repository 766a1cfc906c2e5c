"""Decoding JSON that peers send, bounded in depth as well as in size.

msgspec recurses once per level of nesting and, past Python's recursion limit,
raises ``RecursionError``, which is not a ``msgspec.DecodeError``: a handler
written for bad JSON lets it through, and it ends whatever task was decoding
(a watch, a poll, a request's prefill step). So every decode of outside bytes
goes through :func:`json`, which refuses nesting deeper than ``MAX_DEPTH`` with
a ``msgspec.DecodeError`` that says so, before msgspec starts.

The depth is found without a Python loop per byte: a document with at most
``MAX_DEPTH`` brackets cannot be deeper (two ``bytes.count``s, the common case);
otherwise everything but its brackets is dropped (C speed), and innermost pairs
are removed a level per pass, at most ``MAX_DEPTH`` passes: what is left then is
nesting deeper than the limit. Brackets inside strings are not told apart (that
would cost a regex match per string, more than the decode itself); they can only
make a document look unbalanced, and one that does is left to msgspec, whose
``RecursionError`` is turned into the same ``DecodeError``.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

import msgspec

MAX_DEPTH = 64  # no document the router reads nests deeper (pods: about 10)

T = TypeVar("T")

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_ONE_KIND = bytes.maketrans(b"{}", b"[]")


def depth_over(data: bytes | bytearray, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON ``data`` nests deeper than ``limit`` levels of arrays and objects.

    Invalid JSON may get either answer; the decoder refuses it after this."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    skeleton = bytes(data).translate(_ONE_KIND, _NOT_BRACKETS)
    for _ in range(limit):
        shorter = skeleton.replace(b"[]", b"")
        if not shorter or len(shorter) == len(skeleton):
            return False  # empty: shallow enough; stuck: brackets in strings, msgspec decides
        skeleton = shorter
    return True


@overload
def json(data: bytes | bytearray, into: type[T], *, limit: int = ...) -> T: ...
@overload
def json(data: bytes | bytearray, into: None = None, *, limit: int = ...) -> Any: ...
def json(data: bytes | bytearray, into: Any = None, *, limit: int = MAX_DEPTH) -> Any:
    """``msgspec.json.decode(data, type=into)``, refusing nesting deeper than ``limit``.

    Raises ``msgspec.DecodeError`` (too deep, or not JSON) or
    ``msgspec.ValidationError`` (not of type ``into``), never ``RecursionError``."""
    if depth_over(data, limit):
        raise msgspec.DecodeError(f"JSON nested more than {limit} levels deep")
    try:
        if into is None:
            return msgspec.json.decode(data)
        return msgspec.json.decode(data, type=into)
    except RecursionError:  # brackets in strings hid the depth from depth_over
        raise msgspec.DecodeError(f"JSON nested more than {limit} levels deep") from None
