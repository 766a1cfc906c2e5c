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
    assert "lmproxy.app" in graph and "lmproxy.server" in graph["lmproxy.app"]
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
    assert {path for path, _ in changes} == {"lmproxy/registry.py"}, changes
    text = (PACKAGE / "registry.py").read_text()
    body = text[text.index("    def acquire(self)") : text.index("    def note_error(")]
    assert len(changes) == body.count("in_flight -=") + body.count("in_flight +=") == 4


def test_queued_is_written_by_admission_alone():
    writes = _lines_matching(r"\.queued\s*=[^=]")  # an annotated declaration is no write
    assert {path for path, _ in writes} == {"lmproxy/admission.py"}, writes


def test_the_upstream_connection_alone_writes_its_last_activity():
    writes = _lines_matching(r"last_activity =")
    assert {path for path, _ in writes} == {"lmproxy/upstream.py"}, writes


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
