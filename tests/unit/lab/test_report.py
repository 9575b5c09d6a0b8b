"""``docs/benchmarks.md`` from hand-made result files: the tables carry the numbers given,
absent or failed benches are reported as missing with the reason, the GPU column appears
only with a CUDA result, the PNGs are written, and ``--render-only`` runs nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import lab.bench_report as bench_report
from lab.bench_report import failure_reason, plan, record_runs, run_report
from lab.report import render, render_report
from lab.report_data import BENCHES, load_report

PNG = b"\x89PNG\r\n\x1a\n"


def write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def train_doc(device: str, rates: dict[str, float]) -> dict[str, Any]:
    paper = {"freeze5": 28_078.46, "freeze6": 41_869.68}
    return {
        "benchmark": "train",
        "created_at": "2026-01-02T03:04:05+0000",
        "environment": {
            "device": device,
            "device_name": "NVIDIA H200" if device.startswith("cuda") else "Test CPU",
            "cpu_count": 2,
            "threads": 2,
            "loadavg_start": [1.5, 1.0, 0.5],
        },
        "levels": [
            {
                "level": level,
                "feature_shape": [1792] if level == "freeze5" else [512],
                "samples_per_s": rate,
                "paper_img_per_s": paper[level],
                "vs_paper": rate / paper[level],
                "utilisation": 0.5,
            }
            for level, rate in rates.items()
        ],
    }


def timing(p50: float) -> dict[str, float]:
    return {"p50": p50, "p90": p50, "min": p50, "max": p50, "mean": p50, "n": 3}


PUSH = {
    "benchmark": "push",
    "measured_at": "2026-01-02T03:04:05Z",
    "machine": {"host": "box", "cpu_count": 2},
    "loadavg_start": [0.25, 0.5, 0.75],
    "config": {"samples_per_push": 10, "dtype": "float16", "repeats": 3, "pull_repeats": 2},
    "model": "loopback + simulated transfer",
    "tiers": [{"name": "lte", "up_mbps": 8.0, "down_mbps": 20.0, "rtt_ms": 50.0, "loss": 0.005}],
    "levels": [
        {
            "level": "freeze6",
            "feature_shape": [512],
            "push_bytes": 10_608,
            "kafka_s": timing(0.000844),
            "http_s": timing(0.00875),
            "tiers_s": {"lte": 0.109},
            "paper_s": 1.5,
        }
    ],
    "pull": [
        {
            "level": "full",
            "checkpoint_bytes": 55_000_123,
            "http_s": timing(0.14),
            "tiers_s": {"lte": 111.4},
            "paper_s": 26.0,
        }
    ],
    "fedavg_push": [
        {"level": "full", "dtype": "float32", "bytes": 111_222_333, "tiers_s": {"lte": 222.5}}
    ],
}

DATAFRACTION = {
    "benchmark": "datafraction",
    "measured_at": "2026-01-02T03:04:05Z",
    "machine": {"host": "box", "cpu_count": 2},
    "seeds": [0, 1],
    "recipe": {"epochs": 30, "lr": 0.003},
    "bank": {"file": "bank-x.safetensors", "backbone": "inception_resnet_v1", "cut": "freeze6"},
    "curves": {
        "user": [
            {
                "fraction": f,
                "user_samples": n,
                "device_accuracy": {"mean": acc, "std": 0.01, "min": acc, "max": acc, "n": 2},
                "pretrain_accuracy": {"mean": 0.9, "std": 0.0, "min": 0.9, "max": 0.9, "n": 2},
                "vendor_spread": {"mean": 0.1234, "std": 0.0, "min": 0.1, "max": 0.2, "n": 2},
                "worst_vendor_accuracy": {"mean": acc - 0.1, "std": 0.0, "n": 2},
            }
            for f, n, acc in ((0.0, 0, 0.4321), (0.5, 256, 0.6543), (1.0, 512, 0.8765))
        ]
    },
}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    out = tmp_path / "results"
    write(out / "train-cpu.json", train_doc("cpu", {"freeze5": 1181.0, "freeze6": 2590.5}))
    write(out / "push.json", PUSH)
    write(out / "datafraction.json", DATAFRACTION)
    write(
        out / "pipeline.json",
        {
            "benchmark": "pipeline",
            "agents": {
                "agents_samples_s": 33_338.3,
                "raw_kafka_samples_s": 114_146.0,
                "throughput": {
                    "pairs": 5,
                    "ratio_median": 0.292,
                    "ratio_min": 0.25,
                    "ratio_max": 0.31,
                    "cold_ratio": 0.21,
                },
                "idle_trigger_latency_s": {"n": 100, "p50": 0.04, "p99": 0.06, "max": 0.07},
            },
            "update": {
                "warmup_jobs": 1,
                "update_latency_s": {"n": 20, "p50": 0.7714, "p99": None, "max": 1.2779},
            },
            "conditions": {"broker": {"source": "started by the bench"}},
        },
    )
    write(out / "fleet.json", {"benchmark": "fleet", "fanout_p99_s": 0.0421, "devices": 100_000})
    return out


def assert_says(markdown: str, *lines: str) -> None:
    """Every one of ``lines`` stands in ``markdown``; a failure names all that do not."""
    missing = [line for line in lines if line not in markdown]
    assert not missing, missing


def test_tables_carry_the_numbers_of_the_result_files(results: Path, tmp_path: Path) -> None:
    markdown, images = render(load_report(results), tmp_path / "docs")
    assert_says(
        markdown,
        # Table 1: ours beside the paper
        "| freeze6 | 512 | 41,870 | 2,590 | 0.0619 | 50% | — | — |",
        "| freeze5 | 1792 | 28,078 | 1,181 |",
        "no GPU lent",
        # Table 2: bytes, measured loopback, modelled tier, paper
        "| freeze6 | 512 | 10,608 | 0.844 ms | 8.75 ms | 109 ms | 1.5 s |",
        "| full | 55,000,123 | 140 ms | 111 s | 26 s |",
        "| full | float32 | 111,222,333 | 222 s | — |",
        # Figure 4 table
        "| 0% | 0 | 0.432 ± 0.01 |",
        "| 100% | 512 | 0.876 ± 0.01 |",
        "| 100% | 0.123 (worst 0.776) |",
        # pipeline and fleet
        "agents 33,338 vs raw 114,146 samples/s (medians): **ratio 0.292**",
        "(median of 5 interleaved pairs, 0.25–0.31); warm-up pair 0.21",
        "broker started by the bench",
        "p50 0.04 s, p99 0.06 s, max 0.07 s (n=100)",
        # a p99 over 20 values is never printed: the max stands in, and says so
        "p50 0.771 s, max 1.28 s (n=20: too few for a p99, the max is given)",
        "fanout_p99_s = 0.0421",
        "| `devices` | 100,000 |",
        # provenance: timestamp, cores, load
        "| push | ok | 2026-01-02T03:04:05Z | — | box, 2 cores | 0.25, 0.5, 0.75 |",
    )
    assert {p.name for p in images} == {"train.png", "push.png", "datafraction.png"}
    for path in images:
        assert path.read_bytes()[:8] == PNG


def test_missing_and_failed_benches_are_reported_with_the_reason(
    results: Path, tmp_path: Path
) -> None:
    (results / "push.json").unlink()
    record_runs(
        results,
        [
            bench_report.RunOutcome(
                "push", "failed", 3.0, 1, "fedex bench push", "exit code 1: KafkaUnavailableError"
            ),
            bench_report.RunOutcome(
                "datafraction", "failed", 9.0, 1, "fedex bench datafraction", "exit code 1: boom"
            ),
        ],
    )
    markdown, images = render(load_report(results), tmp_path / "docs")
    assert_says(
        markdown,
        "**Missing** — the last run failed: exit code 1: KafkaUnavailableError.",
        "**Missing** — no codec.json: run `fedex bench codec`.",
        "**Missing** — no fedavg.json: run `fedex bench fedavg`.",
        # A failed rerun does not hide the older result, and does not pass it off as fresh.
        "The last run of `fedex bench datafraction --scale 0.1 --seeds 2` failed "
        "(exit code 1: boom)",
        "| 100% | 512 | 0.876 ± 0.01 |",
        "fleet density | **missing** — fleet.json has no fleet density field",
    )
    assert "| freeze6 | 512 | 10,608 |" not in markdown
    assert "push.png" not in {p.name for p in images}


def test_a_cuda_result_fills_the_gpu_columns(results: Path, tmp_path: Path) -> None:
    write(results / "train-nvidia-h200.json", train_doc("cuda:0", {"freeze6": 4_186_968.0}))
    markdown, _ = render(load_report(results), tmp_path / "docs")
    assert "| freeze6 | 512 | 41,870 | 2,590 | 0.0619 | 50% | 4,186,968 | 100 |" in markdown
    assert "GPU: NVIDIA H200" in markdown and "no GPU lent" not in markdown


def test_render_only_runs_nothing_and_writes_the_document(
    results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("render-only ran a bench")

    monkeypatch.setattr(bench_report, "run_bench", must_not_run)
    docs = tmp_path / "docs"
    path, _, outcomes = run_report(
        results_dir=results, docs_dir=docs, log_dir=tmp_path / "logs", render_only=True
    )
    assert outcomes == [] and path == docs / "benchmarks.md"
    assert path.read_text().startswith("# Benchmarks")
    assert (docs / "img" / "datafraction.png").read_bytes()[:8] == PNG
    again, _ = render_report(results, docs)
    assert again == path


def test_plan_honours_only_and_skip_and_rejects_unknown_names() -> None:
    assert plan() == [n for n in BENCHES if not n.endswith("-paper")]
    assert "datafraction-paper" in BENCHES  # an hour on this CPU: run only when named
    assert plan(only=["datafraction-paper"]) == ["datafraction-paper"]
    assert plan(only=["push", "codec"]) == ["codec", "push"]
    assert plan(skip=["fleet", "fedavg", "train", "chaos"]) == [
        "codec",
        "kafka",
        "pipeline",
        "push",
        "datafraction",
        "expansion",
        "paper-job",
    ]
    with pytest.raises(ValueError, match="nope"):
        plan(only=["nope"])
    with pytest.raises(ValueError, match="typo"):
        plan(skip=["typo"])


def test_failure_reason_names_what_happened_and_the_last_words() -> None:
    assert failure_reason(2, "Traceback\n  ...\nValueError: bad\n\n", False) == (
        "exit code 2: ValueError: bad"
    )
    assert failure_reason(None, "", True) == "timed out"
    assert failure_reason(-9, "", False) == "killed by signal 9"


def test_record_runs_merges_with_earlier_runs(tmp_path: Path) -> None:
    first = bench_report.RunOutcome("codec", "ok", 1.0, 0, "fedex bench codec")
    second = bench_report.RunOutcome("push", "failed", 2.0, 1, "fedex bench push", "x")
    record_runs(tmp_path, [first])
    path = record_runs(tmp_path, [second])
    runs = json.loads(path.read_text())["runs"]
    assert set(runs) == {"codec", "push"} and runs["push"]["reason"] == "x"


def test_bench_argv_runs_each_bench_as_its_own_fedex_process(tmp_path: Path) -> None:
    out = tmp_path / "train-cpu.json"
    argv = bench_report.bench_argv("train", out=out, python="py")
    assert argv == ["py", "-m", "pipeline", "bench", "train", "--device", "cpu", "--out", str(out)]
    argv = bench_report.bench_argv("datafraction", out=None, docs_dir=tmp_path, python="py")
    assert argv[-2:] == ["--plot", str(tmp_path / "img" / "datafraction.png")]
    # The paper-size entry runs the same bench with its own arguments and plot.
    argv = bench_report.bench_argv("datafraction-paper", out=out, docs_dir=tmp_path, python="py")
    assert argv[:8] == [
        "py",
        "-m",
        "pipeline",
        "bench",
        "datafraction",
        "--scale",
        "paper",
        "--seeds",
    ]
    assert argv[-4:] == [
        "--plot",
        str(tmp_path / "img" / "datafraction-paper.png"),
        "--out",
        str(out),
    ]


FLEET = {
    "benchmark": "fleet",
    "one_process": {
        "devices": 10_000,
        "rss_peak_mb": 851.75,
        "loop_lag_ms": {"p99": 7.94, "n": 1500},
        "rss_steady_mb": 700.5,
        "sustained": {"pushes_s": 69.7, "samples_s": 2826.4},
    },
    "multi_process": {
        "devices": 100_000,
        "processes": 10,
        "rss_total_mb": 8911.2,
        "rss_max_mb": 898.6,
        "loop_lag_p99_max_ms": 50.1,
        "sustained": {"pushes_s": 1269.5, "samples_s": 51_015.2},
    },
    "fanout": {
        "devices": 10_000,
        "updates": 5,
        "source": "inline",
        "checkpoint_bytes": 33_024,
        "transfer": "network tiers",
        "per_device_from_ack_s": {"n": 200_000, "p50": 0.21, "p99": 1.42, "max": 3.1},
        "fanout_from_ack_s": {"n": 20, "p50": 1.38, "p99": None, "max": 1.5},
    },
}


def _ratio(median: float, low: float, high: float, n: int = 3) -> dict[str, float | int]:
    return {"median": median, "min": low, "max": high, "n": n}


_FEDAVG_ARM = {
    "reached": 3,
    "of": 3,
    "rounds": _ratio(40, 30, 55),
    "bytes_per_device": _ratio(2_500_000.0, 1_900_000.0, 3_400_000.0),
    "bytes_ratio": _ratio(37.5, 28.0, 51.0),
    "wall_ratio": _ratio(3.2, 2.5, 4.1),
    "unreached_ratio_lower_bounds": [],
}
FEDAVG = {
    "benchmark": "fedavg",
    "task": {
        "devices": 150,
        "samples_per_device": 32,
        "num_classes": 48,
        "backbone": "inception_resnet_v1",
        "cut": "freeze6",
        "data": "fresh draws",
        "evaluation": "real held-out rows",
        "distinct": [{"sample_copies": 0, "validation_in_trained": 0, "test_in_trained": 0}] * 3,
    },
    "trainer_settings": {"val_device_fraction": 0.1, "val_fraction": 0.1, "promote_margin": 0.005},
    "seeds": [
        {
            "seed": 0,
            "fedex": {"accuracy": 0.91, "bytes_per_device": {"mean": 66_600.0}},
            "fedavg": {
                "float32": {
                    "final_download_bytes": 33_000,
                    "curve": [
                        {"round": 0, "accuracy": 0.5, "bytes_per_device": 0.0},
                        {"round": 40, "accuracy": 0.905, "bytes_per_device": 2_500_000.0},
                    ],
                }
            },
        }
    ],
    "summary": {
        "seeds": 3,
        "base_accuracy": _ratio(0.4381, 0.41, 0.45),
        "fedex": {
            "accuracy": _ratio(0.91, 0.9, 0.93),
            "vendor_spread": _ratio(0.08, 0.05, 0.1),
            "worst_vendor_accuracy": _ratio(0.86, 0.85, 0.88),
            "bytes_per_device": _ratio(66_600.0, 66_600.0, 66_600.0),
            "wall_seconds": _ratio(4.2, 3.9, 5.0),
        },
        "fedavg": {
            "float32": {
                "final_accuracy": _ratio(0.912, 0.905, 0.93),
                "vendor_spread": _ratio(0.09, 0.06, 0.12),
                "worst_vendor_accuracy": _ratio(0.85, 0.84, 0.87),
                "rounds": _ratio(40, 30, 55),
            }
        },
        "targets": [
            {
                "name": "0.95",
                "kind": "absolute",
                "accuracy": _ratio(0.95, 0.95, 0.95),
                "fedex_reached": 0,
                "fedavg": {"float32": {**_FEDAVG_ARM, "reached": 0, "of": 0}},
            },
            {
                "name": "FedEx's accuracy",
                "kind": "fedex",
                "accuracy": _ratio(0.91, 0.9, 0.93),
                "fedex_reached": 3,
                "fedavg": {"float32": _FEDAVG_ARM},
            },
        ],
    },
    "headline": {
        "dtype": "float32",
        "bytes_ratio": 37.5,
        "bytes_ratio_min": 28.0,
        "bytes_ratio_max": 51.0,
        "reached": 3,
        "of": 3,
    },
    "bytes_ratio_fedavg_over_fedex": 37.5,
    "target_ratio": 20.0,
    "meets_target": True,
}


def test_fleet_and_fedavg_tables_and_plot(results: Path, tmp_path: Path) -> None:
    write(results / "fleet.json", FLEET)
    write(results / "fedavg.json", FEDAVG)
    markdown, images = render(load_report(results), tmp_path / "docs")
    assert (
        "| one process | 10,000 | 1 | 851.8 | 700.5 | 851.8 | 7.94 ms (n=1,500) | 69.7 | 2,826 |"
        in markdown
    )
    assert (
        "| many processes | 100,000 | 10 | 898.6 | — | 8,911 | 50.1 ms | 1,270 | 51,015 |"
        in markdown
    )
    assert "Per device, broker ack → head swapped: p50 0.21 s, p99 1.42 s, max 3.1 s" in markdown
    assert "(n=200,000)" in markdown
    assert "per version: p50 1.38 s, max 1.5 s (n=20: too few for a p99" in markdown
    assert "10,000 devices in one process at 851.8 MB peak RSS (87.2 KB/device)" in markdown
    assert "freshness | **missing** — fleet.json has no freshness field" in markdown
    assert (
        "| FedEx | 0.91 (0.9–0.93) | 0.08 (0.05–0.1) | 0.86 (0.85–0.88) | 1 | 66,600 | "
        "4.2 (3.9–5) |" in markdown
    )
    assert "| FedAvg float32 | 0.912 (0.905–0.93) | 0.09 (0.06–0.12) |" in markdown
    assert (
        "| FedEx's accuracy | 0.91 (0.9–0.93) | 3/3 | float32 | 3/3 | 40 (30–55) | "
        "2,500,000 (1,900,000–3,400,000) | 37.5 (28–51) | 3.2 (2.5–4.1) | — |" in markdown
    )
    assert "| 0.95 | 0.95 | 0/3 | float32 | 0/0 |" in markdown
    assert "FedAvg float32 / FedEx: **37.5 (28–51)** (median, min–max over the 3 of 3" in markdown
    assert "reached it; target ≥ 20: met)." in markdown
    assert (
        "copies of a trained vector among the samples" in markdown
        and ": 0 over 3 seeds" in markdown
    )
    fedavg_png = tmp_path / "docs" / "img" / "fedavg.png"
    assert fedavg_png in images and fedavg_png.read_bytes()[:8] == PNG
