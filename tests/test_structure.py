"""The shape of the code: one owner for each piece of request-path state, and no
circle in the import graph of ``lmproxy/`` (type-only imports counted)."""

from __future__ import annotations

import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "lmproxy"


def _sources() -> dict[str, str]:
    return {str(path.relative_to(ROOT)): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def _module(path: str) -> str:
    name = path[: -len(".py")].replace("/", ".")
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Each module of lmproxy and the lmproxy modules it imports, at run time or for
    type checking alike (an ``if TYPE_CHECKING:`` import still ties two modules)."""
    modules = {_module(path) for path in _sources()}
    graph: dict[str, set[str]] = {}
    for path, text in _sources().items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
                found.update(n for n in [node.module, *names] if n in modules)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name in modules)
        graph[_module(path)] = found - {_module(path), "lmproxy"}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as the list of modules round it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for child in sorted(graph.get(module, ())):
            if state.get(child) == 1:
                return [*path[path.index(child) :], child]
            if child not in state:
                circle = visit(child)
                if circle:
                    return circle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            circle = visit(module)
            if circle:
                return circle
    return None


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert "lmproxy.app" in graph and "lmproxy.client.connection" in graph["lmproxy.app"]
    circle = find_circle(graph)
    assert circle is None, " -> ".join(circle or [])


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_circle(graph) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def _lines_matching(pattern: str) -> list[tuple[str, str]]:
    regex = re.compile(pattern)
    return [
        (path, line.strip())
        for path, text in _sources().items()
        for line in text.splitlines()
        if regex.search(line)
    ]


def test_in_flight_changes_only_in_acquire_and_release():
    changes = _lines_matching(r"in_flight [-+]=")
    assert {path for path, _ in changes} == {"lmproxy/fleet/roster.py"}, changes
    text = (PACKAGE / "fleet" / "roster.py").read_text()
    body = text[text.index("    def acquire(self)") : text.index("    def note_error(")]
    assert len(changes) == body.count("in_flight -=") + body.count("in_flight +=") == 4


def test_queued_is_written_by_admission_alone():
    """A journey's place in the queue (``queued``) is admission.py's, but for its start."""
    writes = _writes_to("queued")
    assert {(path, where) for path, where, _ in writes} == {
        ("lmproxy/journey/admission.py", "AdmissionQueue.admit"),
        ("lmproxy/journey/admission.py", "AdmissionQueue.leave"),
        ("lmproxy/journey/admission.py", "AdmissionQueue._take"),
        ("lmproxy/journey/journey.py", "Journey.__init__"),
    }, writes


def _router_sources() -> dict[str, str]:
    """The router's own modules: the simulator is another program."""
    return {p: t for p, t in _sources().items() if not p.startswith("lmproxy/sim/")}


def _where(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """Every node of ``tree`` with the qualified name of the function it is in."""
    found: list[tuple[str, ast.AST]] = []

    def walk(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = scope
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{scope}.{child.name}" if scope else child.name
            found.append((name, child))
            walk(child, name)

    walk(tree, "")
    return found


def _writes_to(attribute: str, augmented_only: bool = False) -> list[tuple[str, str, int]]:
    """(path, function, line) of each assignment to ``<something>.<attribute>``."""
    writes = []
    for path, text in _router_sources().items():
        for where, node in _where(ast.parse(text)):
            if isinstance(node, ast.AugAssign):
                targets = [node.target]
            elif isinstance(node, ast.Assign | ast.AnnAssign) and not augmented_only:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                targets = [
                    e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])
                ]
            else:
                continue
            if any(isinstance(t, ast.Attribute) and t.attr == attribute for t in targets):
                writes.append((path, where, node.lineno))
    return writes


def _calls_of(method: str, args: int | None = None) -> list[tuple[str, str, int]]:
    """(path, function, line) of each call ``<something>.<method>(...)`` (with ``args``
    positional arguments, if given)."""
    calls = []
    for path, text in _router_sources().items():
        for where, node in _where(ast.parse(text)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == method
                and (args is None or len(node.args) == args)
            ):
                calls.append((path, where, node.lineno))
    return calls


# Where a try is accounted: Attempt.end, and the outcomes but DONE, in its _failed.
ATTEMPT_END = {
    ("lmproxy/journey/attempt.py", "Attempt.end"),
    ("lmproxy/journey/attempt.py", "Attempt._failed"),
}


def test_a_services_counts_change_only_in_attempt_end():
    """request_count, latencies and the slot (``Service.release()``) change in one place,
    whatever ended the try; error_count in the registry's reports, which only that place
    calls. (The supervisor's copies of its workers' figures are assignments, not counts.)"""
    counted = {(p, w) for p, w, _ in _writes_to("request_count", augmented_only=True)}
    assert counted and counted <= ATTEMPT_END, counted
    appended = {
        (p, w)
        for p, w, line in _calls_of("append")
        if ".latencies.append(" in _router_sources()[p].splitlines()[line - 1]
    }
    assert appended and appended <= ATTEMPT_END, appended
    released = {
        (p, w)
        for p, w, line in _calls_of("release", args=0)
        if "lock" not in _router_sources()[p].splitlines()[line - 1]
    }
    assert released and released <= ATTEMPT_END, released
    errors = {(p, w) for p, w, _ in _writes_to("error_count", augmented_only=True)}
    assert {p for p, _ in errors} == {"lmproxy/fleet/roster.py"}, errors
    reports = set()
    for report in ("request_failed", "answered_error", "request_succeeded"):
        reports |= {(p, w) for p, w, _ in _calls_of(report) if p != "lmproxy/fleet/roster.py"}
    assert reports == ATTEMPT_END, reports


def test_a_grant_is_ended_only_in_the_journeys_end():
    """Outside the keepers of the counts (limits.py, redis_limits.py), a key's grant ends
    in Journey._end_grant alone, which Journey.end alone calls (once: it is guarded)."""
    ends = [
        (p, w)
        for p, w, line in _calls_of("end")
        if p not in ("lmproxy/keys/limits.py", "lmproxy/keys/redis_limits.py")
        and re.search(r"\b(grant|verdict)\.end\(", _router_sources()[p].splitlines()[line - 1])
    ]
    assert ends == [("lmproxy/journey/journey.py", "Journey._end_grant")], ends
    callers = {(p, w) for p, w, _ in _calls_of("_end_grant")}
    assert callers == {("lmproxy/journey/journey.py", "Journey.end")}, callers


def test_the_clients_handle_is_set_only_by_the_request_path():
    """What is under way for a client connection is set and cleared by the journey (or,
    for an answer of the whole router's, app.Answering), never by the connection itself
    or by the attempts under the journey; the connection only declares it."""
    writes = {(p, w) for p, w, _ in _writes_to("underway")}
    assert writes == {
        ("lmproxy/client/connection.py", "ClientConnection.__init__"),
        ("lmproxy/journey/journey.py", "Journey.start"),
        ("lmproxy/journey/journey.py", "Journey.end"),
        ("lmproxy/app.py", "Answering.__init__"),
        ("lmproxy/app.py", "Answering._run"),
    }, writes


def test_the_strategy_hears_of_a_try_only_from_its_attempt():
    """on_start at the send (either side of a pair: Attempt._sending, or an exchange's
    own send), on_end in the attempt's end."""
    starts = {(p, w) for p, w, _ in _calls_of("on_start") if p.startswith("lmproxy/")}
    assert starts == {
        ("lmproxy/journey/attempt.py", "Attempt._sending"),
        ("lmproxy/journey/exchange.py", "Exchange.send"),
    }, starts
    ends = {(p, w) for p, w, _ in _calls_of("on_end") if p.startswith("lmproxy/")}
    assert ends == ATTEMPT_END, ends


def test_the_upstream_connection_alone_writes_its_last_activity():
    writes = _lines_matching(r"last_activity =")
    assert {path for path, _ in writes} == {"lmproxy/backend/upstream.py"}, writes


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_in_the_docs_leads_somewhere():
    """README is short and docs/ holds the rest: every relative link between them, and
    every #anchor, must resolve."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 10
    anchors = {
        page: {_slug(h) for h in re.findall(r"^#+ (.*)$", page.read_text(), flags=re.M)}
        for page in pages
    }
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.exists(), f"{page.name}: {target} leads nowhere"
            if anchor:
                assert anchor in anchors.get(resolved, set()), f"{page.name}: no #{anchor}"
            checked += 1
    assert checked > 20
    assert (ROOT / "README.md").stat().st_size < 12 * 1024
