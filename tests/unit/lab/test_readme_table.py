"""The README's benchmark table says what the result files say (lab.readme_table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.readme_table import BEGIN, END, committed_table, render, update_readme
from lab.report_data import load_report

ROOT = Path(__file__).resolve().parents[3]


def test_the_committed_readme_table_matches_the_result_files() -> None:
    """Fails when a number in the README differs from bench/results (re-render with
    `fedex bench report --render-only`)."""
    expected = render(load_report(ROOT / "bench" / "results"))
    assert committed_table(ROOT / "README.md") == expected


def _results(tmp_path: Path, ratio: float) -> Path:
    out = tmp_path / "results"
    out.mkdir()
    doc = {
        "benchmark": "pipeline",
        "measured_at": "2026-12-03T10:00:00Z",
        "conditions": {"commit": "abcdef1234567", "dirty": False},
        "agents": {
            "agents_samples_s": 60_000.0,
            "raw_kafka_samples_s": 100_000.0,
            "throughput": {"pairs": 5, "ratio_median": ratio, "ratio_min": 0.5, "ratio_max": 0.7},
        },
    }
    (out / "pipeline.json").write_text(json.dumps(doc))
    return out


def test_a_changed_number_is_caught_and_rendering_puts_it_back(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{BEGIN}\n{END}\n\nafter\n")
    report = load_report(_results(tmp_path, 0.6))
    assert update_readme(readme, report)
    assert "**ratio 0.6**" in readme.read_text() and readme.read_text().endswith("after\n")
    assert committed_table(readme) == render(report)
    # someone edits a number by hand: the table no longer matches its result file
    readme.write_text(readme.read_text().replace("**ratio 0.6**", "**ratio 0.66**"))
    assert committed_table(readme) != render(report)
    assert update_readme(readme, report) and committed_table(readme) == render(report)
    assert not update_readme(readme, report)


def test_missing_results_and_targets_are_shown_plainly(tmp_path: Path) -> None:
    table = render(load_report(_results(tmp_path, 0.4)))
    assert "≥ 0.5 ❌ missed" in table
    assert "**missing** — no codec.json: run `fedex bench codec`" in table
    assert "`pipeline.json` 2026-12-03, abcdef1" in table


def test_a_readme_without_markers_is_refused(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("no table here\n")
    with pytest.raises(ValueError, match="no benchmark table markers"):
        update_readme(readme, load_report(_results(tmp_path, 0.6)))


def test_the_committed_benchmarks_page_matches_the_result_files(tmp_path: Path) -> None:
    """docs/benchmarks.md is what `fedex bench report --render-only` makes of bench/results
    (staleness marks aside: they follow the git history, not the files)."""
    from lab.report import render as render_page
    from lab.report import without_stale_marks

    markdown, _ = render_page(load_report(ROOT / "bench" / "results"), tmp_path / "docs")
    committed = (ROOT / "docs" / "benchmarks.md").read_text()
    assert without_stale_marks(committed) == markdown
