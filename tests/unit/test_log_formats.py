"""Every log call's format string is a valid %-format: a bad one (``%,.0f``) does not fail
the call, it prints a "Logging error" traceback in its place, in the middle of a job."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "agents", "trainer", "device_sim", "lab")
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
#: One %-conversion: optional mapping key, flags, width, precision, type.
CONVERSION = re.compile(r"%(\([^)]*\))?[#0 +-]*(\*|\d+)?(\.(\*|\d+))?[diouxXeEfFgGcrsa%]")


def log_formats() -> list[tuple[str, int, str]]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LEVELS
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                    and len(node.args) > 1  # formatted only when it has arguments
                ):
                    found.append((str(path.relative_to(ROOT)), node.lineno, node.args[0].value))
    return found


def test_log_calls_are_found() -> None:
    assert len(log_formats()) > 50


def test_every_log_format_is_a_valid_percent_format() -> None:
    bad = [
        f"{path}:{line}: {fmt!r}"
        for path, line, fmt in log_formats()
        if CONVERSION.sub("", fmt).count("%")
    ]
    assert not bad, "invalid %-formats in log calls:\n" + "\n".join(bad)
