"""The simulator as a prefill or a decode service, checking the protocol as engines do.

``--pd-role prefill|decode`` with ``--pd-mode vllm|sglang``:

- vLLM, prefill: a request whose ``kv_transfer_params`` ask for a remote decode
  is prefilled (the prompt's time is spent here), answered with one token and the
  ``kv_transfer_params`` that locate its KV blocks (``remote_engine_id``,
  ``remote_block_ids``, ``remote_host``, ``remote_port``), which it then holds
  for a decode to take. Any other request is served whole, as vLLM does.
- vLLM, decode: a request must carry a prefill's ``kv_transfer_params``; the
  decode takes the blocks from that prefill (``GET /mock/kv/ENGINE/BLOCKS`` on
  ``remote_host:remote_port``, which here is the prefill's HTTP port) and
  refuses the request (400) if it holds none, as a NIXL transfer would fail.
- SGLang, prefill: a request must carry ``bootstrap_room`` (one, or one per
  sequence); once prefilled, its rooms are marked seen on the bootstrap server
  (``--bootstrap-port``, and the HTTP port too).
- SGLang, decode: a request must carry ``bootstrap_host``, ``bootstrap_port`` and
  ``bootstrap_room``; it answers only once that prefill has seen every room
  (``GET /mock/room/ROOM?wait=S`` there), and fails after
  ``--bootstrap-timeout`` otherwise.

Either way the prompt's time (TTFT, prefill per token) is spent on the prefill,
and token generation on the decode. ``GET /mock/stats`` counts both.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from typing import Any

MAX_HELD = 10_000  # rooms seen, KV transfers held: old ones are forgotten first


class Disaggregation:
    def __init__(self, role: str, mode: str, bootstrap_timeout_s: float = 10.0) -> None:
        self.role = role
        self.mode = mode
        self.engine_id = uuid.uuid4().hex
        self.bootstrap_timeout_s = bootstrap_timeout_s
        self.host = "127.0.0.1"  # set by the server: where a decode reaches this prefill
        self.port = 0
        self._blocks = 0
        self.held: OrderedDict[str, None] = OrderedDict()  # vLLM: KV transfers not taken
        self.rooms: OrderedDict[int, asyncio.Event] = OrderedDict()  # SGLang: rooms
        self.prefilled = 0
        self.decoded = 0
        self.refused = 0
        self.taken = 0  # vLLM: transfers a decode took from here

    def stats(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "mode": self.mode,
            "prefilled": self.prefilled,
            "decoded": self.decoded,
            "refused": self.refused,
            "kv_taken": self.taken,
            "kv_held": len(self.held),
            "rooms_seen": sum(1 for e in self.rooms.values() if e.is_set()),
        }

    # --- vLLM --------------------------------------------------------------------

    def hold_blocks(self, prompt_tokens: int) -> dict[str, Any]:
        """A prefill's answer: where its KV blocks are, held until a decode takes them."""
        count = max(1, prompt_tokens // 16)
        blocks = list(range(self._blocks, self._blocks + count))
        self._blocks += count
        self._remember(self.held, f"{blocks[0]}-{blocks[-1]}", None)
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_block_ids": blocks,
            "remote_host": self.host,
            "remote_port": self.port,
            "tp_size": 1,
        }

    def take_blocks(self, engine_id: str, key: str) -> bool:
        if engine_id != self.engine_id or key not in self.held:
            return False
        del self.held[key]
        self.taken += 1
        return True

    async def fetch_kv(self, params: Any) -> str | None:
        """A decode takes the KV its ``kv_transfer_params`` name; None, or why not."""
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            return (
                "kv_transfer_params with do_remote_prefill are required: a decode service "
                "serves only what a prefill service computed (send through the router)"
            )
        blocks = params.get("remote_block_ids")
        host, port = params.get("remote_host"), params.get("remote_port")
        engine = params.get("remote_engine_id")
        if not (isinstance(blocks, list) and blocks and host and isinstance(port, int)):
            return "kv_transfer_params do not locate any KV blocks"
        path = f"/mock/kv/{engine}/{blocks[0]}-{blocks[-1]}"
        status = await ask(str(host), port, path, self.bootstrap_timeout_s)
        if status != 200:
            return f"the prefill at {host}:{port} holds no such KV blocks (engine {engine})"
        return None

    # --- SGLang ------------------------------------------------------------------

    def room(self, room: int) -> asyncio.Event:
        event = self.rooms.get(room)
        if event is None:
            event = asyncio.Event()
            self._remember(self.rooms, room, event)
        return event

    async def wait_rooms(self, fields: dict[str, Any]) -> str | None:
        """A decode waits until its prefill has seen every room; None, or why not."""
        rooms, hosts, ports = (
            _listed(fields.get(k)) for k in ("bootstrap_room", "bootstrap_host", "bootstrap_port")
        )
        if not rooms or not hosts or len(hosts) != len(rooms) or len(ports) != len(rooms):
            return (
                "bootstrap_host, bootstrap_port and bootstrap_room are required (one each, or "
                "one per sequence): a decode service serves only with a prefill (send "
                "through the router)"
            )
        for room, host, port in zip(rooms, hosts, ports, strict=True):
            if not isinstance(room, int) or not isinstance(port, int):
                return "bootstrap_room and bootstrap_port must be integers"
            if await self._ask_room(room, str(host), port) != 200:
                return f"bootstrap room {room} was never prefilled at {host}:{port}"
        return None

    async def _ask_room(self, room: int, host: str, port: int) -> int:
        """Ask the prefill's bootstrap server whether ``room`` was prefilled, waiting up
        to the bootstrap timeout; its answer's status, 0 if none came."""
        deadline = asyncio.get_running_loop().time() + self.bootstrap_timeout_s
        while True:
            # Like SGLang's decode: a bootstrap server not up yet is asked again.
            wait = max(0.0, deadline - asyncio.get_running_loop().time())
            status = await ask(host, port, f"/mock/room/{room}?wait={wait}", wait + 5)
            if status or wait <= 0:
                return status
            await asyncio.sleep(0.05)

    def rooms_of(self, fields: dict[str, Any]) -> list[int] | None:
        rooms = _listed(fields.get("bootstrap_room"))
        if not rooms or not all(isinstance(r, int) for r in rooms):
            return None
        return rooms

    def _remember(self, table: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        table[key] = value
        while len(table) > MAX_HELD:
            table.popitem(last=False)


def _listed(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


async def ask(host: str, port: int, path: str, timeout_s: float) -> int:
    """GET ``path`` on a fresh connection; its status, or 0 if it could not be had."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close"
                writer.write(request.encode() + b"\r\n\r\n")
                line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return 0
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
