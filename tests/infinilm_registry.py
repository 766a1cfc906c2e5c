"""A stand-in for the InfiniLM-SVC registry (its API as infinilm-svc-router.md describes it).

``python tests/infinilm_registry.py --port 0`` prints ``listening on http://...``.
POST /services registers, GET /services?healthy=true lists the entries whose
status is "running" and whose last heartbeat is under 120 s old, DELETE
/services/{name} removes, POST /services/{name}/heartbeat refreshes.

A fault for the tests, as a broken registry: ``POST /fault`` {"deep": N} answers
GET /services with an entry nested N levels deep (0: the list again). Each GET
/services is printed (``listed``) for the tests to count.
"""

from __future__ import annotations

import argparse
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HEALTHY_FOR_S = 120
entries: dict[str, dict] = {}
fault = {"deep": 0}
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/services":
            self._send(404, {"error": "not found"})
            return
        healthy_only = parse_qs(url.query).get("healthy") == ["true"]
        now = time.time()
        with lock:
            listed = [
                e
                for e in entries.values()
                if not healthy_only
                or (e["status"] == "running" and now - e["last_heartbeat"] < HEALTHY_FOR_S)
            ]
        print("listed", flush=True)
        depth = fault["deep"]
        if depth:
            nested = b"[" * depth + b"]" * depth
            body = b'{"services": [{"name": "deep", "metadata": %s}]}' % nested
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self._send(200, {"services": listed})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path == "/fault":
            fault.update(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self._send(200, fault)
        elif path == "/services":
            data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data.setdefault("status", "running")
            data["last_heartbeat"] = time.time()
            with lock:
                entries[data["name"]] = data
            self._send(201, {"registered": data["name"]})
        elif path.startswith("/services/") and path.endswith("/heartbeat"):
            name = path[len("/services/") : -len("/heartbeat")]
            with lock:
                if name in entries:
                    entries[name]["last_heartbeat"] = time.time()
            self._send(200 if name in entries else 404, {"name": name})
        else:
            self._send(404, {"error": "not found"})

    def do_DELETE(self) -> None:
        name = urlsplit(self.path).path[len("/services/") :]
        with lock:
            found = entries.pop(name, None)
        self._send(200 if found else 404, {"deleted": name})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--ssl-certfile", help="serve HTTPS (with --ssl-keyfile)")
    parser.add_argument("--ssl-keyfile")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    scheme = "http"
    if args.ssl_certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    print(f"listening on {scheme}://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
