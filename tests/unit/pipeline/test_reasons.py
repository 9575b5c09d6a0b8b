"""One reason vocabulary: every reason the code can refuse a record or a request with is
in ``docs/wire-format.md``'s table, and every reason the table names can be emitted."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from pipeline import samples
from pipeline.auth import AuthReason
from pipeline.codec import Reject
from pipeline.reasons import REASONS, HttpReason, PushReason

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "wire-format.md"


def documented() -> set[str]:
    """The reasons in the first column of the doc's "Rejection reasons" table."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("\n## Rejection reasons\n", 1)[1].split("\n## ", 1)[0]
    found: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            found.update(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    return found


#: Calls that send a reason to an HTTP client, and the position of their reason argument.
REASON_ARG = {"HttpFailure": 1, "raw_response": 2}


def string_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "..."`` / ``NAME: Final = "..."`` of one module."""
    found: dict[str, str] = {}
    for node in tree.body:
        value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            found |= {t.id: value.value for t in targets if isinstance(t, ast.Name)}
    return found


def sent_reasons(trees: dict[str, ast.Module]) -> dict[str, str]:
    """Every reason the modules pass to :data:`REASON_ARG`'s calls as a string literal or as
    a module-level string constant of any of them (the server imports some), with where."""
    constants: dict[str, str] = {}
    for tree in trees.values():
        constants |= string_constants(tree)
    found: dict[str, str] = {}
    for where, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            index = REASON_ARG.get(node.func.id)
            if index is None or len(node.args) <= index:
                continue
            arg = node.args[index]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found[arg.value] = f"{where}:{node.lineno}"
            elif isinstance(arg, ast.Name) and arg.id in constants:
                found[constants[arg.id]] = f"{where}:{node.lineno}"
    return found


def test_the_vocabulary_holds_every_source_of_reasons() -> None:
    for source in (Reject, PushReason, HttpReason, AuthReason):
        assert {r.value for r in source} <= REASONS, source
    # The rule's own names are the vocabulary's strings.
    for name in ("TOO_LARGE", "TOMBSTONE", "UNKNOWN_MODEL", "MODEL_MISMATCH"):
        assert getattr(samples, name) in REASONS


def test_every_reason_the_code_emits_is_documented() -> None:
    missing = REASONS - documented()
    assert not missing, f"add {sorted(missing)} to docs/wire-format.md's reason table"


def test_nothing_documented_is_dead() -> None:
    dead = documented() - REASONS
    assert not dead, (
        f"{sorted(dead)} are documented but no code emits them: remove them from "
        "docs/wire-format.md, or add them to pipeline/reasons.py where they are emitted"
    )


def test_reasons_the_server_spells_out_are_in_the_vocabulary() -> None:
    example = ast.parse(
        'LATE: Final = "timeout"\n'
        'raise HttpFailure(413, "too_large", m)\n'
        'w(raw_response(408, "Request Timeout", LATE, m))\n'
    )
    assert sent_reasons({"x": example}) == {"too_large": "x:2", "timeout": "x:3"}
    trees = {
        path.name: ast.parse(path.read_text(encoding="utf-8"))
        for path in sorted((ROOT / "pipeline").rglob("*.py"))
    }
    stray = {r: at for r, at in sent_reasons(trees).items() if r not in REASONS}
    assert not stray, f"add these to pipeline/reasons.py and the doc's table: {stray}"
