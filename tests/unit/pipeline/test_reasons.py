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


def http_failure_literals(source: str, where: str) -> dict[str, str]:
    """Reasons written as string literals in ``HttpFailure(status, "reason", ...)`` calls
    in ``source`` (the server spells some out), each with where it is."""
    found: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "HttpFailure"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            found[node.args[1].value] = f"{where}:{node.lineno}"
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


def test_http_reasons_spelled_out_in_the_server_are_in_the_vocabulary() -> None:
    assert http_failure_literals('raise HttpFailure(413, "too_large", m)', "x") == {
        "too_large": "x:1"
    }
    stray: dict[str, str] = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        literals = http_failure_literals(path.read_text(encoding="utf-8"), str(path.name))
        stray |= {r: at for r, at in literals.items() if r not in REASONS}
    assert not stray, f"add these to pipeline/reasons.py and the doc's table: {stray}"
