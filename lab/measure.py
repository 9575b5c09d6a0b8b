"""The measurement discipline every benchmark shares.

- **Distributions with their n.** :class:`Distribution` sorts every value (exact, no
  binning); a percentile is given only when there are enough values for it
  (:data:`MIN_VALUES`: a p99 needs 100), otherwise the maximum stands in its place and
  the text says so.
- **Interleaved comparisons.** :func:`interleave` runs A and B as k pairs (ABAB…) after
  warm-up pairs that are reported apart; :class:`PairedRatio` gives the median ratio and
  its min–max over the pairs, never one A over one B.
- **Warm-up, reported beside the figures.** :class:`Warmup` times the phases a bench runs
  before it measures (broker JVM, first job, first fetch) and keeps them out of the
  figures.
- **Conditions.** :func:`conditions` says where and how a number was taken: commit and
  whether the tree was dirty, the exact command, CPU model, cores, memory, load average
  before and after, the broker's state and the wall time. :func:`begin` is called once per
  bench command, before anything is started.

Standard library only: the training bench runs on an accelerator machine with torch alone.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

#: The fewest values a percentile is computed from; below, the maximum is given instead.
MIN_VALUES: Final[dict[str, int]] = {"p50": 1, "p90": 10, "p99": 100}
#: Default number of measured A/B pairs of an interleaved comparison.
DEFAULT_PAIRS: Final = 5
#: The code a result measures, for the commit check: a change outside these is not one.
CODE_PATHS: Final = ("pipeline", "agents", "trainer", "device_sim", "lab", "pyproject.toml")


# --------------------------------------------------------------------------- distributions


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (q in [0, 1])."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(len(ordered), rank) - 1]


@dataclass(frozen=True, slots=True)
class Distribution:
    """Every value of one latency (or lag, or size) sorted: n, min, p50, p90, p99, max.

    A percentile whose n is below :data:`MIN_VALUES` is None: the text then names the
    maximum and says there were too few values.
    """

    n: int
    min: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None
    mean: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        ordered = sorted(float(v) for v in values)
        n = len(ordered)
        if n == 0:
            return cls(0, None, None, None, None, None, None)

        def pick(name: str, q: float) -> float | None:
            return _percentile(ordered, q) if n >= MIN_VALUES[name] else None

        return cls(
            n=n,
            min=ordered[0],
            p50=pick("p50", 0.5),
            p90=pick("p90", 0.9),
            p99=pick("p99", 0.99),
            max=ordered[-1],
            mean=statistics.fmean(ordered),
        )

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "n": self.n,
            "min": self.min,
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "max": self.max,
            "mean": self.mean,
        }
        if self.n and self.p99 is None:
            doc["note"] = f"n={self.n} < {MIN_VALUES['p99']}: no p99, the max is given"
        return doc

    def text(self, unit: str = "s", scale: float = 1.0, digits: int = 3) -> str:
        """``p50 0.12 s, p99 0.20 s (n=400)``, or the max with a note when n is small."""
        return describe(self.as_dict(), unit, scale, digits)


def describe(
    doc: dict[str, Any] | None, unit: str = "s", scale: float = 1.0, digits: int = 3
) -> str:
    """The text of a :meth:`Distribution.as_dict` document (as read back from JSON)."""
    if not doc or not doc.get("n"):
        return "no values"

    def fmt(value: float) -> str:
        return f"{value * scale:.{digits}g} {unit}".strip()

    n = doc["n"]
    if doc.get("p99") is not None:
        return f"p50 {fmt(doc['p50'])}, p99 {fmt(doc['p99'])}, max {fmt(doc['max'])} (n={n:,})"
    return (
        f"p50 {fmt(doc['p50'])}, max {fmt(doc['max'])} "
        f"(n={n:,}: too few for a p99, the max is given)"
    )


# --------------------------------------------------------------------------- comparisons


@dataclass(frozen=True, slots=True)
class PairedRatio:
    """B / A over interleaved pairs: the median ratio and its spread, with every pair."""

    a: list[float]
    b: list[float]
    warmup_a: list[float] = field(default_factory=list)
    warmup_b: list[float] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [b / a for a, b in zip(self.a, self.b, strict=True) if a > 0]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def as_dict(self) -> dict[str, Any]:
        ratios = self.ratios
        cold = [b / a for a, b in zip(self.warmup_a, self.warmup_b, strict=True) if a > 0]
        return {
            "pairs": len(ratios),
            "ratio_median": self.median,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ratios": ratios,
            "a": self.a,
            "b": self.b,
            "a_median": statistics.median(self.a),
            "b_median": statistics.median(self.b),
            "warmup_a": self.warmup_a,
            "warmup_b": self.warmup_b,
            "cold_ratio": cold[0] if cold else None,
        }


async def interleave(
    run_a: Callable[[int], Awaitable[float]],
    run_b: Callable[[int], Awaitable[float]],
    *,
    pairs: int = DEFAULT_PAIRS,
    warmup_pairs: int = 1,
    echo: Callable[[str], None] | None = None,
) -> PairedRatio:
    """Runs A then B, ``warmup_pairs + pairs`` times (ABAB…); each call gets its pair's
    index and returns the figure (e.g. samples/s). The warm-up pairs are kept apart."""
    if pairs < 1:
        raise ValueError("an interleaved comparison needs at least one measured pair")
    a: list[float] = []
    b: list[float] = []
    for i in range(warmup_pairs + pairs):
        first = await run_a(i)
        second = await run_b(i)
        a.append(first)
        b.append(second)
        if echo is not None:
            tag = "warm-up" if i < warmup_pairs else f"pair {i - warmup_pairs + 1}/{pairs}"
            echo(f"{tag}: A {first:,.0f}  B {second:,.0f}  B/A {second / first:.3f}")
    return PairedRatio(a[warmup_pairs:], b[warmup_pairs:], a[:warmup_pairs], b[:warmup_pairs])


# --------------------------------------------------------------------------- warm-up


@dataclass
class Warmup:
    """The phases a bench ran before measuring: what, and how long each took."""

    phases: list[dict[str, Any]] = field(default_factory=list)

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[dict[str, Any]]:
        """Times one warm-up phase; the yielded dict takes extra figures (e.g. its rate)."""
        entry: dict[str, Any] = {"what": what}
        start = time.perf_counter()
        try:
            yield entry
        finally:
            entry["seconds"] = round(time.perf_counter() - start, 3)
            self.phases.append(entry)

    def as_list(self) -> list[dict[str, Any]]:
        return list(self.phases)


# --------------------------------------------------------------------------- conditions


@dataclass
class _Session:
    command: str
    started: float
    wall_start: float
    loadavg_before: list[float] | None
    #: The code as it was when the bench started: what a long bench measured, even when
    #: commits or edits land while it runs.
    source: dict[str, Any]
    broker: dict[str, Any] | None = None


_session: _Session | None = None


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def begin(command: Sequence[str] | None = None) -> None:
    """Marks the start of one bench command: its words, the clock and the load before."""
    global _session
    words = list(command) if command is not None else ["fedex", *sys.argv[1:]]
    _session = _Session(
        command=shlex.join(words),
        started=time.time(),
        wall_start=time.perf_counter(),
        loadavg_before=_loadavg(),
        source=source_state(),
    )


def note_broker(state: dict[str, Any]) -> None:
    """Records the broker a bench measured on: who started it, where, warm or cold."""
    if _session is None:
        begin()
    assert _session is not None
    _session.broker = {**(_session.broker or {}), **state}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_state() -> dict[str, Any]:
    """The commit measured and which files of its code (:data:`CODE_PATHS`) had local
    changes (``dirty_paths``; ``dirty`` is whether there were any)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    dirty_paths = None if status is None else dirty_files(status)
    return {
        "commit": commit,
        "dirty": None if dirty_paths is None else bool(dirty_paths),
        "dirty_paths": dirty_paths,
        "committed_at": _git("log", "-1", "--format=%cI") if commit else None,
    }


def dirty_files(porcelain: str) -> list[str]:
    """The paths of ``git status --porcelain`` output (a rename's new path). The two status
    letters are skipped by position, not by splitting, and the output may have lost its
    first line's leading blank (``_git`` strips it)."""
    paths = (line[2:].strip().split(" -> ")[-1] for line in porcelain.splitlines())
    return sorted(path for path in paths if path)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def machine() -> dict[str, Any]:
    import socket

    return {
        "host": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def conditions() -> dict[str, Any]:
    """Where and how the numbers were taken: the code as of the bench's start, the rest as
    of now (the end of the bench)."""
    session = _session
    now = time.perf_counter()
    return {
        **(session.source if session else source_state()),
        "command": session.command if session else shlex.join(["fedex", *sys.argv[1:]]),
        "machine": machine(),
        "loadavg_before": session.loadavg_before if session else None,
        "loadavg_after": _loadavg(),
        "broker": session.broker if session else None,
        "started_at": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(session.started if session else time.time())
        ),
        "wall_s": round(now - session.wall_start, 2) if session else None,
    }


def peak_rss_bytes() -> dict[str, int | None]:
    """The kernel's high-water marks of this process: ``VmHWM`` (it alone) and
    ``ru_maxrss`` of its waited-for children (the largest one)."""
    import resource

    hwm = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"vm_hwm": hwm if hwm is not None else own, "children_max": children or None}
