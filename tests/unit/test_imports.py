"""Every module imports on its own, first (aiohttp's test_circular_imports, cheaper).

A cycle hidden behind function-level imports, or a module that only works once another
was imported first, fails here. One fresh interpreter imports each project module with
every project module dropped from ``sys.modules`` before it (third-party packages stay
loaded: torch once, not ninety times), so each import starts from nothing of ours.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "agents", "trainer", "device_sim", "lab")

SCRIPT = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in {packages!r}]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        failed.append(name + ":\\n" + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def project_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__main__":
                continue
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    modules = project_modules()
    assert len(modules) > 80 and "pipeline.codec.envelope" in modules
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(packages=PACKAGES), *modules],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
