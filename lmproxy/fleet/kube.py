"""Kubernetes discovery: the pods a label selector picks, listed once, then watched.

``--k8s-selector KEY=VALUE`` (repeatable) picks the engine pods of
``--k8s-namespace`` (default: the router's own pod's namespace). The router
lists them, then watches from the list's resourceVersion with bookmarks, as
client-go's informers do: it never polls. A watch the server ends is resumed
from the last resourceVersion seen; ``410 Gone`` (history compacted past it)
means listing again; a lost connection or a refusal is retried with backoff,
keeping the pods last known, and so is any other exception (logged once with
its traceback, then a new list). What the server sends is bounded: JSON nests at
most 64 levels (``decode.json``; an event the router cannot read is skipped and
logged once), the watch is read a piece per read and searched once per byte
(``Lines``) whatever its chunking, and pods with wrong annotations are
remembered and logged per cause, not per pod or per event.

A pod is a service only while it is Running, has an IP, has its ``Ready``
condition True and no deletionTimestamp: it leaves the moment the watch says
otherwise (requests in flight on it finish; new ones go elsewhere). Its service
is named after the pod, at ``http://POD_IP:PORT`` where PORT is the pod's
``lmproxy.io/port`` annotation or ``--k8s-port``; the ``lmproxy.io/scheme``
annotation or ``--discover-scheme`` says http or https (an https pod's certificate
must name its IP, or the ``lmproxy.io/server-name`` annotation's name). Its models are the
``lmproxy.io/model`` label (or annotation, which may hold a ``/`` and a
comma-separated list) or, without one, what ``/v1/models`` says.

The API is spoken through the router's one h11 client (``probe.open_get``), the
one its health checks use: discovery needs two calls (list and watch pods) and a
few fields of a pod, and kubernetes_asyncio would bring aiohttp and a generated
client of the whole API into a router whose hot path owes nothing to either.
``PodDiscovery`` is the fleet's source: a ``PodWatcher`` per selector.

Credentials: inside a pod, its service account (token, re-read before each
call since kubelet rotates it, CA, namespace); outside, ``--kubeconfig`` (or
``$KUBECONFIG``, or ``~/.kube/config``): its current context's server, CA,
token or client certificate. Exec and auth-provider plugins are not run.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import os
import random
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, urlencode, urlsplit

import msgspec

from lmproxy import decode
from lmproxy.backend.probe import Answer, Caller, open_get
from lmproxy.config import Config, ConfigError, ServiceSpec
from lmproxy.fleet.sources import BACKOFF_MAX_S, BACKOFF_MIN_S, MAX_CAUSE_TEXT, Members

log = logging.getLogger("lmproxy")

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
LABEL_MODEL = "lmproxy.io/model"
ANNOTATION_PORT = "lmproxy.io/port"
ANNOTATION_SCHEME = "lmproxy.io/scheme"
ANNOTATION_SERVER_NAME = "lmproxy.io/server-name"
# A prefill pod's SGLang bootstrap port: ours, or the name sglang-router reads.
ANNOTATIONS_BOOTSTRAP = ("lmproxy.io/bootstrap-port", "sglang.ai/bootstrap-port")

MAX_PODS = 1024  # services one selector may add: a runaway Deployment cannot flood us
MAX_LIST_PAGE = 32 * 1024 * 1024  # bytes of one page of the list (500 pods)
MAX_EVENT = 4 * 1024 * 1024  # bytes of one watch event (etcd keeps objects under 1.5 MiB)
MAX_ERROR_BODY = 64 * 1024
# Why pods were refused, remembered to log each cause a few times, not once per pod:
# distinct causes kept (an annotation's value is in its cause), and their length.
MAX_CAUSES = 32  # (and MAX_CAUSE_TEXT, a cause's length, the loops' of sources.py)
OTHER_CAUSES = "other wrong annotations (more kinds than the router counts apart)"
PAGE = 500
WATCH_S = 240  # the server ends each watch after this; the router resumes it
# h11 events handled before the loop's other work gets a turn (a chunk of one byte is
# one event: a read of them could otherwise hold the loop for tens of milliseconds).
EVENTS_PER_TURN = 512
CALL_TIMEOUT_S = 15.0  # connect, send, and the response's head (and a list page)


class KubeError(Exception):
    """A call to the API server failed; the message says why and what to change.

    ``refused``: the server said no (401, 403, 404...), which needs a person; not a
    lost connection, which the next attempt may not meet."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class Gone(Exception):
    """410: the resourceVersion is older than the server's history; list again."""


class Access(NamedTuple):
    """How to reach the API server, and as whom."""

    host: str
    port: int
    ssl: ssl.SSLContext | None
    server_name: str | None  # TLS name to check, when not the host
    token: Callable[[], str | None]
    namespace: str  # the default: the pod's own, or the kubeconfig context's
    source: str  # "in-cluster service account" or the kubeconfig path, for logs
    prefix: str = ""  # the server URL's path (an API server behind a proxy: Rancher...)


# --- credentials --------------------------------------------------------------


def resolve_access(kubeconfig: str | None, environ: dict[str, str] | None = None) -> Access:
    """``--kubeconfig``, else the pod's service account, else ``$KUBECONFIG`` or
    ``~/.kube/config``; ConfigError when none is there."""
    env = dict(os.environ) if environ is None else environ
    if kubeconfig:
        return from_kubeconfig(kubeconfig)
    if env.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster(env)
    for path in [*env.get("KUBECONFIG", "").split(os.pathsep), "~/.kube/config"]:
        if path and Path(path).expanduser().is_file():
            return from_kubeconfig(str(Path(path).expanduser()))
    raise ConfigError(
        "Kubernetes discovery (--k8s-selector) needs the API server: run the router in a "
        "pod (its service account is used), or give --kubeconfig FILE"
    )


def in_cluster(environ: dict[str, str], account: Path = SERVICE_ACCOUNT) -> Access:
    """The pod's service account, as client-go's rest.InClusterConfig reads it."""
    host = environ["KUBERNETES_SERVICE_HOST"]
    port = int(environ.get("KUBERNETES_SERVICE_PORT", "443"))
    token_file, ca_file = account / "token", account / "ca.crt"
    for path in (token_file, ca_file):
        if not path.is_file():
            raise ConfigError(
                f"in a pod, Kubernetes discovery reads {path}, which is missing: is "
                "automountServiceAccountToken off? (or give --kubeconfig)"
            )
    context = ssl.create_default_context()
    _load_ca(context, str(ca_file), None, str(ca_file))
    try:
        namespace = (account / "namespace").read_text().strip() or "default"
    except OSError:
        namespace = "default"

    def token() -> str | None:
        try:  # kubelet rotates projected tokens: read it for every call
            return token_file.read_text().strip() or None
        except OSError:
            return None

    return Access(host.strip("[]"), port, context, None, token, namespace, "service account")


def from_kubeconfig(path: str) -> Access:
    """The current context of a kubeconfig file: server, CA, token or client cert."""
    where = f"--kubeconfig {path}"
    doc = _read_kubeconfig(path, where)
    base = Path(path).resolve().parent
    current = doc.get("current-context")
    if not current:
        raise ConfigError(f"{where}: no current-context (kubectl config use-context NAME)")
    context = _named(doc, "contexts", "context", current, where)
    cluster = _named(doc, "clusters", "cluster", context.get("cluster"), where)
    user = _named(doc, "users", "user", context.get("user"), where) if context.get("user") else {}
    server = urlsplit(str(cluster.get("server", "")))
    if server.scheme not in ("http", "https") or not server.hostname:
        raise ConfigError(f"{where}: cluster {context.get('cluster')!r} has no https:// server")
    for plugin in ("exec", "auth-provider"):
        if plugin in user:
            raise ConfigError(
                f"{where}: user {context.get('user')!r} authenticates with an {plugin} "
                "plugin, which lmproxy does not run; give it a token (kubectl create token "
                "SERVICE_ACCOUNT) or a client certificate"
            )
    ssl_context = _cluster_tls(cluster, user, base, where) if server.scheme == "https" else None
    fixed = _user_token(user, base, where)
    return Access(
        server.hostname or "",
        server.port or (443 if server.scheme == "https" else 80),
        ssl_context,
        cluster.get("tls-server-name"),
        lambda: fixed,
        str(context.get("namespace") or "default"),
        path,
        server.path.rstrip("/"),
    )


def _read_kubeconfig(path: str, where: str) -> dict[str, Any]:
    import yaml  # only here: most routers never read a kubeconfig

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: not a kubeconfig (no clusters, contexts, users)")
    return doc


def _cluster_tls(
    cluster: dict[str, Any], user: dict[str, Any], base: Path, where: str
) -> ssl.SSLContext:
    """The TLS context an https:// cluster is reached with: its CA, the user's cert."""
    context = ssl.create_default_context()
    if cluster.get("insecure-skip-tls-verify"):
        log.warning("%s: insecure-skip-tls-verify: the API server is not verified", where)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif "certificate-authority-data" in cluster:
        data = _b64(cluster["certificate-authority-data"], where, "certificate-authority-data")
        _load_ca(context, None, data.decode("ascii", "replace"), where)
    elif "certificate-authority" in cluster:
        _load_ca(context, str(base / cluster["certificate-authority"]), None, where)
    _client_certificate(context, user, base, where)
    return context


def _user_token(user: dict[str, Any], base: Path, where: str) -> str | None:
    token = user.get("token")
    if token is None and "tokenFile" in user:
        try:
            token = (base / user["tokenFile"]).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read tokenFile: {exc.strerror or exc}") from None
    return str(token) if token else None


def _named(doc: dict[str, Any], key: str, inner: str, name: Any, where: str) -> dict[str, Any]:
    for item in doc.get(key) or []:
        if isinstance(item, dict) and item.get("name") == name:
            found = item.get(inner) or {}
            if isinstance(found, dict):
                return found
    raise ConfigError(f"{where}: no {key[:-1]} named {name!r}")


def _b64(value: Any, where: str, field: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError:
        raise ConfigError(f"{where}: {field} is not base64") from None


def _load_ca(context: ssl.SSLContext, cafile: str | None, cadata: str | None, where: str) -> None:
    try:
        context.load_verify_locations(cafile=cafile, cadata=cadata)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{where}: the cluster's CA is not a PEM certificate ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {cafile}: {exc.strerror or exc}") from None


def _client_certificate(
    context: ssl.SSLContext, user: dict[str, Any], base: Path, where: str
) -> None:
    """client-certificate(-data) and client-key(-data): OpenSSL reads files only, so
    inline data goes through a private temporary directory, removed at once."""
    with tempfile.TemporaryDirectory(prefix="lmproxy-kube-") as scratch:
        paths: list[str] = []
        for field in ("client-certificate", "client-key"):
            if f"{field}-data" in user:
                file = Path(scratch) / field
                file.write_bytes(_b64(user[f"{field}-data"], where, f"{field}-data"))
                file.chmod(0o600)
                paths.append(str(file))
            elif field in user:
                paths.append(str(base / user[field]))
        if not paths:
            return
        if len(paths) != 2:
            raise ConfigError(f"{where}: a client certificate needs both its cert and its key")
        try:
            context.load_cert_chain(paths[0], paths[1])
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{where}: the user's client certificate and key do not load ({exc})"
            ) from None


# --- pods ---------------------------------------------------------------------


class _Condition(msgspec.Struct):
    type: str = ""
    status: str = ""


class _Status(msgspec.Struct):
    phase: str = ""
    podIP: str | None = None
    conditions: list[_Condition] = []


class _Meta(msgspec.Struct):
    name: str = ""
    resourceVersion: str = ""
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    deletionTimestamp: str | None = None


class Pod(msgspec.Struct):
    """The fields of a pod that discovery reads; the rest of the object is skipped."""

    metadata: _Meta = msgspec.field(default_factory=_Meta)
    status: _Status = msgspec.field(default_factory=_Status)


class _PodList(msgspec.Struct):
    metadata: _Meta = msgspec.field(default_factory=_Meta)
    items: list[Pod] = []


class _ListMeta(msgspec.Struct):
    resourceVersion: str = ""
    # "continue" is a keyword: renamed
    next: str = msgspec.field(default="", name="continue")


class _Page(msgspec.Struct):
    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[Pod] = []


class _ApiStatus(msgspec.Struct):
    """A ``kind: Status`` object: what the server says when it refuses."""

    code: int = 0
    reason: str = ""
    message: str = ""


class _Event(msgspec.Struct):
    type: str
    object: msgspec.Raw


def why_not_routable(pod: Pod) -> str | None:
    """None when the pod may serve; otherwise what keeps it out."""
    if pod.metadata.deletionTimestamp:
        return "is terminating"
    if pod.status.phase != "Running":
        return f"is {pod.status.phase or 'Pending'}"
    if not pod.status.podIP:
        return "has no IP"
    if not any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions):
        return "is not Ready"
    return None


def pod_service(
    pod: Pod, default_port: int, default_scheme: str, role: str = "both"
) -> ServiceSpec:
    """The service a routable pod is; ConfigError when its annotations are wrong."""
    meta = pod.metadata
    port = _port_annotation(meta.annotations, ANNOTATION_PORT) or default_port
    scheme = meta.annotations.get(ANNOTATION_SCHEME, default_scheme)
    if scheme not in ("http", "https"):
        raise ConfigError(f"annotation {ANNOTATION_SCHEME}={scheme!r} is not http or https")
    ip = pod.status.podIP or ""
    host = f"[{ip}]" if ":" in ip else ip
    bootstrap: int | None = None
    if role == "prefill":
        key = next((k for k in ANNOTATIONS_BOOTSTRAP if k in meta.annotations), None)
        bootstrap = _port_annotation(meta.annotations, key) if key else None
    return ServiceSpec(
        url=f"{scheme}://{host}:{port}",
        name=meta.name,
        models=_models(meta),
        server_name=meta.annotations.get(ANNOTATION_SERVER_NAME) if scheme == "https" else None,
        role=role,
        bootstrap_port=bootstrap,
    )


def _models(meta: _Meta) -> list[str]:
    named = meta.labels.get(LABEL_MODEL) or meta.annotations.get(LABEL_MODEL) or ""
    return [m.strip() for m in named.split(",") if m.strip()]


def _port_annotation(annotations: dict[str, str], key: str) -> int | None:
    """The port an annotation gives (None: not there); ConfigError if it is not one."""
    text = annotations.get(key)
    if text is None:
        return None
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"annotation {key}={text!r} is not a port")
    return int(text)


# --- the API ------------------------------------------------------------------


API = Caller(
    KubeError,
    EVENTS_PER_TURN,
    no_connection="the API server did not accept a connection in {}s",
    no_head="the API server did not answer in {}s",
    handshake="TLS handshake with the API server failed: {}",
    connect="cannot connect to the API server: {}",
    not_http="the API server's answer is not HTTP: {}",
    lost_tls="connection to the API server lost: {}",
    lost="connection to the API server lost: {}",
    no_answer="the API server closed the connection without answering",
    no_answer_tls="the API server closed the connection without answering",
    cut="the API server closed the connection mid-answer",
)


async def _call(access: Access, path: str) -> Answer:
    """GET ``path`` on a connection of its own (``probe.open_get``): the connection
    and the response's head each have CALL_TIMEOUT_S; the caller closes the answer."""
    headers = [("User-Agent", "lmproxy-discovery"), ("Accept", "application/json")]
    token = access.token()
    if token:
        headers.append(("Authorization", f"Bearer {token}"))
    return await open_get(access, path, headers, API, CALL_TIMEOUT_S)


async def _read_all(answer: Answer, limit: int) -> bytes:
    data = bytearray()
    async for chunk in answer.pieces():
        data += chunk
        if len(data) > limit:
            raise KubeError(f"the API server's answer is over {limit} bytes")
    return bytes(data)


async def _refusal(answer: Answer, what: str) -> Exception:
    """The error for a non-200 answer, with the server's own message."""
    status = answer.status
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            raw = await _read_all(answer, MAX_ERROR_BODY)
        message = decode.json(raw, into=_ApiStatus).message
    except (KubeError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError):
        message = ""
    said = f": {message}" if message else ""
    if status == 410:
        return Gone(message)
    if status == 401:
        return KubeError(
            f"the API server refused the credentials (401 Unauthorized{said}): the token "
            "is wrong or expired; check the service account, or --kubeconfig's user",
            refused=True,
        )
    if status == 403:
        return KubeError(
            f"the API server forbids {what} (403 Forbidden{said}): the router's "
            "ServiceAccount needs a Role granting get, list and watch on pods "
            "(deploy/kubernetes/rbac.yaml)",
            refused=True,
        )
    if status == 404:
        return KubeError(f"{what}: 404 Not Found{said} (is the API server's URL right?)", True)
    return KubeError(f"{what}: the API server answered {status}{said}", refused=status < 500)


class Lines:
    """The newline-ended lines of a stream, from its pieces as they come.

    A watch sends one JSON event per line, in pieces of any size. The search for
    the next newline starts where the last one stopped, so each byte is looked at
    once however small the pieces (``examined`` counts them), and the bytes of
    the lines handed out are dropped once per piece, not once per line."""

    __slots__ = ("_buffer", "_searched", "examined")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._searched = 0  # bytes of the buffer known to hold no newline
        self.examined = 0

    def feed(self, piece: bytes) -> list[bytes]:
        """The lines ``piece`` completes, without their newlines."""
        buffer = self._buffer
        buffer += piece
        lines: list[bytes] = []
        start = 0
        search = self._searched
        while (end := buffer.find(b"\n", search)) >= 0:
            self.examined += end + 1 - search
            lines.append(bytes(buffer[start:end]))
            start = search = end + 1
        self.examined += len(buffer) - search
        if start:
            del buffer[:start]
        self._searched = len(buffer)
        return lines

    def __len__(self) -> int:
        """Bytes of a line not yet complete."""
        return len(self._buffer)


class PodWatcher:
    """Follows the pods of one selector and tells the fleet as they change.

    ``on_pod(name, spec, why)``: a pod became (``spec``) or stopped being (None,
    ``why``) a service. ``on_list(specs)``: a full list, after which any pod not in
    it is gone.
    """

    def __init__(
        self,
        access: Access,
        namespace: str,
        selector: list[str],
        port: int,
        scheme: str,
        on_pod: Callable[[str, ServiceSpec | None, str], None],
        on_list: Callable[[dict[str, ServiceSpec]], None],
        role: str = "both",
    ) -> None:
        self.role = role
        self.access = access
        self.namespace = namespace
        self.selector = ",".join(selector)
        self.port = port
        self.scheme = scheme
        self.on_pod = on_pod
        self.on_list = on_list
        self.members: set[str] = set()  # pods that are services now
        # Pods whose annotations were refused, and why: a pod's every status change
        # is an event, and its refusal is counted once, not per event. At most
        # MAX_PODS are remembered; a deleted pod is forgotten.
        self._bad: dict[str, str] = {}
        # Pods refused, by cause (at most MAX_CAUSES; the rest together): logged at
        # the first, the 10th, the 100th... so that thousands of pods with wrong
        # annotations make a few lines, not one each.
        self._causes: dict[str, int] = {}
        self._unreadable = ""  # why the last watch event skipped was (logged once)
        kind = "" if role == "both" else f"{role} "
        self.where = f"{kind}pods {self.selector!r} in namespace {namespace!r}"
        # The resourceVersion to watch from (a list's, then each event's and
        # bookmark's); None: list first.
        self.version: str | None = None
        self._backoff = BACKOFF_MIN_S
        self._failing = ""  # the last failure logged, until the server answers again
        # An exception nothing expected (a bug, or input no check foresaw): logged
        # once with its traceback, and retried with its own backoff, which an
        # answering server does not reset, until a watch runs to its end.
        self._broken = ""
        self._broken_backoff = 0.0
        self._base = f"{access.prefix}/api/v1/namespaces/{quote(namespace, safe='')}/pods"

    async def run(self) -> None:
        """List, then watch, until cancelled; never gives up."""
        gone_in_a_row = 0
        while True:
            try:
                if self.version is None:
                    await self.list()
                await self.watch()
                gone_in_a_row = 0  # the server ended it: resume at once from self.version
                if self._broken:
                    log.info("kubernetes: %s: discovery works again", self.where)
                    self._broken, self._broken_backoff = "", 0.0
                continue
            except Gone:
                log.info(
                    "kubernetes: %s: watch history expired (410 Gone); listing again", self.where
                )
                self.version = None
                gone_in_a_row += 1
                if gone_in_a_row == 1:
                    continue  # at once; a server that says 410 again and again is not spun on
            except KubeError as exc:
                if str(exc) != self._failing:  # once per cause, not once per retry
                    log.log(
                        logging.ERROR if exc.refused else logging.WARNING,
                        "kubernetes: %s: %s; keeping the %d pod(s) known, retrying",
                        self.where,
                        exc,
                        len(self.members),
                    )
                self._failing = str(exc)
            except Exception as exc:  # whatever it is, discovery must go on
                cause = f"{type(exc).__name__}: {exc}"[:MAX_CAUSE_TEXT]
                if cause != self._broken:
                    log.error(
                        "kubernetes: %s: unexpected error (%s); keeping the %d pod(s) "
                        "known, listing again with backoff",
                        self.where,
                        cause,
                        len(self.members),
                        exc_info=exc,
                    )
                self._broken = cause
                self._broken_backoff = min(
                    max(self._broken_backoff * 2, BACKOFF_MIN_S), BACKOFF_MAX_S
                )
                self.version = None  # whatever it broke, a list sets it right
            delay = max(self._backoff, self._broken_backoff)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def _answered(self) -> None:
        """The API server served a list or opened a watch: failures are over."""
        self._backoff = BACKOFF_MIN_S
        if self._failing:
            log.info("kubernetes: %s: the API server answers again", self.where)
            self._failing = ""

    async def list(self) -> None:
        """List every page, report the set, and watch from the list's resourceVersion."""
        found: dict[str, ServiceSpec] = {}
        listed: set[str] = set()
        page = _Page()
        while True:
            page = await self._page(page.metadata.next)
            for pod in page.items:
                listed.add(pod.metadata.name)
                spec = self._service(pod)
                if spec is not None and len(found) < MAX_PODS:
                    found[spec.name] = spec
            if not page.metadata.next:
                break
        for name in [name for name in self._bad if name not in listed]:
            del self._bad[name]  # gone while no watch said so
        self._answered()
        if self.members != set(found):
            log.info("kubernetes: %s: %d ready pod(s)", self.where, len(found))
        self.members = set(found)
        self.on_list(found)
        self.version = page.metadata.resourceVersion

    async def _page(self, token: str) -> _Page:
        """One page of the list: the first, or the one ``token`` continues to."""
        query = {"labelSelector": self.selector, "limit": str(PAGE)}
        if token:
            query["continue"] = token
        answer = await _call(self.access, f"{self._base}?{urlencode(query)}")
        try:
            if answer.status != 200:
                raise await _refusal(answer, f"listing {self.where}")
            try:
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    raw = await _read_all(answer, MAX_LIST_PAGE)
            except TimeoutError:
                raise KubeError("the pod list did not arrive in time") from None
        finally:
            answer.close()
        try:
            return decode.json(raw, into=_Page)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise KubeError(f"the pod list is not a PodList: {exc}") from None

    async def watch(self) -> None:
        """Follow changes from ``self.version`` until the server ends the watch,
        moving ``self.version`` on with each event and bookmark."""
        query = {
            "labelSelector": self.selector,
            "watch": "1",
            "allowWatchBookmarks": "true",
            "resourceVersion": self.version or "",
            "timeoutSeconds": str(WATCH_S),
        }
        answer = await _call(self.access, f"{self._base}?{urlencode(query)}")
        try:
            if answer.status != 200:
                raise await _refusal(answer, f"watching {self.where}")
            self._answered()
            await self._follow(answer.pieces())
        finally:
            answer.close()

    async def _follow(self, body: AsyncIterator[bytes]) -> None:
        """Apply a watch's events, a line each, until its body ends."""
        lines = Lines()
        while True:
            # No byte for this long (bookmarks come every minute or so): the
            # connection is dead without having said so.
            try:
                async with asyncio.timeout(WATCH_S + 30):
                    chunk = await anext(body, None)
            except TimeoutError:
                raise KubeError("the watch went silent") from None
            if chunk is None:
                return
            for line in lines.feed(chunk):
                if line.strip():
                    self.version = self._event(line) or self.version
            if len(lines) > MAX_EVENT:
                raise KubeError(f"a watch event is over {MAX_EVENT} bytes")

    def _event(self, line: bytes) -> str | None:
        """Apply one watch event; return its resourceVersion (None: none, or skipped)."""
        read = self._read_event(line)
        if read is None:
            return None
        kind, pod = read
        name = pod.metadata.name
        if kind in ("ADDED", "MODIFIED"):
            spec = self._service(pod)
            if spec is not None and (name in self.members or len(self.members) < MAX_PODS):
                self.members.add(name)
                self.on_pod(name, spec, "")
            elif name in self.members:
                self.members.discard(name)
                self.on_pod(name, None, why_not_routable(pod) or "has a wrong annotation")
        elif kind == "DELETED":
            self._bad.pop(name, None)
            if name in self.members:
                self.members.discard(name)
                self.on_pod(name, None, "was deleted")
        return pod.metadata.resourceVersion or None

    def _read_event(self, line: bytes) -> tuple[str, Pod] | None:
        """A watch event's type and pod; None for one skipped (logged once per cause)."""
        try:
            event = decode.json(line, into=_Event)
            if event.type == "ERROR":
                status = decode.json(bytes(event.object), into=_ApiStatus)
                if status.code == 410:
                    raise Gone(status.message)
                raise KubeError(f"the watch failed: {status.code} {status.message}")
            return event.type, decode.json(bytes(event.object), into=Pod)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # One event the router cannot read does not end the watch: the next
            # ones still apply, and the next list corrects what this one changed.
            cause = str(exc)[:MAX_CAUSE_TEXT]
            if cause != self._unreadable:
                log.warning(
                    "kubernetes: %s: a watch event skipped, not a pod event: %s",
                    self.where,
                    cause,
                )
                self._unreadable = cause
            return None

    def _service(self, pod: Pod) -> ServiceSpec | None:
        if why_not_routable(pod) is not None:
            return None
        name = pod.metadata.name
        try:
            spec = pod_service(pod, self.port, self.scheme, self.role)
        except ConfigError as exc:
            self._refused(name, str(exc)[:MAX_CAUSE_TEXT])
            return None
        if self._bad:
            self._bad.pop(name, None)
        return spec

    def _refused(self, name: str, cause: str) -> None:
        """Count a pod refused for ``cause``, once until its cause changes; log the
        1st, 10th, 100th... pod of each cause."""
        if self._bad.get(name) == cause:
            return
        if name in self._bad or len(self._bad) < MAX_PODS:
            self._bad[name] = cause
        if cause not in self._causes and len(self._causes) >= MAX_CAUSES:
            cause = OTHER_CAUSES
        count = self._causes.get(cause, 0) + 1
        self._causes[cause] = count
        if count == 1:
            log.warning("kubernetes: pod %s skipped: %s", name[:MAX_CAUSE_TEXT], cause)
        elif _power_of_ten(count):
            log.warning(
                "kubernetes: %s: %d pods skipped so far: %s (the latest: %s)",
                self.where,
                count,
                cause,
                name[:MAX_CAUSE_TEXT],
            )


def _power_of_ten(n: int) -> bool:
    while n % 10 == 0:
        n //= 10
    return n == 1


def selectors(config: Config) -> dict[str, list[str]]:
    """Each selector given, by the role its pods get."""
    found = {
        "both": config.k8s_selector,
        "prefill": config.k8s_prefill_selector,
        "decode": config.k8s_decode_selector,
    }
    return {role: selector for role, selector in found.items() if selector}


def watcher_settings(config: Config) -> tuple[Any, ...]:
    """What restarts a watch when a reload changes it (with its selector)."""
    return (
        config.k8s_namespace,
        config.k8s_port,
        config.kubeconfig,
        config.discover_scheme,
    )


class PodDiscovery:
    """The pods of each selector (--k8s-selector, and the prefill and decode ones),
    each watched by a PodWatcher: a pod that stops being Ready, starts terminating or
    is deleted leaves at once (the API server says so for certain), and a lost watch
    removes nothing."""

    origin = "k8s"
    what = "Kubernetes discovery"

    def __init__(self, members: Members, config: Config) -> None:
        self.members = members
        self.config = config
        # Each selector's watch (by the role its pods get), and the settings it runs with.
        self._watchers: dict[str, PodWatcher] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._settings: dict[str, tuple[Any, ...]] = {}
        # Here, so that missing credentials stop start-up.
        self._access = resolve_access(config.kubeconfig) if selectors(config) else None
        self._access_from = config.kubeconfig

    def start(self) -> None:
        self.apply(self.config)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def found(self) -> set[str]:
        return set().union(*(w.members for w in self._watchers.values()))

    def status(self) -> dict[str, Any]:
        return {}

    def forget(self, name: str) -> None:
        pass

    def apply(self, config: Config) -> None:
        """Watch the pods of each selector; a reload that changes what one watches
        starts a new watch (whose first list prunes what no longer matches), and drops
        a selector's watch."""
        self.config = config
        wanted = selectors(config)
        for role in [r for r in self._tasks if r not in wanted]:
            self._end(role)
            self.members.mark_gone(
                self.origin,
                {s.name for s in self.members.roster.services.values() if s.role != role},
                "came from Kubernetes discovery, no longer configured",
            )
        access = self._credentials() if wanted else None
        if access is None:
            return
        for role, selector in wanted.items():
            settings = (*watcher_settings(config), tuple(selector))
            if self._settings.get(role) != settings or role not in self._tasks:
                self._end(role)
                self._settings[role] = settings
                self._watch(role, selector, access)

    def _credentials(self) -> Access | None:
        """The API server's access, read again when --kubeconfig changed; None (logged)
        when it cannot be read."""
        try:
            if self._access is None or self.config.kubeconfig != self._access_from:
                self._access = resolve_access(self.config.kubeconfig)
        except ConfigError as exc:
            log.error("Kubernetes discovery: %s; its pods are kept, not watched", exc)
            return None
        self._access_from = self.config.kubeconfig
        return self._access

    def _end(self, role: str) -> None:
        task = self._tasks.pop(role, None)
        if task is not None:
            task.cancel()
        self._watchers.pop(role, None)
        self._settings.pop(role, None)

    def _watch(self, role: str, selector: list[str], access: Access) -> None:
        watcher = PodWatcher(
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
        self._watchers[role] = watcher
        self._tasks[role] = asyncio.create_task(watcher.run(), name=f"fleet:k8s:{role}")

    def _pod_changed(self, name: str, spec: ServiceSpec | None, why: str) -> None:
        if spec is not None:
            self.members.claim(spec, self.origin)
            return
        service = self.members.roster.services.get(name)
        if service is not None and service.origin == self.origin:
            self.members.remove(name, f"pod {why}")

    def _pods_listed(self, role: str, specs: dict[str, ServiceSpec]) -> None:
        """One selector's full list: its pods not in it are gone."""
        for spec in specs.values():
            self.members.claim(spec, self.origin)
        for service in list(self.members.roster.services.values()):
            if service.origin == self.origin and service.role == role and service.name not in specs:
                self.members.remove(
                    service.name, "pod no longer listed (deleted, not Ready, or relabelled)"
                )
