"""A backend that answers every path with what it received: for forwarded-path tests.

``python tests/echo_backend.py --port 0 --name A --model m`` prints ``listening on
http://127.0.0.1:PORT``. ``GET /health`` and ``GET /v1/models`` answer as an engine's
do; ``GET /echo/seen`` lists the other requests it got (method, target, body length
and SHA-256, Content-Type), oldest first. Every other request is answered 200 with
``{"text", "backend", "method", "path", "length", "sha256"}``, or 404 (``{"detail":
"Not Found", "backend"}``) for a path under ``/nope``, as an engine answers a path it
does not serve.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

seen: list[dict[str, object]] = []
lock = threading.Lock()
settings: dict[str, object] = {"name": "echo", "models": []}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the router pools its connections

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200, {"status": "healthy"})
            return
        if path == "/v1/models":
            models = settings["models"]
            assert isinstance(models, list)
            self._send(200, {"object": "list", "data": [{"id": m} for m in models]})
            return
        if path == "/metrics":
            self._send(404, {"detail": "Not Found"})
            return
        if path == "/echo/seen":
            with lock:
                self._send(200, {"seen": list(seen)})
            return
        entry = {
            "backend": settings["name"],
            "method": self.command,
            "path": self.path,
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "content_type": self.headers.get("Content-Type"),
        }
        with lock:
            seen.append(entry)
        if path.startswith("/nope"):
            self._send(404, {"detail": "Not Found", "backend": settings["name"]})
            return
        self._send(200, {"text": "echo", **entry})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="echo")
    parser.add_argument("--model", action="append", default=[])
    args = parser.parse_args()
    settings["name"] = args.name
    settings["models"] = args.model
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
