"""``fedex bench report``: run every benchmark, then render ``docs/benchmarks.md``.

Each benchmark runs as its own process (``python -m pipeline bench <name> --out …``), so
this module imports no app and one bench's crash, hang or memory cannot take the others
down. How each run went (status, seconds, exit code, the reason of a failure, the load
average before it) is kept in ``bench/results/report-runs.json``, which the renderer
(:mod:`lab.report`) shows beside the results. A run that exits 0 without writing its
result file counts as failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from lab.report import render_report
from lab.report_data import BENCHES, IMG_DIR, ON_REQUEST, RUNS_FILE, SAME_BENCH

#: Extra arguments per bench (the report's Table 1 is the CPU run).
EXTRA_ARGS: Final[dict[str, list[str]]] = {
    "train": ["--device", "cpu"],
    "datafraction": ["--scale", "0.1", "--seeds", "2"],
    "datafraction-paper": ["--scale", "paper", "--seeds", "1", "--arm", "user", "--arm", "system"],
    "paper-job": ["--scale", "0.1"],
    "paper-job-paper": ["--scale", "paper"],
}
DEFAULT_TIMEOUT_S: Final = 1800.0


@dataclass(frozen=True, slots=True)
class RunOutcome:
    name: str
    status: str  # ok | failed
    seconds: float
    returncode: int | None
    command: str
    reason: str | None = None
    loadavg: list[float] | None = None
    log: str | None = None


def plan(only: Sequence[str] | None = None, skip: Sequence[str] = ()) -> list[str]:
    """The benches to run, in report order; those :data:`ON_REQUEST` only when named in
    ``only``. Unknown names raise ValueError."""
    unknown = sorted(n for n in {*(only or ()), *skip} if n not in BENCHES)
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; known: {', '.join(BENCHES)}")
    chosen = [n for n in BENCHES if (n in only if only else n not in ON_REQUEST)]
    return [n for n in chosen if n not in skip]


def result_path(results_dir: Path, name: str) -> Path:
    return results_dir / ("train-cpu.json" if name == "train" else f"{name}.json")


def bench_argv(
    name: str, *, out: Path | None, docs_dir: Path | None = None, python: str = sys.executable
) -> list[str]:
    command = SAME_BENCH.get(name, name)
    argv = [python, "-m", "pipeline", "bench", command, *EXTRA_ARGS.get(name, [])]
    if command == "datafraction" and docs_dir is not None:  # its plot goes beside the report's
        argv += ["--plot", str(docs_dir / IMG_DIR / f"{name}.png")]
    return [*argv, "--out", str(out)] if out is not None else argv


def failure_reason(returncode: int | None, stderr_tail: str, timed_out: bool) -> str:
    """One line a reader understands: what happened and the last words of the bench."""
    if timed_out:
        head = "timed out"
    elif returncode is not None and returncode < 0:
        head = f"killed by signal {-returncode}"
    else:
        head = f"exit code {returncode}"
    lines = [ln.strip() for ln in stderr_tail.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    return f"{head}: {last[:300]}" if last else head


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _accepts_out(name: str) -> bool | None:
    """Whether ``fedex bench <name>`` takes ``--out`` (None: the command does not exist)."""
    probe = subprocess.run(
        [sys.executable, "-m", "pipeline", "bench", name, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if probe.returncode != 0:
        return None
    return "--out" in probe.stdout


def run_bench(
    name: str, *, results_dir: Path, log_dir: Path, timeout: float, docs_dir: Path | None = None
) -> RunOutcome:
    """Runs one bench to completion (or ``timeout``), its output teed to a log file."""
    path = result_path(results_dir, name)
    command = SAME_BENCH.get(name, name)
    accepts = _accepts_out(command)
    if accepts is None:
        why = f"no command `fedex bench {command}`"
        return RunOutcome(name, "failed", 0.0, None, f"fedex bench {command}", why)
    argv = bench_argv(name, out=path if accepts else None, docs_dir=docs_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    load = _loadavg()
    started, wall = time.time(), time.perf_counter()
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    seconds = round(time.perf_counter() - wall, 2)
    command_line = " ".join(["fedex", *argv[3:]])
    tail = log_path.read_text(errors="replace")[-4000:]
    if timed_out or proc.returncode != 0:
        reason = failure_reason(proc.returncode, tail, timed_out)
        return RunOutcome(
            name, "failed", seconds, proc.returncode, command_line, reason, load, str(log_path)
        )
    if not path.is_file() or path.stat().st_mtime < started:
        reason = f"exited 0 but did not write {path}"
        return RunOutcome(name, "failed", seconds, 0, command_line, reason, load, str(log_path))
    return RunOutcome(name, "ok", seconds, 0, command_line, None, load, str(log_path))


def record_runs(results_dir: Path, outcomes: Sequence[RunOutcome]) -> Path:
    """Merges ``outcomes`` into ``report-runs.json`` (benches not run keep their record)."""
    path = results_dir / RUNS_FILE
    try:
        existing = json.loads(path.read_text()).get("runs", {}) if path.is_file() else {}
    except (OSError, ValueError):
        existing = {}
    existing.update({o.name: asdict(o) for o in outcomes})
    doc = {"updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": existing}
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


def run_report(
    *,
    results_dir: Path,
    docs_dir: Path,
    log_dir: Path,
    only: Sequence[str] | None = None,
    skip: Sequence[str] = (),
    render_only: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
    echo: Callable[[str], None] = print,
    readme: Path | None = None,
) -> tuple[Path, list[Path], list[RunOutcome]]:
    """Runs the chosen benches one after the other (none with ``render_only``), records
    how they went, and renders the document from whatever results exist."""
    outcomes: list[RunOutcome] = []
    if not render_only:
        for name in plan(only, skip):
            echo(f"bench {name}: running (log in {log_dir / (name + '.log')})")
            outcome = run_bench(
                name, results_dir=results_dir, log_dir=log_dir, timeout=timeout, docs_dir=docs_dir
            )
            outcomes.append(outcome)
            detail = f": {outcome.reason}" if outcome.reason else ""
            echo(f"bench {name}: {outcome.status} in {outcome.seconds:.0f} s{detail}")
            record_runs(results_dir, outcomes)
    markdown, images = render_report(results_dir, docs_dir, readme)
    return markdown, images, outcomes
