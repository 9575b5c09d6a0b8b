"""What every benchmark writes: a JSON result file with its conditions, and a table.

Benchmarks are commands (``fedex bench ...``), never timed tests. Each writes one JSON
document under ``bench/results/`` and prints the same numbers as a table
(:mod:`pipeline.tables`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from lab import measure

RESULTS_DIR = Path("bench/results")


def write_result(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Writes ``payload`` with the conditions it was measured under (:func:`lab.measure.conditions`:
    commit, command, machine, load, broker, wall time) as JSON; returns the path."""
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "conditions": measure.conditions(),
        **payload,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    tmp.replace(path)
    return path


def best_rate(counts_and_seconds: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(best, median) items/s over repeated timed runs; the best is the least disturbed
    by other load on a shared machine, the median says how noisy it was."""
    rates = [count / seconds for count, seconds in counts_and_seconds if seconds > 0]
    return max(rates), statistics.median(rates)
