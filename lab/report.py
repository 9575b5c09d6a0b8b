"""``docs/benchmarks.md`` and its plots, rendered from the result files: the loaded
results (:mod:`lab.report_data`), one section per benchmark (:mod:`lab.report_sections` and the
modules beside it) and the plots (:mod:`lab.report_plots`)."""

from __future__ import annotations

import re
from pathlib import Path

from lab import report_learning as learning
from lab import report_sections as sec
from lab.readme_table import update_readme
from lab.report_chaos import section_chaos
from lab.report_data import IMG_DIR, Report, load_report
from lab.report_fedavg import section_fedavg
from lab.report_plots import plot_datafraction, plot_fedavg, plot_push, plot_train

# --------------------------------------------------------------------------- the document


def render(report: Report, docs_dir: Path) -> tuple[str, list[Path]]:
    """The markdown of ``docs/benchmarks.md`` and the PNGs written under ``docs_dir/img``."""
    img_dir = docs_dir / IMG_DIR
    written: list[Path] = []

    def plot(name: str, ok: bool) -> str | None:
        if ok:
            written.append(img_dir / name)
            return f"{IMG_DIR}/{name}"
        return None

    train_img = plot("train.png", plot_train(report, img_dir / "train.png"))
    push_img = plot("push.png", plot_push(report, img_dir / "push.png"))
    df_img, df_paper_img = (
        plot(f"{name}.png", plot_datafraction(report.results[name].data, img_dir / f"{name}.png"))
        for name in ("datafraction", "datafraction-paper")
    )
    fedavg = report.results["fedavg"].data
    fedavg_img = plot("fedavg.png", plot_fedavg(fedavg, img_dir / "fedavg.png"))
    parts = [
        "# Benchmarks\n\n"
        f"Rendered by `fedex bench report` (newest result {report.generated_at}) from "
        "`bench/results/*.json`; `fedex bench report --render-only` regenerates this page "
        "and `docs/img/*.png` from those files without running anything. Every number comes "
        "from a result file, measured by the command beside it; rows marked *modelled* are "
        "computed from measured numbers by the stated model; a benchmark without results is "
        "listed as missing with the reason. Paper = FedEx (HotMobile'20).\n\n"
        "How every number is taken (`lab/measure.py`): each bench warms what it starts and "
        "reports the warm-up apart; A/B comparisons are interleaved pairs (ABAB…, `--repeat`, "
        "5 by default) reported as the median ratio with its min–max; every latency is the "
        "exact distribution of all its values with its n, and a p99 is given only over 100 "
        "values or more (otherwise the max, said so); each result file records its commit and "
        "whether the tree was dirty, the exact command, CPU model, cores, memory, load before "
        "and after, the broker (started by the bench, i.e. cold, or found running) and the "
        "wall time. A result measured before the last change to the code it measures is "
        "marked **stale** (`lab/freshness.py`). Benches delete the topics they create.",
        sec.section_runs(report),
        sec.section_train(report, train_img),
        sec.section_push(report, push_img),
        learning.section_datafraction(report, df_img),
        learning.section_datafraction(report, df_paper_img, "datafraction-paper"),
        learning.section_expansion(report),
        learning.section_paper_job(report),
        learning.section_paper_job(report, "paper-job-paper"),
        sec.section_transport(report),
        sec.section_pipeline(report),
        sec.section_fleet(report),
        section_fedavg(report, fedavg_img),
        section_chaos(report),
    ]
    return "\n\n".join(parts) + "\n", written


#: What the renderer adds for results that no longer measure today's code.
STALE_MARKS = (
    re.compile(r"\n\n> \*\*Stale\*\*: [^\n]*\n"),
    re.compile(r"; \*\*stale\*\*: [^|]*?(?= \|)"),
)


def without_stale_marks(markdown: str) -> str:
    """``markdown`` less its staleness marks (they follow git, not the result files)."""
    for pattern in STALE_MARKS:
        markdown = pattern.sub("", markdown)
    return markdown


def render_report(
    results_dir: Path, docs_dir: Path, readme: Path | None = None
) -> tuple[Path, list[Path]]:
    """Writes ``docs_dir/benchmarks.md`` and its plots from ``results_dir``, and the
    benchmark table of ``readme`` when one is given (:mod:`lab.readme_table`)."""
    report = load_report(results_dir, repo=Path("."))
    markdown, images = render(report, docs_dir)
    if readme is not None:
        update_readme(readme, report)
    path = docs_dir / "benchmarks.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(markdown)
    tmp.replace(path)
    return path, images
