"""No function of the request path grows past a cyclomatic complexity of 12 (radon's
count): a function that branches more than that hides a rare case inside the common
one, and is where the next feature's exit gets missed. Rare branches (errors, odd
framing, upgrades) belong in helpers of their own, called only when they happen, so
the split costs the common path no call."""

from __future__ import annotations

from pathlib import Path

from conftest import ROOT
from radon.complexity import cc_visit
from radon.visitors import Function

MAX_COMPLEXITY = 12

# The request path, as globs under the repository's root: a module moved into a
# subpackage, or added there, is one line here.
REQUEST_PATH = (
    "lmproxy/client/connection.py",
    "lmproxy/client/request.py",
    "lmproxy/journey/*.py",
    "lmproxy/backend/upstream.py",
    "lmproxy/app.py",
    "lmproxy/journey/admission.py",
    "lmproxy/fleet/roster.py",
    "lmproxy/telemetry/metrics.py",
    "lmproxy/telemetry/tracing.py",
    "lmproxy/errors.py",
    "lmproxy/fleet/breaker.py",
    "lmproxy/keys/limits.py",
    "lmproxy/decode.py",
    "lmproxy/client/accept.py",
    "strategies/*.py",
    "lmproxy/sim/server.py",  # the simulator's request handling
)


def _modules() -> list[Path]:
    found: list[Path] = []
    for pattern in REQUEST_PATH:
        matched = sorted(ROOT.glob(pattern))
        assert matched, f"{pattern} in REQUEST_PATH matches no file: was it moved?"
        found.extend(matched)
    return found


def _functions(blocks: list[Function]) -> list[Function]:
    """Every function and method (``cc_visit`` lists methods beside their class), and
    the closures nested in them."""
    out: list[Function] = []
    for block in blocks:
        if isinstance(block, Function):
            out.append(block)
            out.extend(_functions(block.closures))
    return out


def test_no_request_path_function_is_too_complex() -> None:
    offenders = []
    for path in _modules():
        name = str(path.relative_to(ROOT))
        for function in _functions(cc_visit(path.read_text())):
            if function.complexity > MAX_COMPLEXITY:
                offenders.append(
                    f"{name}:{function.lineno} {function.fullname} {function.complexity}"
                )
    assert not offenders, (
        f"over a cyclomatic complexity of {MAX_COMPLEXITY} (split rare branches into "
        "helpers):\n" + "\n".join(offenders)
    )
