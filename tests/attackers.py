"""Hostile clients, run as their own process: ``python tests/attackers.py PORT SECONDS KIND...``.

Each kind keeps ``--connections`` connections attacking for SECONDS seconds,
opening a new one whenever the router closes one, and prints one JSON line of
what it saw: connections opened, how many the router ended, the statuses it
answered. Bounded in time and in connections; loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time
from collections import Counter

BODY = (
    b'{"model":"Qwen3-32B","messages":[{"role":"user","content":"hi"}],'
    b'"stream":true,"max_tokens":4000}'
)
CHAT = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)

# kind -> (what opens the attack, what it then sends again and again, or b"" to go silent)
ATTACKS: dict[str, tuple[bytes, bytes]] = {
    "endless-header-value": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ", b"a" * 16384),
    "endless-header-name": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-", b"b" * 16384),
    "endless-url": (b"GET /", b"c" * 16384),
    "endless-trailer": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\n{\r\n0\r\nX-T: ",
        b"d" * 16384,
    ),
    "endless-chunk-extension": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1;",
        b"e" * 16384,
    ),
    "blank-lines": (b"", b"\r\n" * 8192),
    "pipelined-stats": (b"", b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n" * 200),
    "pipelined-health": (b"", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 200),
    "pipelined-404": (b"", b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n" * 200),
    "pipelined-models": (b"", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n" * 200),
    "slow-body": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{",
        b"",
    ),
    "slow-chunked-body": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\n{\r\n",
        b"",
    ),
    "slow-headers": (b"GET /health HTTP/1.1\r\nHost: x\r\n", b""),
    "silent": (b"", b""),
    "stream-never-read": (CHAT, b""),
    "oversized-then-no-read": (b"GET /health HTTP/1.1\r\nX-Big: " + b"f" * 70000, b"g" * 65536),
    # Under the 64 KiB head bound, but 9,000 headers: refused by count (431), not held.
    "many-headers": (b"GET /health HTTP/1.1\r\n" + b"a:b\r\n" * 9000 + b"\r\n", b""),
    # A body two bytes a read: it must cost about its size, one buffer, not a read's object.
    "trickled-body": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{",
        b"  ",
    ),
    # A request waiting for 100 Continue behind a stream: no 100 inside the stream's body.
    "expect-behind-stream": (
        CHAT + b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 10\r\n\r\n",
        b"",
    ),
}


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened = 0
        self.ended = 0
        self.statuses: Counter[int] = Counter()

    def note(self, opened: int = 0, ended: int = 0, status: int = 0) -> None:
        with self.lock:
            self.opened += opened
            self.ended += ended
            if status:
                self.statuses[status] += 1


def attack(port: int, kind: str, deadline: float, tally: Tally) -> None:
    opening, again = ATTACKS[kind]
    reads = not kind.startswith(("pipelined", "stream-never", "oversized"))
    while time.monotonic() < deadline:
        sock = socket.socket()
        if not reads:  # a client that never reads, with as little buffer as it can have
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            sock.settimeout(2)
            sock.connect(("127.0.0.1", port))
        except OSError:
            time.sleep(0.05)
            continue
        tally.note(opened=1)
        sock.settimeout(0.1)
        try:
            if opening:
                sock.sendall(opening)
            while time.monotonic() < deadline:
                if again:
                    # A time-out: the router stopped reading us, as it should.
                    with contextlib.suppress(TimeoutError):
                        sock.send(again)
                else:
                    time.sleep(0.05)
                if reads:
                    try:
                        data = sock.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        tally.note(ended=1)
                        break
                    if data.startswith(b"HTTP/1.1 "):
                        tally.note(status=int(data[9:12]))
        except OSError:
            tally.note(ended=1)
        finally:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument("kinds", nargs="+", choices=sorted(ATTACKS))
    parser.add_argument("--connections", type=int, default=2, help="per kind")
    args = parser.parse_args()
    deadline = time.monotonic() + min(args.seconds, 60)
    tallies = {kind: Tally() for kind in args.kinds}
    threads = [
        threading.Thread(
            target=attack,
            args=(args.port, kind, deadline, tallies[kind]),
            daemon=True,
        )
        for kind in args.kinds
        for _ in range(args.connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
    report: dict[str, object] = {
        kind: {"opened": t.opened, "ended": t.ended, "statuses": dict(t.statuses)}
        for kind, t in tallies.items()
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
