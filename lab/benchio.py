"""What every benchmark shares: the machine it ran on, a JSON result file and a table.

Benchmarks are commands (``fedex bench ...``), never timed tests. Each writes one JSON
document under ``bench/results/`` and prints the same numbers as a table
(:mod:`pipeline.tables`).
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

RESULTS_DIR = Path("bench/results")


def machine_info() -> dict[str, Any]:
    """Where a number was measured; saved beside it."""
    return {
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def write_result(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Writes ``payload`` plus machine info and a timestamp as JSON; returns the path."""
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        **payload,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    tmp.replace(path)
    return path


@dataclass(frozen=True, slots=True)
class Percentiles:
    p50: float
    p90: float
    p99: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        if not values:
            return cls(float("nan"), float("nan"), float("nan"), float("nan"), 0)
        ordered = sorted(values)

        def pick(q: float) -> float:
            return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

        return cls(pick(0.5), pick(0.9), pick(0.99), ordered[-1], len(ordered))

    def as_dict(self) -> dict[str, float | int]:
        return {"p50": self.p50, "p90": self.p90, "p99": self.p99, "max": self.max, "n": self.n}


def best_rate(counts_and_seconds: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(best, median) items/s over repeated timed runs; the best is the least disturbed
    by other load on a shared machine, the median says how noisy it was."""
    rates = [count / seconds for count, seconds in counts_and_seconds if seconds > 0]
    return max(rates), statistics.median(rates)
