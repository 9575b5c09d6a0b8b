"""``fedex bench fedavg``: FedEx and the FedAvg baseline side by side on one broker.

Same task for both arms, per seed: the real bank of the default world (rendered faces
through the pretrained backbone, :func:`lab.bench_banks.load_bank`), one model, its
base head ``v0`` (:func:`device_sim.heads.train_base_head`), the same devices (vendors and
identities from :meth:`World.device_profile`), and the same ``samples`` local samples per
device. Those samples are **fresh draws** (:class:`device_sim.fresh.FreshFeatures`: the
device's cell centre, fitted on the bank's train rows, plus its own within-cell variation):
every sample is a distinct observation, never a copy of another, so the trainer's
validation split holds no copy of a trained vector. Evaluation is the mean over devices of
each device's accuracy on the bank's *real* held-out rows of its vendor and identities
(never fitted, pushed or trained on); :func:`lab.fedavg_report.distinct_report` checks it
and the result records the check.

- **FedEx**: every device pushes its samples once (a float16 feature push); the real cloud
  loop trains the head: ``fedex worker`` and ``fedex trainer`` run as supervised children
  (as ``fedex up`` and the demo run them), the agents fire one trigger covering every
  push, the trainer trains from ``v0`` with this bench's recipe and the product's
  validation settings (whole validation devices, a share of the other samples, the
  promotion margin; recorded in ``trainer_settings``) and publishes ``v1``. Devices
  download the checkpoint blob. Devices never train.
- **FedAvg**, once per transfer precision (fp32 and fp16 by default, on the same seed):
  ``python -m lab.fedavg_server`` runs as a child process; the devices (this process,
  :class:`lab.fedavg_devices.FedAvgFleet`) train E local epochs per round when selected, on
  exactly the samples they pushed in the FedEx arm. Rounds run until the mean device
  accuracy reaches the FedEx arm's (or a cap).

Each seed's FedAvg curve gives the cost of reaching fixed targets
(:func:`lab.fedavg_report.targets_for`); the seeds give median and min–max of the ratios.
Bytes are real encoded message sizes. Wall times start when the cloud side is ready (the
children's consumer groups exist; the first broadcast arrived) and exclude the harness's
own accuracy measurements. This module runs the seeds and summarizes them; the task is
:mod:`lab.fedavg_task`, the arms :mod:`lab.fedavg_fedex_arm` and :mod:`lab.fedavg_baseline_arm`
(what both share: :mod:`lab.fedavg_arm`). They are the device side and reach the trainer's
code only through child processes (apps never import each other).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from device_sim.bank import FeatureBank
from device_sim.heads import new_head, train_base_head
from device_sim.world import World
from lab.fedavg_arm import Arm, BenchConfig
from lab.fedavg_baseline_arm import run_fedavg_arm
from lab.fedavg_fedex_arm import run_fedex_arm
from lab.fedavg_report import cost_at, headline, summarize, targets_for
from lab.fedavg_task import Evaluator, Task, distinct_check, make_devices, validation_mask
from pipeline.records import FeatureDType
from pipeline.settings import Settings

#: The trainer settings the FedEx arm runs with (the product's defaults unless the
#: environment sets them), recorded in the result.
TRAINER_SETTINGS = (
    "val_fraction",
    "val_device_fraction",
    "val_max_samples",
    "replay_max_samples",
    "promote_margin",
    "train_swa_start",
    "checkpoint_dtype",
)


def with_costs(
    fedavg: dict[str, Any], targets: Sequence[Mapping[str, Any]], fedex: Mapping[str, Any]
) -> dict[str, Any]:
    """``fedavg`` with its cost of reaching each target (:func:`cost_at`), in order."""
    costs = [
        {
            "name": t["name"],
            "accuracy_needed": t["accuracy"],
            **cost_at(
                fedavg["curve"],
                t["accuracy"],
                final_download=fedavg["final_download_bytes"],
                fedex_bytes=fedex["bytes_per_device"]["mean"],
                fedex_wall=fedex["wall_seconds"],
            ),
        }
        for t in targets
    ]
    return {**fedavg, "costs": costs}


async def run_seed(
    settings: Settings, task: Task, cfg: BenchConfig, seed: int, console: Console
) -> dict[str, Any]:
    """One seed: its base head and fresh samples, the FedEx arm, then FedAvg at every
    precision until FedEx's accuracy; the targets and FedAvg's cost of each."""
    from pipeline.topics import ensure_topics, fedavg_topic_specs, topic_specs

    bank, model_id = task.bank, task.model_id
    base = train_base_head(bank, model_id, seed=seed)
    devices = make_devices(bank, task.world, model_id, cfg.devices, cfg.samples, seed)
    distinct = distinct_check(bank, devices, validation_mask(settings, model_id, devices))
    evaluate = Evaluator(bank, devices)
    base_accuracy = evaluate(base.state_dict)
    console.print(
        f"seed {seed}: {model_id}, {len(devices)} devices x {cfg.samples} fresh samples, "
        f"{bank.num_classes} classes; v0 accuracy {base_accuracy:.4f}; copies {distinct}",
        highlight=False,
    )
    prefix = f"{settings.topic_prefix}-fedavg-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="fedex-fedavg-bench-") as tmp:
        live = settings.model_copy(update={"topic_prefix": prefix, "home": Path(tmp)})
        # the bank stays in the real home; logs and checkpoints of this run in a temp one
        await ensure_topics(live.bootstrap, [*topic_specs(live), *fedavg_topic_specs(live)])
        arm = Arm(live, bank, devices, base.state_dict, model_id, cfg, seed, evaluate, console)
        try:
            fedex = await run_fedex_arm(arm)
            targets = targets_for(base_accuracy, fedex["accuracy"], cfg.targets, cfg.gain_targets)
            fedavg = {}
            for dtype in cfg.fedavg_dtypes:
                run = await run_fedavg_arm(
                    arm, fedex["accuracy"], workdir=Path(tmp), dtype=FeatureDType(dtype)
                )
                fedavg[dtype] = with_costs(run, targets, fedex)
        finally:
            kept = settings.log_dir / "fedavg-bench" / f"seed-{seed}"
            kept.mkdir(parents=True, exist_ok=True)
            for log in live.log_dir.glob("*.log"):
                shutil.copyfile(log, kept / log.name)
    return {
        "seed": seed,
        "base_accuracy": base_accuracy,
        "base_vendors": evaluate.vendors(base.state_dict),
        "distinct": distinct,
        "targets": targets,
        "fedex": fedex,
        "fedavg": fedavg,
        "logs": str(kept),
    }


def trainer_settings(settings: Settings) -> dict[str, Any]:
    """The trainer settings the FedEx arm ran with (:data:`TRAINER_SETTINGS`)."""
    return {name: getattr(settings, name) for name in TRAINER_SETTINGS}


def load_task(settings: Settings, cfg: BenchConfig) -> Task:
    """The real bank of ``cfg.world`` (built once into ``$FEDEX_HOME/banks`` through the
    pretrained backbone) and the model of the comparison."""
    from dataclasses import replace

    from lab.bench_banks import CONFIGS, load_bank

    bank = load_bank(cfg.world, settings.bank_dir, seed=cfg.world_seed, home=settings.home)
    world = World(replace(CONFIGS[cfg.world][0], seed=cfg.world_seed))
    return Task(bank, world, cfg.model_id or bank.model_ids[0])


async def run_side_by_side(
    settings: Settings, cfg: BenchConfig, console: Console, *, task: Task | None = None
) -> dict[str, Any]:
    """Every seed's both arms on the broker at ``settings.bootstrap`` (each seed's topics
    under a fresh prefix), and their summary."""
    task = task or load_task(settings, cfg)
    bank = task.bank
    seeds = []
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        seeds.append(await run_seed(settings, task, cfg, seed, console))
    summary = summarize(seeds, cfg.fedavg_dtypes)
    head = headline(summary)
    ratio = head["bytes_ratio"]
    return {
        "task": {
            "model_id": task.model_id,
            "devices": cfg.devices,
            "samples_per_device": cfg.samples,
            "num_classes": bank.num_classes,
            "backbone": bank.backbone.value,
            "cut": bank.cut.value,
            "bank": bank.path.name,
            "weights_sha256": bank.spec.get("weights_sha256"),
            "world": asdict(task.world.config),
            "head_parameters": _head_parameters(bank),
            "data": (
                "fresh draws (device_sim.fresh.FreshFeatures, fitted on the bank's train rows): "
                "every pushed sample a distinct observation; FedAvg's devices train on exactly "
                "the samples they pushed to FedEx"
            ),
            "evaluation": (
                "mean over devices of each device's accuracy on the bank's real held-out rows "
                "of its vendor and identities (never fitted, pushed or trained on); per vendor "
                "pooled over its rows"
            ),
            "distinct": [s["distinct"] for s in seeds],
        },
        "config": asdict(cfg),
        "trainer_settings": trainer_settings(settings),
        "seeds": seeds,
        "summary": summary,
        "headline": head,
        "bytes_ratio_fedavg_over_fedex": ratio,
        "target_ratio": 20.0,
        "meets_target": bool(ratio is not None and head["reached"] == head["of"] and ratio >= 20),
    }


def _head_parameters(bank: FeatureBank) -> int:
    head = new_head(bank.backbone, bank.cut, bank.num_classes)
    return int(sum(p.numel() for p in head.state_dict().values() if p.is_floating_point()))


def run_bench(
    settings: Settings, cfg: BenchConfig, out: Path | None = None, *, keep: bool = False
) -> Path:
    """The command: a broker (:func:`lab.bench_broker.bench_kafka`: its topics deleted
    after), both arms for every seed, the tables and the JSON."""
    from lab.bench_broker import bench_kafka
    from lab.benchio import write_result
    from lab.fedavg_report import print_report

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # the target table's ranges, unwrapped in a log
    started = time.perf_counter()

    async def run() -> dict[str, Any]:
        async with bench_kafka(settings, keep=keep) as bootstrap:
            live = settings.model_copy(update={"kafka_bootstrap": bootstrap})
            return await run_side_by_side(live, cfg, console)

    result = asyncio.run(run())
    result["seconds"] = round(time.perf_counter() - started, 1)
    print_report(result, console)
    path = write_result("fedavg", result, out)
    console.print(f"wrote {path}")
    return path
