"""The supervisor <-> worker channel: msgpack messages over a socketpair.

Each message is a dict with an ``op``; a 4-byte big-endian length frames it.
``ask`` sends a message with an ``id`` and waits for the ``reply`` of that id;
everything else goes to the handler in order, so a state update sent before a
reply is applied before the reply is seen. The channel carries control traffic
only (fleet state, in-flight counts, figures on demand), never requests.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from collections.abc import Callable
from typing import Any

import msgspec

log = logging.getLogger("lmproxy")

_LENGTH = struct.Struct(">I")
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode

Message = dict[str, Any]


class ChannelClosed(Exception):
    pass


class Channel:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: Callable[[Message], None],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.handler = handler
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self.closed = False

    def send(self, message: Message) -> None:
        if self.closed:
            return
        data = _encode(message)
        self.writer.write(_LENGTH.pack(len(data)) + data)

    def reply(self, request: Message, message: Message) -> None:
        self.send({**message, "op": "reply", "id": request["id"]})

    async def ask(self, message: Message, timeout_s: float) -> Message:
        ident, future = self.request(message)
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        finally:
            self.forget(ident)

    def request(self, message: Message) -> tuple[int, asyncio.Future[Message]]:
        """Send ``message``; the future gets its reply. No task: a caller on the request
        path adds a callback, and ``forget``s the id if it stops waiting."""
        if self.closed:
            raise ChannelClosed("the channel is closed")
        ident = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        self.send({**message, "id": ident})
        return ident, future

    def forget(self, ident: int) -> None:
        self._waiting.pop(ident, None)

    async def run(self) -> None:
        """Read and dispatch messages until the other side closes."""
        try:
            while True:
                try:
                    head = await self.reader.readexactly(_LENGTH.size)
                    body = await self.reader.readexactly(_LENGTH.unpack(head)[0])
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                message = _decode(body)
                if message.get("op") == "reply":
                    future = self._waiting.get(message["id"])
                    if future is not None and not future.done():
                        future.set_result(message)
                    continue
                try:
                    self.handler(message)
                except Exception:
                    log.exception("control message %r failed", message.get("op"))
        finally:
            self.closed = True
            for future in list(self._waiting.values()):
                if not future.done():
                    future.set_exception(ChannelClosed("the other side went away"))
            self.writer.close()
