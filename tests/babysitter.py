"""A stand-in for InfiniLM-SVC's babysitter, as far as a registry sees it.

InfiniLM's ``enhanced_babysitter.py`` (and its Rust twin) runs an inference
server and speaks to a registry in this order, which this process replays
against any registry URL (the InfiniLM registry, or lmproxy's admin API):

1. ``POST /services`` its own entry: ``{name, host, hostname, port: port+1, url,
   status: "running", metadata: {type: "InfiniLM", babysitter: "enhanced", ...}}``;
2. once the server answers ``/v1/models`` (else ``/models``), ``POST /services``
   the server: ``{name: NAME-server, ..., metadata: {type: "openai-api",
   parent_service, models: [ids], models_list: [the listing's objects]}}``;
3. every ``--heartbeat-interval`` seconds, ``POST /services/{name}/heartbeat``
   for both, with no body;
4. on SIGTERM, ``DELETE /services/{name}`` for both, then exit 0.

It starts no server itself: the test starts the simulator as the server.
``python tests/babysitter.py --registry URL --name N --port P`` prints one
line per step ("registered N 201", "heartbeat N 200", "unregistered N 200").
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any


def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # enhanced_babysitter.py's flag is --registry; its Rust twin's, --registry-url.
    parser.add_argument("--registry", "--registry-url", dest="registry_url", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="the inference server's port")
    parser.add_argument("--heartbeat-interval", type=float, default=30.0)
    parser.add_argument("--type", default="InfiniLM", help="the babysitter entry's metadata.type")
    args = parser.parse_args()
    registry = args.registry_url.rstrip("/")
    server_name = f"{args.name}-server"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def say(*words: object) -> None:
        print(*words, flush=True)

    own = {
        "name": args.name,
        "host": args.host,
        "hostname": args.host,
        "port": args.port + 1,
        "url": f"http://{args.host}:{args.port + 1}",
        "status": "running",
        "metadata": {
            "type": args.type,
            "config_file": "service.toml",
            "babysitter": "enhanced",
            "started_at": datetime.now().isoformat(),
        },
    }
    status, _ = call("POST", f"{registry}/services", own)
    say("registered", args.name, status)

    models: list[dict[str, Any]] = []
    while not models and not stop.is_set():
        for path in ("/v1/models", "/models"):
            try:
                code, listing = call("GET", f"http://127.0.0.1:{args.port}{path}")
            except OSError:
                continue
            if code == 200:
                models = listing.get("data", listing) if isinstance(listing, dict) else listing
                break
        else:
            stop.wait(0.2)
    server = {
        "name": server_name,
        "host": args.host,
        "hostname": args.host,
        "port": args.port,
        "url": f"http://{args.host}:{args.port}",
        "status": "running",
        "metadata": {
            "type": "openai-api",
            "parent_service": args.name,
            "babysitter": "enhanced",
            "started_at": datetime.now().isoformat(),
            "models": [m["id"] for m in models],
            "models_list": models,
        },
    }
    status, _ = call("POST", f"{registry}/services", server)
    say("registered", server_name, status)

    while not stop.wait(args.heartbeat_interval):
        for name in (args.name, server_name):
            status, _ = call("POST", f"{registry}/services/{name}/heartbeat")
            say("heartbeat", name, status)

    for name in (args.name, server_name):
        status, _ = call("DELETE", f"{registry}/services/{name}")
        say("unregistered", name, status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
