"""Whether a result still measures today's code: its commit against the last commit that
changed the code its benchmark measures (git, read-only).

A result is *stale* when that last change is not an ancestor of (or equal to) the commit
the result was measured at, or when the result was measured on a dirty tree or records
no commit at all. The renderer marks such results; it never hides them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

#: Figure 4 and the paper-sized job, at a tenth of the paper and at its size alike.
_DATAFRACTION: Final = (
    "device_sim",
    "pipeline/head_loop.py",
    "pipeline/facenet_weights.py",
    "lab/datafraction_bench.py",
    "lab/bench_banks.py",
)
_PAPER_JOB: Final = (
    "trainer",
    "pipeline/codec",
    "device_sim/expansion.py",
    "device_sim/feature_model.py",
    "lab/paper_job.py",
    "lab/bench_banks.py",
    "lab/update_latency.py",
    "lab/feature_pushes.py",
)

#: The code each benchmark measures (the bench's own module and what it drives).
BENCH_CODE: Final[dict[str, tuple[str, ...]]] = {
    "codec": ("pipeline/codec", "lab/transport_bench.py", "lab/feature_pushes.py"),
    "kafka": (
        "pipeline/clients.py",
        "lab/transport_bench.py",
        "lab/feature_pushes.py",
        "lab/bench_broker.py",
    ),
    "pipeline": (
        "agents",
        "pipeline/codec",
        "pipeline/clients.py",
        "trainer",
        "lab/pipeline_bench.py",
        "lab/update_latency.py",
        "lab/feature_pushes.py",
        "lab/measure.py",
    ),
    "train": ("trainer/recipe.py", "pipeline/zoo.py", "lab/train_bench.py", "lab/measure.py"),
    "push": ("pipeline/server.py", "pipeline/http_api.py", "pipeline/codec", "lab/push_bench.py"),
    "datafraction": _DATAFRACTION,
    "datafraction-paper": _DATAFRACTION,
    "paper-job": _PAPER_JOB,
    "paper-job-paper": _PAPER_JOB,
    "expansion": (
        "device_sim",
        "pipeline/head_loop.py",
        "lab/datafraction_bench.py",
        "lab/bench_banks.py",
        "lab/expansion_bench.py",
    ),
    "fleet": ("device_sim", "lab/fleet_bench.py", "lab/subscription_bench.py"),
    "fedavg": (
        "lab/fedavg_bench.py",
        "lab/fedavg_task.py",
        "lab/fedavg_arm.py",
        "lab/fedavg_fedex_arm.py",
        "lab/fedavg_baseline_arm.py",
        "lab/feature_pushes.py",
        "lab/fedavg_devices.py",
        "lab/fedavg_server.py",
        "lab/fedavg_report.py",
        "lab/datafraction_bench.py",
        "lab/bench_banks.py",
        "device_sim/fresh.py",
        "device_sim/feature_model.py",
        "trainer",
    ),
    "chaos": (
        "agents",
        "trainer",
        "pipeline/samples.py",
        "lab/chaos.py",
        "lab/chaos_bench.py",
        "lab/feature_pushes.py",
    ),
}


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None


def last_change(repo: Path, paths: Sequence[str]) -> str | None:
    """The newest commit that touched any of ``paths``."""
    done = _git(repo, "log", "-1", "--format=%H", "--", *paths)
    return done.stdout.strip() or None if done and done.returncode == 0 else None


def stale_reason(repo: Path, name: str, conditions: dict[str, Any] | None) -> str | None:
    """Why the result of bench ``name`` measured under ``conditions`` is stale, or None."""
    paths = BENCH_CODE.get(name)
    if paths is None or _git(repo, "rev-parse", "--git-dir") is None:
        return None
    commit = (conditions or {}).get("commit")
    if not commit:
        return "no commit recorded"
    if _dirty_in(conditions or {}, paths):
        return f"measured on a dirty tree at {commit[:7]}"
    changed = last_change(repo, paths)
    if changed is None:
        return None
    known = _git(repo, "cat-file", "-e", f"{commit}^{{commit}}")
    if known is None or known.returncode != 0:
        return f"commit {commit[:7]} is not in this repository"
    ancestor = _git(repo, "merge-base", "--is-ancestor", changed, commit)
    if ancestor is not None and ancestor.returncode == 0:
        return None
    return f"code changed since (last change {changed[:7]})"


def _dirty_in(conditions: dict[str, Any], paths: Sequence[str]) -> bool:
    """Whether the tree had local changes in the bench's own code when it was measured
    (results that do not list their dirty files count any change)."""
    if not conditions.get("dirty"):
        return False
    dirty = conditions.get("dirty_paths")
    if dirty is None:
        return True
    return any(f == p or f.startswith(p.rstrip("/") + "/") for f in dirty for p in paths)
