"""The measurement discipline (lab.measure): pure logic, no broker."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from lab import measure
from lab.measure import Distribution, PairedRatio, describe, interleave


def test_a_p99_needs_a_hundred_values_and_the_text_says_so() -> None:
    few = Distribution.of([0.3, 0.1, 0.2] * 33)  # 99 values
    assert few.n == 99 and few.p99 is None and few.max == 0.3
    assert few.p50 == 0.2 and few.p90 == 0.3
    assert "too few for a p99" in few.text() and "n=99" in few.text()
    enough = Distribution.of([float(i) for i in range(1, 101)])
    assert enough.p99 == 99.0 and enough.p50 == 50.0 and enough.p90 == 90.0
    assert enough.text(digits=3) == "p50 50 s, p99 99 s, max 100 s (n=100)"


def test_tiny_samples_get_no_p90_and_an_empty_one_no_figures() -> None:
    assert Distribution.of([1.0] * 9).p90 is None
    empty = Distribution.of([])
    assert empty.n == 0 and empty.p50 is None and empty.max is None
    assert describe(empty.as_dict()) == "no values"
    assert "note" in Distribution.of([1.0]).as_dict()
    assert "note" not in Distribution.of([1.0] * 100).as_dict()


def test_interleave_alternates_and_keeps_the_warm_up_apart() -> None:
    calls: list[str] = []

    async def a(i: int) -> float:
        calls.append(f"a{i}")
        return 100.0

    async def b(i: int) -> float:
        calls.append(f"b{i}")
        return [10.0, 50.0, 60.0, 70.0][i]

    ratio = asyncio.run(interleave(a, b, pairs=3, warmup_pairs=1))
    assert calls == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3"]
    assert ratio.ratios == [0.5, 0.6, 0.7]
    assert ratio.median == 0.6
    doc = ratio.as_dict()
    assert (doc["ratio_min"], doc["ratio_max"], doc["pairs"]) == (0.5, 0.7, 3)
    assert doc["cold_ratio"] == 0.1


def test_interleave_refuses_zero_pairs() -> None:
    async def one(_: int) -> float:
        return 1.0

    with pytest.raises(ValueError, match="at least one measured pair"):
        asyncio.run(interleave(one, one, pairs=0))


def test_the_median_ratio_is_of_pairs_not_of_medians() -> None:
    paired = PairedRatio(a=[100.0, 50.0, 100.0], b=[50.0, 50.0, 60.0])
    assert paired.ratios == [0.5, 1.0, 0.6]
    assert paired.median == 0.6


def test_conditions_name_the_command_the_load_and_the_broker() -> None:
    measure.begin(["fedex", "bench", "pipeline", "--repeat", "5"])
    measure.note_broker({"source": "started by the bench", "cold": True})
    doc = measure.conditions()
    assert doc["command"] == "fedex bench pipeline --repeat 5"
    assert doc["broker"] == {"source": "started by the bench", "cold": True}
    assert doc["loadavg_before"] is not None and doc["loadavg_after"] is not None
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["memory_bytes"] > 0
    assert doc["wall_s"] >= 0
    assert set(doc) >= {"commit", "dirty", "committed_at", "started_at"}


def test_conditions_give_the_code_as_it_was_when_the_bench_began(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    states = iter([{"commit": "a" * 40, "dirty": False, "dirty_paths": []}])
    monkeypatch.setattr(measure, "source_state", lambda: next(states))
    measure.begin(["fedex", "bench", "datafraction"])
    # Commits and edits that land while a long bench runs are not what it measured.
    monkeypatch.setattr(measure, "source_state", lambda: {"commit": "b" * 40, "dirty": True})
    doc = measure.conditions()
    assert (doc["commit"], doc["dirty"], doc["dirty_paths"]) == ("a" * 40, False, [])


def test_dirty_files_reads_porcelain_even_with_its_first_blank_stripped() -> None:
    porcelain = "M lab/a.py\n M lab/b.py\nR  x.py -> trainer/z.py\nMM pipeline/c.py"
    assert measure.dirty_files(porcelain) == [
        "lab/a.py",
        "lab/b.py",
        "pipeline/c.py",
        "trainer/z.py",
    ]
    assert measure.dirty_files("") == []


def test_a_result_is_stale_only_when_its_own_code_was_dirty() -> None:
    from lab.freshness import stale_reason

    repo = Path(__file__).resolve().parents[3]
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    dirty = f"measured on a dirty tree at {head[:7]}"
    own = {"commit": head, "dirty": True, "dirty_paths": ["device_sim/world.py"]}
    others = {"commit": head, "dirty": True, "dirty_paths": ["agents/app.py"]}
    unlisted = {"commit": head, "dirty": True}  # results written before dirty_paths
    assert stale_reason(repo, "datafraction", own) == dirty
    assert stale_reason(repo, "datafraction", unlisted) == dirty
    assert stale_reason(repo, "datafraction", others) != dirty


def test_warm_up_phases_are_timed_with_their_figures() -> None:
    warm = measure.Warmup()
    with warm.phase("first fetch") as phase:
        phase["samples_s"] = 5.0
    [entry] = warm.as_list()
    assert entry["what"] == "first fetch" and entry["samples_s"] == 5.0
    assert entry["seconds"] >= 0
