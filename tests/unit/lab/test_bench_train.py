"""``fedex bench train`` end to end on one level, for a fraction of a second."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from lab.train_bench import PAPER_TABLE1_IMG_PER_S, run_train_bench
from pipeline.records import Cut

#: The run's knobs, echoed by its report.
CLASSES, BATCH, ROUNDS, MIN_STEPS = 1000, 64, 2, 2


def test_one_level_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    report = run_train_bench(
        device="cpu",
        levels=[Cut.FREEZE6],
        num_classes=CLASSES,
        batch_size=BATCH,
        seconds_per_level=0.2,
        rounds=ROUNDS,
        min_steps=MIN_STEPS,
        peak_seconds=0.2,
        out=out,
        console=Console(file=open(tmp_path / "log.txt", "w"), width=160),  # noqa: SIM115
    )
    assert json.loads(out.read_text()) == report
    env = report["environment"]
    assert {"torch", "device", "device_name", "threads", "python"} <= set(env)
    assert env["device"] == "cpu"
    assert env["threads"] >= 1
    assert report["peak"]["dtype"] == "fp32"
    (level,) = report["levels"]
    assert level["level"] == "freeze6"
    assert level["feature_shape"] == [512]
    assert level["batch_size"] == BATCH
    assert level["rounds"] == ROUNDS
    assert level["steps"] >= MIN_STEPS * ROUNDS
    assert level["samples_per_s_min"] <= level["samples_per_s"] <= level["samples_per_s_max"]
    assert level["paper_img_per_s"] == PAPER_TABLE1_IMG_PER_S[Cut.FREEZE6]
    assert level["head_params"] == 512 * CLASSES + CLASSES
    # exact: forward and weight gradient of one Linear; the features need no gradient
    assert level["flops_per_sample"] == 2 * 2 * 512 * CLASSES
    assert level["convention_flops_per_sample"] == 3 * 2 * 512 * CLASSES
    achieved = level["flops_per_sample"] * level["samples_per_s"]
    # judged against the best ceiling window of the run, measured between the rounds
    assert level["peak_flops_per_s"] == report["peak"]["flops_per_s"]
    assert level["utilisation"] == achieved / level["peak_flops_per_s"]
    assert report["peak"]["windows"] == 1 + 2 + 1
    conditions = report["conditions"]
    assert conditions["loadavg_before"] is not None
    assert conditions["machine"]["cores"] >= 1
    assert conditions["commit"]
    assert "freeze6" in (tmp_path / "log.txt").read_text()


def test_the_module_imports_no_kafka_stack() -> None:
    code = (
        "import sys, lab.train_bench, trainer.recipe, pipeline.zoo, pipeline.checkpoints\n"
        "bad = {'pydantic', 'pydantic_settings', 'faust', 'aiokafka', 'orjson'} & "
        "{m.split('.')[0] for m in sys.modules}\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
