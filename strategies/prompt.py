"""What strategies read of a request's prompt, without decoding more than they need.

The request edge keeps ``messages`` and ``prompt`` as raw JSON bytes. Two
requests of one conversation serialise their shared turns identically (same
client, same library), so raw bytes are compared directly: no JSON is decoded
to find a shared prefix.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from lmproxy.client.request import RouteRequest

_decode_items = msgspec.json.Decoder(list[msgspec.Raw]).decode


def prompt_bytes(request: RouteRequest) -> memoryview:
    """The raw JSON of the chat messages or the completion prompt (empty if none).

    A view, not a copy: prompts can be megabytes."""
    head = request.head
    if head is None:
        return memoryview(b"")
    return memoryview(head.messages if head.messages else head.prompt)


def session_key(request: RouteRequest) -> bytes | None:
    """An explicit session identity: ``X-Session-ID``, else ``user``, else ``prompt_cache_key``."""
    value = request.header(b"x-session-id")
    if value:
        return b"s:" + value
    head = request.head
    if head is not None:
        if head.user:
            return b"u:" + head.user.encode()
        if head.prompt_cache_key:
            return b"k:" + head.prompt_cache_key.encode()
    return None


def opening_key(request: RouteRequest, messages: int, max_bytes: int) -> bytes:
    """The conversation's opening: its first ``messages`` messages (system prompt and
    first turns), or the first ``max_bytes`` of a completion prompt. Later turns of the
    same conversation share it, so they get the same key."""
    head = request.head
    if head is None:
        return b""
    raw = bytes(head.messages)
    if raw:
        try:
            items = _decode_items(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return raw[:max_bytes]
        return b"\x00".join(bytes(item) for item in items[:messages])[:max_bytes]
    return bytes(head.prompt)[:max_bytes]


def stable_hash(data: bytes) -> int:
    """A 64-bit hash that is the same in every process (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@functools.cache
def boundaries(block_bytes: int, max_bytes: int) -> tuple[int, ...]:
    """Prefix lengths at which prompts are compared: every ``block_bytes`` for the first
    32 blocks, then 25% further each time, up to ``max_bytes``.

    Fixed positions, independent of any prompt's length, so that two prompts are
    cut at the same places; fine where conversations differ most (the opening),
    geometric beyond, so a 128 KiB opening costs about 50 hashes, not 1,000.
    """
    points = []
    position = block_bytes
    while position <= max_bytes:
        points.append(position)
        step = block_bytes if len(points) < 32 else max(block_bytes, position // 4)
        position += step - step % block_bytes
    return tuple(points)


def block_hashes(data: bytes | memoryview, block_bytes: int, max_bytes: int) -> list[int]:
    """Chained hashes of ``data``'s prefixes at ``boundaries``: hash i covers the
    prefix up to boundary i.

    Two prompts share their first k hashes exactly when they share their first
    k prefixes, so a set of these hashes is an approximate prefix tree. CRC-32 is
    continued from one boundary to the next over memoryview slices (no copies,
    about 2 GB/s); the boundary's index in the high bits keeps collisions between
    different depths from ever matching.
    """
    view = memoryview(data)
    hashes = []
    h = 0
    previous = 0
    size = len(data)
    for index, position in enumerate(boundaries(block_bytes, max_bytes)):
        if position > size:
            break
        h = zlib.crc32(view[previous:position], h)
        hashes.append(h | index << 32)
        previous = position
    return hashes
