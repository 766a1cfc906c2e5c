"""A stand-in Kubernetes API server, for the discovery tests (no cluster runs here).

``python tests/kube_apiserver.py --token T [--ssl-certfile F --ssl-keyfile K]``
prints ``apiserver listening on 127.0.0.1:PORT`` and ``control listening on
127.0.0.1:PORT``. It serves the two calls Kubernetes discovery makes, as the real
API server does:

- ``GET /api/v1/namespaces/NS/pods?labelSelector=...&limit=N[&continue=...]``: a
  PodList, paged, with the current resourceVersion;
- the same with ``watch=1&resourceVersion=RV``: a chunked stream of JSON lines
  (``ADDED``, ``MODIFIED``, ``DELETED``, ``BOOKMARK`` with
  ``allowWatchBookmarks``), starting after RV, ended after ``timeoutSeconds``; an
  RV older than the history kept is answered with an ``ERROR`` event carrying a
  410 ``Expired`` Status, as etcd compaction makes the real one answer.

A wrong bearer token gets 401 with a Status object. Pods are whole objects as
``kubectl get pod -o json`` prints them (the fields discovery ignores included).

The control port (plain HTTP, JSON bodies) is how a test changes the cluster:
``PUT /pods/NAME`` {"ip", "ready", "phase", "labels", "annotations"},
``POST /pods/NAME/terminate`` (sets deletionTimestamp), ``DELETE /pods/NAME``,
``POST /drop`` (cuts every open watch), ``POST /expire`` (compacts the history
and cuts the watches: the next watch gets 410). Every API call is printed
(``list ...``, ``watch ...``, ``refused ...``) for the tests to count.

Faults, as a broken or hostile API server (or a proxy in front of one) would
send them: ``POST /trickle`` {"bytes": N, "after": M} writes each later watch
event's first M bytes in one chunk and the rest in chunks of N bytes (N 0: one
chunk, as the real one does); ``POST /deep``
{"name", "depth"} sends a MODIFIED event of a pod with a field nested ``depth``
levels deep; ``POST /flood`` {"count", "rounds", "annotations", "delete"} adds
``count`` Ready pods named ``flood-I`` with those annotations, changes each
``rounds - 1`` more times, then deletes them if asked (all one answer).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import ssl
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

NAMESPACE = "default"


class Cluster:
    def __init__(self, token: str, bookmark_s: float, watch_cap_s: float) -> None:
        self.token = token
        self.bookmark_s = bookmark_s
        self.watch_cap_s = watch_cap_s  # ends watches sooner than asked, to test resuming
        self.version = 100
        self.pods: dict[str, dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.oldest = 0  # watches from before this resourceVersion get 410
        self.watchers: set[asyncio.Queue[tuple[str, dict[str, Any]] | None]] = set()
        self.chunk_bytes = 0  # /trickle: the size of a watch event's chunks (0: whole)
        self.chunk_after = 0  # /trickle: the bytes of an event sent whole first

    def bump(self) -> int:
        self.version += 1
        return self.version

    def emit(self, kind: str, pod: dict[str, Any]) -> None:
        version = int(pod["metadata"]["resourceVersion"])
        self.history.append((version, kind, pod))
        for queue in self.watchers:
            queue.put_nowait((kind, pod))

    def put(self, name: str, spec: dict[str, Any]) -> None:
        existing = self.pods.get(name)
        pod = pod_object(name, spec, self.bump(), existing)
        self.pods[name] = pod
        self.emit("MODIFIED" if existing else "ADDED", pod)

    def terminate(self, name: str) -> None:
        pod = json.loads(json.dumps(self.pods[name]))
        pod["metadata"]["deletionTimestamp"] = now()
        pod["metadata"]["deletionGracePeriodSeconds"] = 30
        pod["metadata"]["resourceVersion"] = str(self.bump())
        self.pods[name] = pod
        self.emit("MODIFIED", pod)

    def delete(self, name: str) -> None:
        pod = self.pods.pop(name)
        pod["metadata"]["resourceVersion"] = str(self.bump())
        self.emit("DELETED", pod)

    def drop(self) -> None:
        for queue in self.watchers:
            queue.put_nowait(None)

    def deep(self, name: str, depth: int) -> None:
        """A pod event too deep for a recursive decoder: json.dumps could not write it."""
        pod = pod_object(name, {"ip": "10.9.9.9", "labels": {"app": "vllm"}}, self.bump(), None)
        pod["spec"]["nested"] = "@"
        text = json.dumps(pod).replace('"@"', "[" * depth + "]" * depth)
        # Kept as its text, which watch() sends as it is.
        self.emit("MODIFIED", {"metadata": pod["metadata"], "raw": text})

    def flood(self, count: int, rounds: int, annotations: dict[str, str], delete: bool) -> None:
        for turn in range(rounds):
            for i in range(count):
                ip = f"10.200.{i // 250}.{i % 250 + 1}"
                changed = {**annotations, "turn": str(turn)}
                self.put(
                    f"flood-{i}", {"ip": ip, "labels": {"app": "vllm"}, "annotations": changed}
                )
        if delete:
            for i in range(count):
                self.delete(f"flood-{i}")

    def expire(self) -> None:
        self.oldest = self.bump()
        self.history.clear()
        self.drop()


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def pod_object(
    name: str, spec: dict[str, Any], version: int, existing: dict[str, Any] | None
) -> dict[str, Any]:
    """A pod as the API server returns it, e.g. one replica of a vLLM Deployment."""
    ready = "True" if spec.get("ready", True) else "False"
    phase = spec.get("phase", "Running")
    created = existing["metadata"]["creationTimestamp"] if existing else now()
    uid = existing["metadata"]["uid"] if existing else str(uuid.uuid4())
    ip = spec.get("ip")
    conditions = [
        {"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": created},
        {"type": "Initialized", "status": "True", "lastTransitionTime": created},
        {"type": "Ready", "status": ready, "lastTransitionTime": now()},
        {"type": "ContainersReady", "status": ready, "lastTransitionTime": now()},
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": created},
    ]
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions if phase == "Running" else conditions[-1:],
        "hostIP": "10.0.0.4",
        "hostIPs": [{"ip": "10.0.0.4"}],
        "qosClass": "Burstable",
        "startTime": created,
        "containerStatuses": [
            {
                "name": "vllm",
                "image": "vllm/vllm-openai:v0.11.0",
                "imageID": "docker.io/vllm/vllm-openai@sha256:" + "0" * 64,
                "containerID": "containerd://" + uid.replace("-", ""),
                "ready": ready == "True",
                "restartCount": 0,
                "started": phase == "Running",
                "state": {"running": {"startedAt": created}},
            }
        ],
    }
    if ip and phase == "Running":
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "generateName": name.rsplit("-", 1)[0] + "-",
            "namespace": NAMESPACE,
            "uid": uid,
            "resourceVersion": str(version),
            "creationTimestamp": created,
            "labels": {"pod-template-hash": "7d4b9c8f6d", **spec.get("labels", {})},
            "annotations": spec.get("annotations", {}),
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "vllm-7d4b9c8f6d",
                    "uid": "5f0c2d34-1111-4a6e-9c8d-2b1f0e7a9d01",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "containers": [
                {
                    "name": "vllm",
                    "image": "vllm/vllm-openai:v0.11.0",
                    "args": ["--model", "Qwen/Qwen3-32B", "--port", "8000"],
                    "ports": [{"containerPort": 8000, "name": "http", "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}},
                    "resources": {"limits": {"nvidia.com/gpu": "1"}},
                }
            ],
            "nodeName": "gpu-node-1",
            "restartPolicy": "Always",
            "serviceAccountName": "default",
            "terminationGracePeriodSeconds": 30,
        },
        "status": status,
    }


def matches(pod: dict[str, Any], selector: str) -> bool:
    labels = pod["metadata"].get("labels", {})
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


async def read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str], bytes] | None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return method, target, headers, body


def respond(writer: asyncio.StreamWriter, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    writer.write(
        b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % (status, len(data)) + data
    )


async def api(cluster: Cluster, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = await read_request(reader)
        if request is None:
            return
        method, target, headers, _ = request
        parts = urlsplit(target)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if headers.get("authorization") != f"Bearer {cluster.token}":
            print(f"refused {method} {parts.path}: 401", flush=True)
            respond(writer, 401, status_object(401, "Unauthorized", "Unauthorized"))
            return
        segments = parts.path.strip("/").split("/")
        if method != "GET" or len(segments) != 5 or segments[:3] != ["api", "v1", "namespaces"]:
            respond(writer, 404, status_object(404, "NotFound", "the server could not find it"))
            return
        namespace, selector = segments[3], query.get("labelSelector", "")
        if query.get("watch") in ("1", "true"):
            await watch(cluster, writer, namespace, selector, query)
        else:
            print(f"list ns={namespace} selector={selector}", flush=True)
            respond(writer, 200, page(cluster, namespace, selector, query))
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


def page(cluster: Cluster, namespace: str, selector: str, query: dict[str, str]) -> dict[str, Any]:
    pods = [
        pod for pod in cluster.pods.values() if namespace == NAMESPACE and matches(pod, selector)
    ]
    start = int(base64.b64decode(query["continue"])) if "continue" in query else 0
    limit = int(query.get("limit", "0")) or len(pods)
    items = pods[start : start + limit]
    meta: dict[str, Any] = {"resourceVersion": str(cluster.version)}
    if start + limit < len(pods):
        meta["continue"] = base64.b64encode(str(start + limit).encode()).decode()
    return {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": items}


async def watch(
    cluster: Cluster,
    writer: asyncio.StreamWriter,
    namespace: str,
    selector: str,
    query: dict[str, str],
) -> None:
    since = int(query.get("resourceVersion") or cluster.version)
    print(f"watch ns={namespace} selector={selector} rv={since}", flush=True)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )

    def send(kind: str, obj: dict[str, Any]) -> None:
        text = obj["raw"] if "raw" in obj else json.dumps(obj)
        line = b'{"type": "%s", "object": %s}\n' % (kind.encode(), text.encode())
        size, first = cluster.chunk_bytes or len(line), cluster.chunk_after
        pieces = [line[:first]] if first else []
        pieces += [line[i : i + size] for i in range(first, len(line), size)]
        writer.write(b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces))

    if since < cluster.oldest:
        send("ERROR", status_object(410, "Expired", f"too old resource version: {since}"))
        writer.write(b"0\r\n\r\n")
        return
    queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
    for version, kind, pod in cluster.history:
        if version > since:
            queue.put_nowait((kind, pod))
    cluster.watchers.add(queue)
    bookmarks = query.get("allowWatchBookmarks") == "true"
    deadline = time.monotonic() + min(
        float(query.get("timeoutSeconds", "1800")), cluster.watch_cap_s
    )
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = await asyncio.wait_for(queue.get(), min(left, cluster.bookmark_s))
            except TimeoutError:
                if bookmarks:
                    send(
                        "BOOKMARK",
                        {
                            "kind": "Pod",
                            "apiVersion": "v1",
                            "metadata": {"resourceVersion": str(cluster.version)},
                        },
                    )
                    await writer.drain()
                continue
            if item is None:  # dropped: cut, without the final chunk
                print("watch dropped", flush=True)
                writer.transport.abort()
                return
            kind, pod = item
            if pod["metadata"]["namespace"] == namespace and matches(pod, selector):
                send(kind, pod)
                await writer.drain()
        writer.write(b"0\r\n\r\n")  # timeoutSeconds: a clean end
    finally:
        cluster.watchers.discard(queue)


async def control(
    cluster: Cluster, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        request = await read_request(reader)
        if request is None:
            return
        method, target, _, body = request
        segments = urlsplit(target).path.strip("/").split("/")
        spec = json.loads(body) if body else {}
        if method == "PUT" and segments[0] == "pods":
            cluster.put(segments[1], spec)
        elif method == "POST" and segments[0] == "pods" and segments[2:] == ["terminate"]:
            cluster.terminate(segments[1])
        elif method == "DELETE" and segments[0] == "pods":
            cluster.delete(segments[1])
        elif method == "POST" and segments == ["drop"]:
            cluster.drop()
        elif method == "POST" and segments == ["expire"]:
            cluster.expire()
        elif method == "POST" and segments == ["trickle"]:
            cluster.chunk_bytes = int(spec["bytes"])
            cluster.chunk_after = int(spec.get("after", 0))
        elif method == "POST" and segments == ["deep"]:
            cluster.deep(spec["name"], int(spec["depth"]))
        elif method == "POST" and segments == ["flood"]:
            cluster.flood(
                int(spec["count"]),
                int(spec.get("rounds", 1)),
                spec.get("annotations", {}),
                bool(spec.get("delete")),
            )
        else:
            respond(writer, 404, {"error": "unknown control call"})
            return
        respond(writer, 200, {"resourceVersion": cluster.version})
        await writer.drain()
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--token", required=True)
    parser.add_argument("--ssl-certfile")
    parser.add_argument("--ssl-keyfile")
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    parser.add_argument("--watch-cap", type=float, default=1800.0)
    parser.add_argument("--port", type=int, default=0, help="the API's (to restart on it)")
    args = parser.parse_args()
    cluster = Cluster(args.token, args.bookmark_interval, args.watch_cap)
    context = None
    if args.ssl_certfile:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
    server = await asyncio.start_server(
        lambda r, w: api(cluster, r, w), "127.0.0.1", args.port, ssl=context
    )
    admin = await asyncio.start_server(lambda r, w: control(cluster, r, w), "127.0.0.1", 0)
    print(f"apiserver listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    print(f"control listening on 127.0.0.1:{admin.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.gather(server.serve_forever(), admin.serve_forever())


if __name__ == "__main__":
    asyncio.run(main())
