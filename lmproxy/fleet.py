"""Who is in the fleet: the config, registrations, an InfiniLM-SVC registry, DNS, pods.

Five sources add services, and each manages only its own:

- ``config``: the config file and command line; a SIGHUP reload applies the
  new list (added, changed, removed).
- ``admin``: ``POST /services``, ``DELETE /services/{name}``,
  ``POST /services/{name}/heartbeat``; a registration with a TTL is removed
  when its heartbeats stop.
- ``registry``: ``--registry-url`` polled every ``--registry-sync-interval``
  seconds; a service that leaves the registry is kept for
  ``--service-removal-grace-period`` seconds, so a registry restart or a
  missed heartbeat there does not drop live backends.
- ``dns``: the ``--discover`` names, resolved every ``--discover-interval``
  seconds (``discovery.py``); an address that leaves is kept for the same grace
  period, and a failed lookup removes nothing.
- ``k8s``: the pods ``--k8s-selector`` picks, listed then watched
  (``kube.py``); a pod that stops being Ready, starts terminating or is deleted
  leaves at once (the API server says so for certain), and a lost watch
  removes nothing.

The polled sources and the clock of TTLs and grace periods run as ``repeat``
loops: whatever a step raises, it is logged once and retried with backoff, so no
exception ends a source (``kube.PodWatcher.run`` does the same for the watch).

A name belongs to the first source that claims it, in that order of rank: a
registration cannot take over a configured service, and the registry cannot
take over either. The router's own health checks stay the authority on health
for every source. In a multi-worker router the fleet runs in the supervisor,
and workers mirror its registry.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec

from lmproxy import decode, kube, tls
from lmproxy.config import (
    MAX_METADATA,
    Config,
    ConfigError,
    ServiceSpec,
    check_name,
    entry_url,
    parse_discover,
    points_at,
    spec_from_entry,
    url_port,
)
from lmproxy.discovery import DiscoveryError, lookup, make_resolver
from lmproxy.errors import Fault, encode_json, error_payload
from lmproxy.health import HealthChecker
from lmproxy.load import LoadScraper
from lmproxy.logs import iso_time, masked_url, printable
from lmproxy.probe import ProbeError, http_get
from lmproxy.registry import Entry, Registry, Service, kept_entry, same_backend, service_entry

log = logging.getLogger("lmproxy")

Payload = tuple[int, Any]
RANK = {"config": 0, "admin": 1, "registry": 2}
SOURCES = {"registry": "the registry", "dns": "DNS", "k8s": "Kubernetes discovery"}
TICK_S = 0.5  # how often TTLs and grace periods are checked
FIRST_CHECK_POLL_S = 0.01
# Start-up waits at most this long (or --health-timeout, if shorter) for first checks.
FIRST_CHECKS_MAX_S = 5.0
# After an unexpected failure, a loop waits its interval or a backoff, whichever is
# longer: it doubles per failure in a row, within the Kubernetes watch's own bounds
# (kube.BACKOFF_MIN_S, kube.BACKOFF_MAX_S), and its cause is cut as the watch's is.
BACKOFF_MIN_S = kube.BACKOFF_MIN_S
BACKOFF_MAX_S = kube.BACKOFF_MAX_S
MAX_CAUSE_TEXT = kube.MAX_CAUSE_TEXT
# A registry entry skipped is logged once while it stays wrong: the causes of one
# poll are remembered for the next (at most this many), and at most this many
# new ones are logged per poll.
MAX_SKIPPED_CAUSES = 1000
MAX_SKIPPED_LOGGED = 10


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


def worker_list(registry: Registry) -> dict[str, Any]:
    workers = [worker_info(s) for s in registry.services.values()]
    counts = {"prefill": 0, "decode": 0, "regular": 0}
    for worker in workers:
        counts[worker["worker_type"]] += 1
    return {
        "workers": workers,
        "total": len(workers),
        "stats": {f"{kind}_count": n for kind, n in counts.items()},
    }


class _RegistryListing(msgspec.Struct):
    services: list[dict[str, Any]]


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


class Fleet:
    def __init__(self, registry: Registry, config: Config, instance_id: str = "") -> None:
        self.registry = registry
        self.config = config
        self.own_port = config.port  # the port bound, once the router listens
        self.checker = HealthChecker(
            registry, config.health_interval, config.health_timeout, instance_id
        )
        self.load = LoadScraper(registry, config.load_interval, config.health_timeout, instance_id)
        self._expires: dict[str, tuple[float, float]] = {}  # name -> (ttl, monotonic deadline)
        self._gone_since: dict[str, float] = {}  # registry services no longer listed
        # Registered service -> epoch of its registration or last heartbeat (for
        # /services/{name}/health; a kept entry carries its own last_heartbeat).
        self._heartbeats: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._poller: asyncio.Task[None] | None = None
        self._registry_ok = True
        self._registry_skipped: set[str] = set()  # causes of the last poll's skipped entries
        # DNS discovery: each --discover target's services at its last good lookup, and
        # the targets whose lookups fail now (logged once until they answer again).
        self._discoverer: asyncio.Task[None] | None = None
        self._dns_members: dict[str, set[str]] = {}
        self._dns_failing: set[str] = set()
        # Kubernetes discovery: each selector's watch (by the role its pods get), and
        # the settings it runs with.
        self._pods: dict[str, asyncio.Task[None]] = {}
        self._pods_settings: dict[str, tuple[Any, ...]] = {}
        self._kube_access = (
            kube.resolve_access(config.kubeconfig) if kube.selectors(config) else None
        )  # here, so that missing credentials stop start-up
        self._kube_config_used = config.kubeconfig
        for spec in config.services:
            registry.add(spec, "config")

    def start(self) -> None:
        self.checker.start()
        self.load.start()
        self._tasks.append(
            asyncio.create_task(
                repeat(self._expire, lambda: TICK_S, "expiring registrations"), name="fleet:tick"
            )
        )
        self._follow_registry()
        self._follow_dns()
        self._follow_pods()

    async def first_checks(self, limit_s: float) -> None:
        """Wait, at most ``limit_s``, until every service known at start-up has had its
        first health check: a router that serves before then answers its first clients
        503 for services that are up (sglang-router waits for its workers too). A refused
        connection fails at once; only a backend that hangs makes this wait its limit."""
        deadline = time.monotonic() + limit_s
        services = list(self.registry.services.values())
        while any(s.last_check is None for s in services) and time.monotonic() < deadline:
            await asyncio.sleep(FIRST_CHECK_POLL_S)

    async def stop(self) -> None:
        for task in (self._poller, self._discoverer, *self._pods.values()):
            if task is not None:
                self._tasks.append(task)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.checker.stop()
        await self.load.stop()

    def _follow_registry(self) -> None:
        """Poll the configured registry (or stop polling one no longer configured)."""
        if self.config.registry_url and self._poller is None:
            self._poller = asyncio.create_task(
                repeat(
                    self.sync_registry, lambda: self.config.registry_sync_interval, "registry poll"
                ),
                name="fleet:registry",
            )
        elif not self.config.registry_url and self._poller is not None:
            self._poller.cancel()
            self._poller = None
            self._mark_gone("registry", set(), "came from a registry no longer followed")

    def _follow_dns(self) -> None:
        """Resolve the --discover names (or stop, and let their services go)."""
        if self.config.discover and self._discoverer is None:
            self._discoverer = asyncio.create_task(
                repeat(self.sync_dns, lambda: self.config.discover_interval, "DNS discovery"),
                name="fleet:dns",
            )
        elif not self.config.discover and self._discoverer is not None:
            self._discoverer.cancel()
            self._discoverer = None
            self._dns_members.clear()
            self._mark_gone("dns", set(), "came from DNS discovery, no longer configured")

    def _follow_pods(self) -> None:
        """Watch the pods of each selector (--k8s-selector, and the prefill and decode
        ones); a reload that changes what one watches starts a new watch (whose
        first list prunes what no longer matches), and drops a selector's watch."""
        wanted = kube.selectors(self.config)
        for role in [r for r in self._pods if r not in wanted]:
            self._pods.pop(role).cancel()
            self._pods_settings.pop(role, None)
            self._mark_gone(
                "k8s",
                {s.name for s in self.registry.services.values() if s.role != role},
                "came from Kubernetes discovery, no longer configured",
            )
        if not wanted:
            return
        try:
            if self._kube_access is None or self.config.kubeconfig != self._kube_config_used:
                self._kube_access = kube.resolve_access(self.config.kubeconfig)
        except ConfigError as exc:
            log.error("Kubernetes discovery: %s; its pods are kept, not watched", exc)
            return
        self._kube_config_used = self.config.kubeconfig
        access = self._kube_access
        for role, selector in wanted.items():
            settings = (*kube.watcher_settings(self.config), tuple(selector))
            if self._pods_settings.get(role) == settings and role in self._pods:
                continue
            if role in self._pods:
                self._pods.pop(role).cancel()
            self._pods_settings[role] = settings
            watcher = kube.PodWatcher(
                access,
                self.config.k8s_namespace or access.namespace,
                selector,
                self.config.k8s_port,
                self.config.discover_scheme,
                self._pod_changed,
                functools.partial(self._pods_listed, role),
                role,
            )
            log.info("kubernetes: watching %s (credentials: %s)", watcher.where, access.source)
            self._pods[role] = asyncio.create_task(watcher.run(), name=f"fleet:k8s:{role}")

    def _pod_changed(self, name: str, spec: ServiceSpec | None, why: str) -> None:
        if spec is not None:
            self._claim(spec, "k8s")
            return
        service = self.registry.services.get(name)
        if service is not None and service.origin == "k8s":
            self._remove(name, f"pod {why}")

    def _pods_listed(self, role: str, specs: dict[str, ServiceSpec]) -> None:
        """One selector's full list: its pods not in it are gone."""
        for spec in specs.values():
            self._claim(spec, "k8s")
        for service in list(self.registry.services.values()):
            if service.origin == "k8s" and service.role == role and service.name not in specs:
                self._remove(
                    service.name, "pod no longer listed (deleted, not Ready, or relabelled)"
                )

    # --- changes ------------------------------------------------------------------

    def _put(self, spec: ServiceSpec, origin: str) -> tuple[Service, bool]:
        """Add or change a service; (service, whether it is new) and start probing it."""
        before = self.registry.services.get(spec.name)
        service = self.registry.update(spec, origin)
        created = service is not before
        if created:
            self.checker.watch(service)
        return service, created

    def _remove(self, name: str, why: str) -> Service | Entry | None:
        """Take out the service, or the kept entry, of that name."""
        self.checker.unwatch(name)
        self._expires.pop(name, None)
        self._gone_since.pop(name, None)
        self._heartbeats.pop(name, None)
        return self.registry.remove(name, why) or self.registry.drop(name, why)

    def apply_config(self, config: Config) -> None:
        """A reloaded config: its services replace the configured ones."""
        self.config = config
        self.checker.interval_s = config.health_interval
        self.checker.timeout_s = config.health_timeout
        self.load.interval_s = config.load_interval
        self.load.timeout_s = config.health_timeout
        self.registry.max_errors = config.max_errors
        wanted = {spec.name: spec for spec in config.services}
        leaving = [
            s
            for s in self.registry.services.values()
            if s.origin == "config" and s.name not in wanted
        ]
        for spec in wanted.values():
            current = self.registry.services.get(spec.name)
            if current is not None and current.origin != "config":
                # The config outranks a registration or the registry for the name.
                self._remove(spec.name, "now defined in the config")
            service, created = self._put(spec, "config")
            renamed = next((s for s in leaving if same_backend(s.spec, spec)), None)
            if created and renamed is not None:
                # A rename: the backend's health is known; a check cannot tell it sooner.
                leaving.remove(renamed)
                self.registry.inherit(service, renamed)
                self._remove(renamed.name, f"renamed to {spec.name}")
        # Removed after the new names are in: a model moving to another name is served
        # throughout the reload.
        for service in leaving:
            self._remove(service.name, "no longer in the config")
        self._follow_registry()
        self._follow_dns()
        self._follow_pods()

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
        if method == b"DELETE":
            return self.deregister(name)
        if method == b"GET":
            service = self.registry.services.get(name)
            if service is not None:
                return 200, describe(service)
            entry = self.registry.entries.get(name)
            if entry is not None:
                return 200, kept_entry(entry)
            return error_payload(Fault.NOT_FOUND, f"no service named {name!r}")
        return error_payload(Fault.METHOD_NOT_ALLOWED, f"/services/{name} answers GET and DELETE")

    # --- the Rust routers' worker API -----------------------------------------------

    def workers(self, method: bytes, path: bytes, body: bytes) -> Payload:
        """sglang-router's and vllm-router's worker API, on the same registrations as
        ``POST /services``: ``GET|POST /workers``, ``GET|DELETE /workers/{url or name}``,
        ``GET /list_workers``, ``POST /add_worker`` and ``/remove_worker`` (their
        ``?url=`` is the body's ``url`` here: app.py moves it). A worker is added at
        once, so the answers that are 202 there (a queued job) say it is done."""
        if path == b"/list_workers":
            return 200, {"urls": [s.url for s in self.registry.services.values()]}
        if path == b"/workers" and method in (b"GET", b"HEAD"):
            return 200, worker_list(self.registry)
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
        services = self.registry.services
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
        self._remove(service.name, "removed through the worker API")
        if legacy:
            return 200, {"message": f"Successfully removed worker: {key}", "url": service.url}
        return 202, {"status": "accepted", "worker_id": service.name, "message": "Worker removed"}

    def register(self, body: bytes) -> Payload:
        try:
            data = decode.json(body)
            if not isinstance(data, dict):
                raise ConfigError("expected a JSON object")
            options = msgspec.convert(data, _Registration)
            spec = spec_from_entry(data)
            # Another type (InfiniLM's babysitter): kept and listed, never routed to.
            entry = entry_from(data) if spec is None else None
        except (msgspec.DecodeError, msgspec.ValidationError, ConfigError) as exc:
            return error_payload(
                Fault.BAD_REQUEST, f"invalid registration: {exc}; expected {REGISTRATION_SHAPE}"
            )
        target: ServiceSpec | Entry | None = spec or entry
        assert target is not None
        name = target.name
        if spec is not None and points_at(spec, self.config.host, self.own_port):
            return error_payload(
                Fault.BAD_REQUEST,
                f"{spec.url} is this router's own address: requests would loop; "
                "register the backend's address",
            )
        ttl = options.ttl if options.ttl is not None else self.config.registration_ttl
        if ttl < 0:
            return error_payload(Fault.BAD_REQUEST, "ttl must be >= 0 seconds (0: no expiry)")
        current = self.registry.services.get(name)
        if current is not None and RANK[current.origin] < RANK["admin"]:
            return error_payload(
                Fault.CONFLICT,
                f"service {name!r} is defined in the config; change the config "
                "and reload (SIGHUP), or register under another name",
            )
        if entry is not None:
            registry = self.registry
            if name not in registry.entries and len(registry.entries) >= MAX_ENTRIES:
                return error_payload(
                    Fault.BAD_REQUEST,
                    f"the router keeps at most {MAX_ENTRIES} registrations of types "
                    "other than openai-api; delete some (DELETE /services/{name})",
                )
            if current is not None:
                self._remove(name, f"registered again, as type {entry.type!r}")
            created = name not in registry.entries
            registry.keep(entry)
            answer = kept_entry(entry)
        else:
            assert spec is not None
            self.registry.drop(name, "registered again, as type 'openai-api'")
            service, created = self._put(spec, "admin")
            self._heartbeats[name] = time.time()  # an entry keeps its own
            answer = describe(service)
        self._gone_since.pop(name, None)
        if ttl:
            self._expires[name] = (ttl, time.monotonic() + ttl)
        else:
            self._expires.pop(name, None)
        log.info("service %s registered (ttl %s)", name, f"{ttl:g}s" if ttl else "none")
        return (201 if created else 200), {**answer, "ttl": ttl or None}

    def deregister(self, name: str) -> Payload:
        if self._remove(name, "deregistered through the admin API") is None:
            return error_payload(Fault.NOT_FOUND, f"no service named {name!r}")
        # "message" is what the InfiniLM registry answers; "removed" is lmproxy's.
        return 200, {"removed": name, "message": f"Service '{name}' unregistered successfully"}

    def heartbeat(self, name: str, body: bytes = b"") -> Payload:
        """Keep a registration's ttl alive. An entry's heartbeat may carry a new
        ``status``, as the InfiniLM registry allows; a service's health is the
        router's checks' alone, so there a status is ignored."""
        service = self.registry.services.get(name)
        entry = self.registry.entries.get(name)
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
        service = self.registry.services.get(name)
        entry = self.registry.entries.get(name)
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

    # --- clocks -------------------------------------------------------------------

    async def _expire(self) -> None:
        """Take out registrations whose TTL passed, and services whose grace is over."""
        now = time.monotonic()
        for name, (ttl, deadline) in list(self._expires.items()):
            if now >= deadline:
                self._remove(name, f"no heartbeat for {ttl:g}s (its ttl)")
        grace = self.config.service_removal_grace_period
        for name, since in list(self._gone_since.items()):
            if now - since >= grace:
                service = self.registry.services.get(name)
                source = SOURCES.get(service.origin if service else "", "its source")
                self._remove(name, f"gone from {source} for {grace:g}s")

    async def sync_registry(self) -> None:
        """One poll of the InfiniLM-SVC registry: it decides membership, never health."""
        url = self.config.registry_url
        if not url:
            return
        parts = urlsplit(url)
        path = parts.path.rstrip("/") + "/services?healthy=true"
        try:
            status, body = await http_get(
                parts.hostname or "",
                url_port(parts),
                path,
                self.config.health_timeout,
                # The registry is checked with the router-wide --backend-* TLS settings.
                ssl=tls.client_context(*self.registry.backend_tls)
                if parts.scheme == "https"
                else None,
            )
            if status != 200:
                raise ProbeError(f"{path} answered {status}")
            listing = decode.json(body, into=_RegistryListing)
        except (ProbeError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            if self._registry_ok:
                log.warning(
                    "registry %s unreachable or unreadable (%s); keeping its services",
                    masked_url(url),
                    exc or "timed out",
                )
            self._registry_ok = False
            return
        if not self._registry_ok:
            log.info("registry %s is readable again", masked_url(url))
        self._registry_ok = True
        listed: set[str] = set()
        causes: set[str] = set()  # why entries were skipped this time
        new = 0
        for index, entry in enumerate(listing.services):
            try:
                spec = spec_from_entry(entry)
            except ConfigError as exc:
                cause = str(exc)[:MAX_CAUSE_TEXT]
                if len(causes) < MAX_SKIPPED_CAUSES:
                    causes.add(cause)
                if cause not in self._registry_skipped:
                    new += 1
                    if new <= MAX_SKIPPED_LOGGED:
                        log.warning("registry entry %d skipped: %s", index, cause)
                continue
            if spec is None:
                continue
            listed.add(spec.name)
            self._claim(spec, "registry")
        if new > MAX_SKIPPED_LOGGED:
            log.warning("registry: %d more entries skipped", new - MAX_SKIPPED_LOGGED)
        self._registry_skipped = causes  # logged again only if one returns after a poll without it
        self._mark_gone("registry", listed, "left the registry")

    def _claim(self, spec: ServiceSpec, origin: str) -> None:
        """A polled source lists ``spec``: add or refresh it, unless a source of higher
        rank (the config, a registration) owns the name."""
        current = self.registry.services.get(spec.name)
        if current is not None and current.origin != origin:
            return
        self._gone_since.pop(spec.name, None)
        self._put(spec, origin)

    def _mark_gone(self, origin: str, listed: set[str], what: str) -> None:
        """Start the grace period of ``origin``'s services that it no longer lists."""
        now = time.monotonic()
        for service in self.registry.services.values():
            if (
                service.origin == origin
                and service.name not in listed
                and service.name not in self._gone_since
            ):
                self._gone_since[service.name] = now
                log.info(
                    "service %s %s; removed in %gs unless it returns",
                    service.name,
                    what,
                    self.config.service_removal_grace_period,
                )

    async def sync_dns(self) -> None:
        """One lookup of every --discover name: DNS decides membership, never health."""
        resolver = make_resolver(self.config.dns_server, self.config.health_timeout)
        listed: set[str] = set()
        for text in self.config.discover:
            target = parse_discover(text)
            try:
                pairs = await lookup(target, resolver)
            except DiscoveryError as exc:
                if text not in self._dns_failing:
                    log.warning("discovery %s: lookup failed (%s); keeping its services", text, exc)
                self._dns_failing.add(text)
                listed |= self._dns_members.get(text, set())
                continue
            if text in self._dns_failing:
                self._dns_failing.discard(text)
                log.info("discovery %s: the name resolves again", text)
            names = set()
            scheme = self.config.discover_scheme
            for address, port, host_name in pairs:
                host = f"[{address}]" if ":" in address else address
                spec = ServiceSpec(
                    url=f"{scheme}://{host}:{port}",
                    name=f"{address}:{port}",
                    server_name=host_name if scheme == "https" else None,
                )
                names.add(spec.name)
                self._claim(spec, "dns")
            if names != self._dns_members.get(text):
                log.info("discovery %s: %d addresses", text, len(names))
            self._dns_members[text] = names
            listed |= names
        self._mark_gone("dns", listed, "is no longer in DNS")


async def repeat(
    step: Callable[[], Awaitable[None]],
    interval: Callable[[], float],
    what: str,
    backoff_min_s: float = BACKOFF_MIN_S,
) -> None:
    """Run ``step``, then wait ``interval()`` seconds (asked each time: a reload may
    change it), until cancelled. A step's failure, whatever it is, does not end the
    loop: it is logged once with its traceback (again only when its cause changes),
    and the loop backs off, doubling up to BACKOFF_MAX_S, until a step succeeds."""
    failing = ""
    backoff = 0.0
    while True:
        try:
            await step()
        except Exception as exc:  # a bug here must not end the loop
            cause = f"{type(exc).__name__}: {exc}"[:MAX_CAUSE_TEXT]
            if cause != failing:
                log.error("%s failed (%s); retrying with backoff", what, cause, exc_info=exc)
                failing = cause
            backoff = min(max(backoff * 2, backoff_min_s), BACKOFF_MAX_S)
            await asyncio.sleep(max(interval(), backoff))
            continue
        if failing:
            log.info("%s works again", what)
            failing, backoff = "", 0.0
        await asyncio.sleep(interval())


REGISTRATION_SHAPE = (
    '{"name": "...", "url": "http://host:port"} (or "host" and "port"), optional '
    '"models": [...] (or metadata.models), "weight", "health_path", "max_in_flight", "ttl"; '
    'an entry of another metadata.type ("InfiniLM": a babysitter) is kept and listed, '
    "never routed to"
)
