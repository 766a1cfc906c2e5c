"""Registrations through the admin API: ``POST /services``, ``DELETE /services/{name}``,
``POST /services/{name}/heartbeat``, ``GET /services/{name}/health``, and the Rust
routers' worker API on the same registrations.

A registration with a TTL is removed when its heartbeats stop (checked every
``TICK_S``). A registration cannot take over a configured service (the config
outranks it), and takes a name over from a polled source. A registration of
another ``metadata.type`` than openai-api (InfiniLM's babysitter) is kept and
listed, never routed to. In a multi-worker router these run in the supervisor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import msgspec

from lmproxy import decode
from lmproxy.config import (
    MAX_METADATA,
    Config,
    ConfigError,
    ServiceSpec,
    check_name,
    entry_url,
    points_at,
    spec_from_entry,
)
from lmproxy.errors import Fault, encode_json, error_payload
from lmproxy.fleet.roster import Entry, Roster, Service, kept_entry, service_entry
from lmproxy.fleet.sources import Loop, Members
from lmproxy.telemetry.logs import iso_time, printable

log = logging.getLogger("lmproxy")

Payload = tuple[int, Any]
TICK_S = 0.5  # how often TTLs are checked


# What one registration that is never routed to may make the router hold.
MAX_ENTRIES = 1000
MAX_ENTRY_METADATA = MAX_METADATA  # bytes of JSON
MAX_ENTRY_TEXT = 256  # characters of its url, type or status


class _Registration(msgspec.Struct):
    ttl: float | None = None


class _EntryMetadata(msgspec.Struct):
    type: str


class _OtherEntry(msgspec.Struct):
    """A registration of another type than openai-api, as InfiniLM's babysitter sends it."""

    name: str
    metadata: dict[str, Any]
    url: str | None = None
    host: str | None = None
    port: int | None = None
    status: str = "running"


class _Heartbeat(msgspec.Struct):
    status: str | None = None


class _WorkerRequest(msgspec.Struct):
    """A worker as POST /workers, /add_worker and /remove_worker name it. The Rust
    routers' other fields (priority, cost, labels...) steer features lmproxy has not:
    they are skipped, as the Rust routers skip what they do not know."""

    url: str
    worker_type: str = "regular"
    model_id: str | None = None
    bootstrap_port: int | None = None
    api_key: str | None = None


_ROLES = {"regular": "both", "prefill": "prefill", "decode": "decode"}
_WORKER_TYPES = {"both": "regular", "prefill": "prefill", "decode": "decode"}
_FAULTS = {400: "bad_request", 404: "not_found", 409: "conflict"}
WORKER_SHAPE = (
    '{"url": "http://host:port"}, optional "worker_type" (regular, prefill, decode), '
    '"model_id", "bootstrap_port" (a prefill)'
)


def _worker_error(fault: Fault, message: str, code: str | None = None) -> Payload:
    """The router's error shape, with the Rust routers' ``code`` beside it."""
    status, payload = error_payload(fault, message)
    payload["code"] = code or fault.name
    return status, payload


def worker_info(service: Service) -> dict[str, Any]:
    """A service as the Rust routers describe a worker."""
    info: dict[str, Any] = {
        "id": service.name,
        "url": service.url,
        "model_id": service.models[0] if service.models else None,
        "models": list(service.models),
        "worker_type": _WORKER_TYPES.get(service.role, service.role),
        "is_healthy": service.healthy,
        "load": service.in_flight,
        "connection_mode": "Http",
        "origin": service.origin,
    }
    if service.spec.bootstrap_port is not None:
        info["bootstrap_port"] = service.spec.bootstrap_port
    return info


def worker_list(roster: Roster) -> dict[str, Any]:
    workers = [worker_info(s) for s in roster.services.values()]
    counts = {"prefill": 0, "decode": 0, "regular": 0}
    for worker in workers:
        counts[worker["worker_type"]] += 1
    return {
        "workers": workers,
        "total": len(workers),
        "stats": {f"{kind}_count": n for kind, n in counts.items()},
    }


def describe(service: Service) -> dict[str, Any]:
    """A service as the admin API answers: its /services entry and its health path."""
    return {**service_entry(service), "health_path": service.spec.health_path}


def entry_from(data: dict[str, Any]) -> Entry:
    """A registration of another ``metadata.type``, checked and bounded; ConfigError else."""
    try:
        raw = msgspec.convert(data, _OtherEntry)
        kind = msgspec.convert(raw.metadata, _EntryMetadata).type
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None
    check_name(raw.name)
    url = entry_url(raw.url, raw.host, raw.port)
    for what, text in (("url", url), ("metadata.type", kind), ("status", raw.status)):
        _check_text(what, text)
    if len(encode_json(raw.metadata)) > MAX_ENTRY_METADATA:
        raise ConfigError(f"metadata is over {MAX_ENTRY_METADATA // 1024} KiB of JSON")
    now = time.time()
    return Entry(raw.name, url, kind, raw.status, raw.metadata, now, now)


def _check_text(what: str, text: str) -> None:
    if not 0 < len(text) <= MAX_ENTRY_TEXT or not text.isprintable():
        raise ConfigError(f"{what} must be 1 to {MAX_ENTRY_TEXT} printable characters")


class AdminSource:
    """The services and entries registered through the admin API, and their TTLs."""

    origin = "admin"
    what = "the admin API"

    def __init__(self, members: Members, config: Config, own_port: Callable[[], int]) -> None:
        self.members = members
        self.roster = members.roster
        self.config = config
        self._own_port = own_port  # the port bound, once the router listens
        self._expires: dict[str, tuple[float, float]] = {}  # name -> (ttl, monotonic deadline)
        # Registered service -> epoch of its registration or last heartbeat (for
        # /services/{name}/health; a kept entry carries its own last_heartbeat).
        self._heartbeats: dict[str, float] = {}
        self._clock = Loop(self._expire, lambda: TICK_S, "expiring registrations")

    def start(self) -> None:
        self._clock.run(True, "fleet:tick")

    def apply(self, config: Config) -> None:
        self.config = config

    async def stop(self) -> None:
        await self._clock.stop()

    def found(self) -> set[str]:
        return self.members.of(self.origin) | set(self.roster.entries)

    def status(self) -> dict[str, Any]:
        return {}

    def forget(self, name: str) -> None:
        self._expires.pop(name, None)
        self._heartbeats.pop(name, None)

    async def _expire(self) -> None:
        """Take out registrations whose TTL passed."""
        now = time.monotonic()
        for name, (ttl, deadline) in list(self._expires.items()):
            if now >= deadline:
                self.members.remove(name, f"no heartbeat for {ttl:g}s (its ttl)")

    # --- the admin API ------------------------------------------------------------

    def admin(self, method: bytes, path: bytes, body: bytes) -> Payload:
        """``POST /services``; ``GET|DELETE /services/{name}``;
        ``POST /services/{name}/heartbeat``; ``GET /services/{name}/health``; and the Rust
        routers' worker API (:meth:`workers`)."""
        if not path.startswith(b"/services"):
            return self.workers(method, path, body)
        if path == b"/services":
            if method != b"POST":
                return error_payload(
                    Fault.METHOD_NOT_ALLOWED, "/services answers GET (list) and POST (register)"
                )
            return self.register(body)
        rest = unquote(path[len(b"/services/") :].decode("utf-8", "replace"))
        name, _, action = rest.partition("/")
        if action == "heartbeat":
            if method != b"POST":
                return error_payload(
                    Fault.METHOD_NOT_ALLOWED, "heartbeats are POST /services/{name}/heartbeat"
                )
            return self.heartbeat(name, body)
        if action == "health":
            if method != b"GET":
                return error_payload(
                    Fault.METHOD_NOT_ALLOWED, "/services/{name}/health answers GET"
                )
            return self.health_of(name)
        if action:
            return error_payload(Fault.NOT_FOUND, f"no route for {printable(path)}")
        return self._one(method, name)

    def _one(self, method: bytes, name: str) -> Payload:
        """``GET|DELETE /services/{name}``."""
        if method == b"DELETE":
            return self.deregister(name)
        if method != b"GET":
            return error_payload(
                Fault.METHOD_NOT_ALLOWED, f"/services/{name} answers GET and DELETE"
            )
        service = self.roster.services.get(name)
        if service is not None:
            return 200, describe(service)
        entry = self.roster.entries.get(name)
        if entry is not None:
            return 200, kept_entry(entry)
        return error_payload(Fault.NOT_FOUND, f"no service named {name!r}")

    # --- the Rust routers' worker API -----------------------------------------------

    def workers(self, method: bytes, path: bytes, body: bytes) -> Payload:
        """sglang-router's and vllm-router's worker API, on the same registrations as
        ``POST /services``: ``GET|POST /workers``, ``GET|DELETE /workers/{url or name}``,
        ``GET /list_workers``, ``POST /add_worker`` and ``/remove_worker`` (their
        ``?url=`` is the body's ``url`` here: app.py moves it). A worker is added at
        once, so the answers that are 202 there (a queued job) say it is done."""
        if path == b"/list_workers":
            return 200, {"urls": [s.url for s in self.roster.services.values()]}
        if path == b"/workers" and method in (b"GET", b"HEAD"):
            return 200, worker_list(self.roster)
        if path in (b"/workers", b"/add_worker"):
            return self.add_worker(body, legacy=path == b"/add_worker")
        if path == b"/remove_worker":
            try:
                url = decode.json(body, into=_WorkerRequest).url
            except (msgspec.DecodeError, msgspec.ValidationError):
                return _worker_error(Fault.BAD_REQUEST, "give the worker's URL: ?url=http://...")
            return self.remove_worker(url, legacy=True)
        key = unquote(path[len(b"/workers/") :].decode("utf-8", "replace"))
        if method == b"DELETE":
            return self.remove_worker(key, legacy=False)
        service = self._worker(key)
        if service is None:
            return _worker_error(Fault.NOT_FOUND, f"Worker {key} not found", "WORKER_NOT_FOUND")
        return 200, worker_info(service)

    def _worker(self, key: str) -> Service | None:
        """The service a worker key names: its URL (as the Rust routers key workers) or
        its lmproxy name."""
        services = self.roster.services
        url = key.rstrip("/")
        return services.get(key) or next((s for s in services.values() if s.url == url), None)

    def add_worker(self, body: bytes, legacy: bool) -> Payload:
        try:
            request = decode.json(body, into=_WorkerRequest)
            role = _ROLES.get(request.worker_type)
            if role is None:
                raise ConfigError(
                    f"worker_type must be regular, prefill or decode, got {request.worker_type!r}"
                )
            if request.api_key is not None:
                raise ConfigError(
                    "a worker api_key has no counterpart: lmproxy passes each client's own "
                    "Authorization header to the worker; register it without one"
                )
            spec = ServiceSpec(
                url=request.url,
                models=[request.model_id] if request.model_id else [],
                role=role,
                bootstrap_port=request.bootstrap_port,
            )
        except (msgspec.DecodeError, msgspec.ValidationError, ConfigError) as exc:
            return _worker_error(
                Fault.BAD_REQUEST,
                f"invalid worker: {exc}; expected {WORKER_SHAPE}",
                "ADD_WORKER_FAILED",
            )
        existing = self._worker(spec.base_url)
        if existing is not None:
            return _worker_error(
                Fault.CONFLICT,
                f"Worker already exists at URL {spec.url!r} (service {existing.name!r}); "
                f"DELETE /workers/{existing.name} first to replace it",
                "WORKER_ALREADY_EXISTS",
            )
        status, answer = self.register(encode_json(spec))
        if status >= 400:
            return _worker_error(Fault(_FAULTS.get(status, "bad_request")), answer["error"])
        name = answer["name"]
        if legacy:
            return 200, {"message": f"Successfully added worker: {spec.url}", "url": spec.url}
        # 202 is what their clients wait for (a job queued); here it is done already.
        return 202, {
            "status": "accepted",
            "worker_id": name,
            "url": spec.url,
            "location": f"/workers/{name}",
            "message": "Worker added",
        }

    def remove_worker(self, key: str, legacy: bool) -> Payload:
        service = self._worker(key)
        if service is None:
            return _worker_error(Fault.NOT_FOUND, f"Worker {key} not found", "WORKER_NOT_FOUND")
        self.members.remove(service.name, "removed through the worker API")
        if legacy:
            return 200, {"message": f"Successfully removed worker: {key}", "url": service.url}
        return 202, {"status": "accepted", "worker_id": service.name, "message": "Worker removed"}

    def register(self, body: bytes) -> Payload:
        try:
            data = decode.json(body)
            if not isinstance(data, dict):
                raise ConfigError("expected a JSON object")
            options = msgspec.convert(data, _Registration)
            # Another type (InfiniLM's babysitter): kept and listed, never routed to.
            target: ServiceSpec | Entry = spec_from_entry(data) or entry_from(data)
        except (msgspec.DecodeError, msgspec.ValidationError, ConfigError) as exc:
            return error_payload(
                Fault.BAD_REQUEST, f"invalid registration: {exc}; expected {REGISTRATION_SHAPE}"
            )
        ttl = options.ttl if options.ttl is not None else self.config.registration_ttl
        refused = self._refusal(target, ttl)
        if refused is not None:
            return refused
        if isinstance(target, Entry):
            created, answer = self._keep(target)
        else:
            created, answer = self._add(target)
        name = target.name
        self.members.returned(name)
        if ttl:
            self._expires[name] = (ttl, time.monotonic() + ttl)
        else:
            self._expires.pop(name, None)
        log.info("service %s registered (ttl %s)", name, f"{ttl:g}s" if ttl else "none")
        return (201 if created else 200), {**answer, "ttl": ttl or None}

    def _refusal(self, target: ServiceSpec | Entry, ttl: float) -> Payload | None:
        """Why a registration cannot be taken (None: it can)."""
        if isinstance(target, ServiceSpec) and points_at(
            target, self.config.host, self._own_port()
        ):
            return error_payload(
                Fault.BAD_REQUEST,
                f"{target.url} is this router's own address: requests would loop; "
                "register the backend's address",
            )
        if ttl < 0:
            return error_payload(Fault.BAD_REQUEST, "ttl must be >= 0 seconds (0: no expiry)")
        current = self.roster.services.get(target.name)
        if current is not None and self.members.rank(current.origin) < self.members.rank(
            self.origin
        ):
            return error_payload(
                Fault.CONFLICT,
                f"service {target.name!r} is defined in the config; change the config "
                "and reload (SIGHUP), or register under another name",
            )
        entries = self.roster.entries
        if isinstance(target, Entry) and target.name not in entries and len(entries) >= MAX_ENTRIES:
            return error_payload(
                Fault.BAD_REQUEST,
                f"the router keeps at most {MAX_ENTRIES} registrations of types "
                "other than openai-api; delete some (DELETE /services/{name})",
            )
        return None

    def _keep(self, entry: Entry) -> tuple[bool, dict[str, Any]]:
        """Keep an entry of another type: (whether it is new, its answer)."""
        if entry.name in self.roster.services:
            self.members.remove(entry.name, f"registered again, as type {entry.type!r}")
        created = entry.name not in self.roster.entries
        self.roster.keep(entry)
        return created, kept_entry(entry)

    def _add(self, spec: ServiceSpec) -> tuple[bool, dict[str, Any]]:
        """Add or change a registered service: (whether it is new, its answer)."""
        self.roster.drop(spec.name, "registered again, as type 'openai-api'")
        service, created = self.members.put(spec, self.origin)
        self._heartbeats[spec.name] = time.time()  # an entry keeps its own
        return created, describe(service)

    def deregister(self, name: str) -> Payload:
        if self.members.remove(name, "deregistered through the admin API") is None:
            return error_payload(Fault.NOT_FOUND, f"no service named {name!r}")
        # "message" is what the InfiniLM registry answers; "removed" is lmproxy's.
        return 200, {"removed": name, "message": f"Service '{name}' unregistered successfully"}

    def heartbeat(self, name: str, body: bytes = b"") -> Payload:
        """Keep a registration's ttl alive. An entry's heartbeat may carry a new
        ``status``, as the InfiniLM registry allows; a service's health is the
        router's checks' alone, so there a status is ignored."""
        service = self.roster.services.get(name)
        entry = self.roster.entries.get(name)
        if service is None and entry is None:
            # "not found": what InfiniLM's babysitter looks for before its server registers.
            return error_payload(
                Fault.NOT_FOUND,
                f"service {name!r} not found; register it again with POST /services",
            )
        status = None
        if body.strip():
            try:
                status = decode.json(body, into=_Heartbeat).status
                if status is not None:
                    _check_text("status", status)
            except (msgspec.DecodeError, msgspec.ValidationError, ConfigError) as exc:
                return error_payload(
                    Fault.BAD_REQUEST, f"invalid heartbeat body: {exc}; send none, or {{}}"
                )
        expiry = self._expires.get(name)
        if expiry is not None:
            self._expires[name] = (expiry[0], time.monotonic() + expiry[0])
        now = time.time()
        if entry is not None:
            entry.last_heartbeat = now
            if status is not None:
                entry.status = status
            healthy = entry.healthy
        else:
            assert service is not None
            self._heartbeats[name] = now
            healthy = service.healthy
        return 200, {
            "name": name,
            "healthy": healthy,
            "ttl": expiry[0] if expiry else None,
            "message": "Heartbeat received",
            "timestamp": iso_time(now),
        }

    def health_of(self, name: str) -> Payload:
        """``GET /services/{name}/health`` in the InfiniLM registry's shape. A service's
        health is the router's own checks'; an entry's, its heartbeats' (never probed)."""
        service = self.roster.services.get(name)
        entry = self.roster.entries.get(name)
        if service is not None:
            healthy = service.healthy
            status = (
                "unknown" if service.last_check is None else "healthy" if healthy else "unhealthy"
            )
            last = self._heartbeats.get(name) or service.last_check or 0.0
        elif entry is not None:
            healthy = entry.healthy
            status = "healthy" if healthy else "unhealthy"
            last = entry.last_heartbeat
        else:
            return error_payload(Fault.NOT_FOUND, f"Service '{name}' not found")
        return 200, {
            "service": name,
            "health_status": status,
            "is_healthy": healthy,
            "last_heartbeat": last,
            "timestamp": iso_time(time.time()),
        }


REGISTRATION_SHAPE = (
    '{"name": "...", "url": "http://host:port"} (or "host" and "port"), optional '
    '"models": [...] (or metadata.models), "weight", "health_path", "max_in_flight", "ttl"; '
    'an entry of another metadata.type ("InfiniLM": a babysitter) is kept and listed, '
    "never routed to"
)
