"""The benchmark results as the report reads them: which benchmarks there are and their
commands, each one's result file from ``bench/results/`` (or why there is none), and the
formatting helpers every section uses. Pure: JSON in, values out; no benchmark runs here
(``lab.bench_report`` runs them, each as its own ``fedex bench`` process). A benchmark
whose file is absent, unreadable or whose last run failed is listed as missing (or stale)
with the reason, never filled in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

#: Benchmarks of the report, in document order: (name, command that reproduces it).
BENCHES: Final[dict[str, str]] = {
    "codec": "fedex bench codec",
    "kafka": "fedex bench kafka",
    "pipeline": "fedex bench pipeline",
    "train": "fedex bench train --device cpu",
    "push": "fedex bench push",
    "datafraction": "fedex bench datafraction --scale 0.1 --seeds 2",
    "datafraction-paper": (
        "fedex bench datafraction --scale paper --seeds 1 --arm user --arm system"
    ),
    "expansion": "fedex bench expansion",
    "paper-job": "fedex bench paper-job --scale 0.1",
    "paper-job-paper": "fedex bench paper-job --scale paper",
    "fleet": "fedex bench fleet",
    "fedavg": "fedex bench fedavg",
    "chaos": "fedex bench chaos",
}
#: Report entries measured by another bench's command at another size: entry → bench.
SAME_BENCH: Final[dict[str, str]] = {
    "datafraction-paper": "datafraction",
    "paper-job-paper": "paper-job",
}
#: Entries ``fedex bench report`` runs only when named with ``--only`` (the paper's size
#: takes an hour or more on a 2-core CPU).
ON_REQUEST: Final = frozenset({"datafraction-paper", "paper-job-paper"})
GPU_COMMAND: Final = (
    "python -m lab.train_bench --device cuda:0 --out bench/results/train-<gpu>.json"
)
#: Written by ``fedex bench report`` beside the results: how each bench's last run went.
RUNS_FILE: Final = "report-runs.json"
IMG_DIR: Final = "img"


@dataclass(frozen=True)
class Result:
    """One benchmark's result file, or why there is none."""

    name: str
    command: str
    data: dict[str, Any] | None
    missing: str | None = None
    run: dict[str, Any] | None = None
    #: Why the result no longer measures today's code (:mod:`lab.freshness`), or None.
    stale: str | None = None

    @property
    def ok(self) -> bool:
        return self.data is not None


@dataclass
class Report:
    results: dict[str, Result]
    gpu: list[Result] = field(default_factory=list)
    generated_at: str = ""
    #: The last main job's report (``make demo`` writes ``bench/results/demo.json``): the
    #: freshness of a real run with a cloud that trains, which no bench alone measures.
    main_job: dict[str, Any] | None = None


# --------------------------------------------------------------------------- loading


MAIN_JOB_FILE: Final = "demo.json"


def _read(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return None, f"{path.name} is unreadable: {exc}"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    return data, None


def load_report(results_dir: Path, repo: Path | None = None) -> Report:
    """Every benchmark's result (or the reason it has none) from ``results_dir``; with
    ``repo`` (a git checkout) each result is also checked against the code it measures."""
    runs, _ = _read(results_dir / RUNS_FILE)
    run_of = (runs or {}).get("runs", {})
    results: dict[str, Result] = {}
    for name, command in BENCHES.items():
        file = results_dir / ("train-cpu.json" if name == "train" else f"{name}.json")
        data, missing = _read(file)
        run = run_of.get(name)
        if data is None and run and run.get("status") == "failed":
            missing = f"the last run failed: {run.get('reason', 'no reason recorded')}"
        elif data is None:
            missing = f"{missing}: run `{command}`"
        stale = None
        if repo is not None and data is not None:
            from lab.freshness import stale_reason

            stale = stale_reason(repo, name, conditions_of(data))
        results[name] = Result(name, command, data, missing, run, stale)
    gpu = []
    for file in sorted(results_dir.glob("train-*.json")):
        data, _ = _read(file)
        device = str(((data or {}).get("environment") or {}).get("device", ""))
        if data is not None and device.startswith("cuda"):
            gpu.append(Result(file.stem, GPU_COMMAND, data))
    main_job, _ = _read(results_dir / MAIN_JOB_FILE)
    # the newest result's time, not the clock: the same files always render the same page
    stamps = [
        str(r.data.get("measured_at") or r.data.get("created_at"))
        for r in [*results.values(), *gpu]
        if r.data is not None and (r.data.get("measured_at") or r.data.get("created_at"))
    ]
    return Report(results, gpu, max(stamps, default="—"), main_job)


# --------------------------------------------------------------------------- formatting


def num(value: Any, digits: int = 3) -> str:
    """A number for a table: thousands separators for big ones, ``digits`` significant
    digits for small ones; ``—`` for None or NaN."""
    if value is None or isinstance(value, bool):
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(num(v, digits) for v in value)
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.{digits}g}"
    return str(value)


def seconds(value: Any) -> str:
    """Seconds, switching to ms below 1 s."""
    if not isinstance(value, (int, float)) or math.isnan(float(value)):
        return "—"
    if value < 1:
        return f"{value * 1000:.3g} ms"
    return f"{value:,.0f} s" if value >= 100 else f"{value:.3g} s"


def percent(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, (int, float)) and not math.isnan(value) else "—"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def dig(data: Any, *path: str | int) -> Any:
    """``data[p0][p1]…`` or None where any step is absent."""
    for key in path:
        in_list = isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data)
        if not (in_list or (isinstance(data, Mapping) and key in data)):
            return None
        data = data[key]
    return data


def flatten(data: Any, prefix: str = "", limit: int = 80) -> list[tuple[str, Any]]:
    """Scalar leaves as ``a.b.c`` → value (lists of scalars shown whole, short ones)."""
    out: list[tuple[str, Any]] = []

    def walk(value: Any, key: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            if all(not isinstance(v, (Mapping, list)) for v in value) and len(value) <= 8:
                out.append((key, ", ".join(num(v) for v in value)))
            else:
                for i, v in enumerate(value[:4]):
                    walk(v, f"{key}[{i}]")
        else:
            out.append((key, value))

    walk(data, prefix)
    return out


def provenance(result: Result) -> tuple[str, str, str]:
    """(measured at, machine, load) of a result file."""
    data = result.data or {}
    cond = data.get("conditions") or {}
    machine = cond.get("machine") or data.get("machine") or {}
    env = data.get("environment") or {}
    when = data.get("measured_at") or data.get("created_at") or "—"
    cores = machine.get("cores") or machine.get("cpu_count") or env.get("cpu_count")
    host = machine.get("cpu_model") or machine.get("host") or env.get("device_name") or ""
    what = f"{cores} cores" if cores else "—"
    if str(env.get("device", "")).startswith("cuda"):
        what = f"{env.get('device_name')} ({what})"
    elif host:
        what = f"{host}, {what}"
    before = cond.get("loadavg_before") or data.get("loadavg_start") or env.get("loadavg_start")
    before = before or dig(result.run, "loadavg")
    after = cond.get("loadavg_after")
    load = ", ".join(num(v) for v in before) if before else "—"
    if after:
        load += " → " + ", ".join(num(v) for v in after)
    return str(when), what, load


def conditions_of(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """A result's conditions (older files kept ``commit``/``dirty`` at the top level)."""
    data = data or {}
    cond = dict(data.get("conditions") or {})
    for key in ("commit", "dirty", "command"):
        if key not in cond and key in data:
            cond[key] = data[key]
    return cond


def commit_of(result: Result) -> str:
    """The short commit a result was measured at, ``+dirty`` when the tree was, or —."""
    cond = conditions_of(result.data)
    commit = cond.get("commit")
    if not commit:
        return "—"
    return f"{commit[:7]}{'+dirty' if cond.get('dirty') else ''}"


# --------------------------------------------------------------------------- notes


def missing_note(result: Result) -> str:
    return f"**Missing** — {result.missing}."


def stale_note(result: Result) -> str:
    notes = ""
    if result.run and result.run.get("status") == "failed" and result.data is not None:
        notes += (
            f"\n\n> The last run of `{result.command}` failed ({result.run.get('reason')}); "
            "the numbers below are from the earlier result file.\n"
        )
    if result.stale and result.data is not None:
        notes += (
            f"\n\n> **Stale**: {result.stale}; the numbers below were measured at "
            f"{commit_of(result)}. Re-run `{result.command}`.\n"
        )
    return notes


def open_section(result: Result, title: str) -> tuple[str, dict[str, Any] | None]:
    """A section's heading and its first note, and the result's data. Every section opens
    alike: why the result is missing (the data is then None and the section ends there),
    or whether its numbers are stale or its last run failed."""
    heading = f"## {title}\n\n"
    if result.data is None:
        return heading + missing_note(result), None
    return heading + stale_note(result), result.data
