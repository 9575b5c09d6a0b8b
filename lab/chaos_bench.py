"""``fedex bench chaos``: the exactly-once audit under load and faults, and its speed.

Scenarios (each run on a fresh broker of its own, see :mod:`lab.chaos`):

- ``age``: 4 models × 20 devices, 10-sample pushes at 25 pushes/s for 150 s, age triggers
  every 2 s, no fault: the lost update between agents needed no fault at all.
- ``kill``: a 1,000-device fleet (``fedex devices``) on 2 models for 120 s, the broker
  SIGKILLed for 37 s in the middle.
- ``full``: the fleet for 180 s with a 37-s broker kill, a 20-s broker pause, a trainer
  kill and a worker kill.

Each run ends with the audit of the settled system; the bench reports per run whether it
was clean, what it found, the restarts and the outage lines. ``audit``: the audit's own
speed on a synthetic deployment of ``--audit-samples`` samples (pushes, triggers and
versions consistent by construction), so its cost on a real log can be judged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lab.benchio import write_result
from lab.chaos import (
    ChaosConfig,
    ChaosRun,
    Fault,
    FaultKind,
    model_ids,
    racing_settings,
    random_push,
)
from pipeline import codec
from pipeline.audit_log import audit_deployment
from pipeline.kafka_local import LocalKafka, free_port
from pipeline.records import (
    Backbone,
    Cut,
    FeaturePush,
    ModelMetrics,
    ModelUpdate,
    OffsetRange,
    TrainingTrigger,
    TriggerReason,
)
from pipeline.samples import ValidationRule
from pipeline.settings import Settings
from pipeline.tables import print_table
from pipeline.topics import Topics, ensure_topics, topic_specs

log = logging.getLogger(__name__)

SCENARIOS = ("age", "kill", "full")
#: The policy settings a result file records.
SETTINGS_SHOWN = (
    "min_samples",
    "age_floor_samples",
    "max_age_s",
    "agent_tick_s",
    "job_timeout_s",
    "train_epochs",
    "features_partitions",
)


def bench_settings(settings: Settings) -> Settings:
    """Age triggers only (:func:`lab.chaos.racing_settings`), a job's timeout 30 s."""
    return racing_settings(settings, min_samples=1_000_000, job_timeout_s=30.0)


def scenario(name: str, libs_dir: Path | None) -> ChaosConfig:
    if name == "age":
        return ChaosConfig(
            models=4, devices_per_model=20, push_rate=25.0, duration_s=150.0, libs_dir=libs_dir
        )
    if name == "kill":
        return ChaosConfig(
            models=2,
            fleet_devices=1_000,
            duration_s=120.0,
            faults=(Fault(FaultKind.KILL_BROKER, 40.0, 37.0),),
            settle_timeout_s=180.0,
            libs_dir=libs_dir,
            backbone=Backbone.INCEPTION_RESNET_V1,
        )
    if name == "full":
        return ChaosConfig(
            models=2,
            fleet_devices=1_000,
            duration_s=180.0,
            faults=(
                Fault(FaultKind.KILL_TRAINER, 25.0),
                Fault(FaultKind.KILL_BROKER, 40.0, 37.0),
                Fault(FaultKind.KILL_WORKER, 95.0),
                Fault(FaultKind.PAUSE_BROKER, 120.0, 20.0),
            ),
            settle_timeout_s=180.0,
            libs_dir=libs_dir,
            backbone=Backbone.INCEPTION_RESNET_V1,
        )
    raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")


def _outage_lines(log_dir: Path) -> dict[str, dict[str, int]]:
    out = {}
    for path in sorted(log_dir.glob("*.log")):
        text = path.read_text(errors="replace")
        out[path.stem] = {
            "lines": text.count("\n"),
            "lost": text.count("Kafka unreachable"),
            "back": text.count("Kafka back after"),
            "errors": text.count(" ERROR "),
        }
    return out


async def run_scenario(
    settings: Settings, name: str, index: int, libs_dir: Path | None
) -> dict[str, Any]:
    config = scenario(name, libs_dir)
    run_settings = bench_settings(settings).model_copy(
        update={"topic_prefix": f"chaos-{name}-{index}-{uuid.uuid4().hex[:6]}"}
    )
    run = ChaosRun(run_settings, config, on_event=lambda m: print(f"  {name}#{index + 1} {m}"))
    result = await run.run()
    doc = result.to_json()
    doc["scenario"] = name
    doc["logs"] = _outage_lines(run.log_dir)
    models = doc["audit"]["models"]
    doc["summary"] = {
        "pushes": sum(m["pushes"] for m in models),
        "samples": sum(m["samples"] for m in models),
        "distinct": sum(m["distinct"] for m in models),
        "copies": sum(m["copies"] for m in models),
        "trained_samples": sum(m["trained_samples"] for m in models),
        "versions": sum(m["versions"] for m in models),
        "orphaned_samples": sum(m["orphaned_samples"] for m in models),
        "violations": len(doc["audit"]["violations"]),
    }
    return doc


# --------------------------------------------------------------------------- audit speed


async def measure_audit(
    settings: Settings, samples: int, libs_dir: Path | None, *, models: int = 4
) -> dict[str, Any]:
    """Audit time of a deployment holding ``samples`` samples in 10-sample pushes: the
    pushes of each model split into triggers of ~5,000 samples, each answered by a
    version with the train/val counts a trainer reports."""
    home = settings.home.resolve()
    kafka = LocalKafka(
        work_dir=home / "chaos-kafka", libs_dir=libs_dir, port=free_port(), heap="512m"
    )
    shutil.rmtree(kafka.data_dir, ignore_errors=True)
    await kafka.start()
    try:
        live = settings.model_copy(
            update={
                "kafka_bootstrap": kafka.bootstrap,
                "topic_prefix": f"audit-{uuid.uuid4().hex[:6]}",
                "features_partitions": 4,
                "models_partitions": 4,
                "triggers_partitions": 4,
            }
        )
        await ensure_topics(live.bootstrap, topic_specs(live))
        produce_s = await _fill(live, samples, models)
        report, audit_s = await audit_deployment(live)
    finally:
        await kafka.stop()
        shutil.rmtree(kafka.data_dir, ignore_errors=True)
    return {
        "samples": samples,
        "pushes": report.feature_records,
        "models": models,
        "triggers": report.triggers,
        "updates": report.updates,
        "clean": report.clean,
        "violations": [v.kind for v in report.violations][:10],
        "produce_seconds": round(produce_s, 2),
        "audit_seconds": round(audit_s, 2),
        "samples_per_s": round(samples / audit_s),
    }


def _template_push(model_id: str, *, seed: int) -> FeaturePush:
    """The push every synthetic push of ``model_id`` copies, with its own device and ids."""
    return random_push(
        model_id,
        "dev-00000",
        0,
        10,
        backbone=Backbone.INCEPTION_RESNET_V1,
        num_classes=100,
        seed=seed,
        timestamp_ms=0,
    )


async def _fill(settings: Settings, samples: int, models: int) -> float:
    from pipeline.clients import make_producer
    from pipeline.publishing import publish_update

    topics = Topics(settings.topic_prefix)
    producer = make_producer(bootstrap=settings.bootstrap, client_id="audit-bench", linger_ms=20)
    await producer.start()
    started = time.perf_counter()
    try:
        names = model_ids(models)
        per_model = samples // models
        template = {m: _template_push(m, seed=i) for i, m in enumerate(names)}
        for m in names:
            await publish_update(producer, topics.models, _update(m, "v0", None, (), 0, 0))
        for model_id in names:
            base = template[model_id]
            keys: list[tuple[str, int]] = []
            positions: list[tuple[int, int]] = []
            seq = 0
            futures = []
            for i in range(per_model // 10):
                device, first = i % 1000, (i // 1000) * 10
                push = dataclasses.replace(
                    base,
                    device_id=f"dev-{device:05d}",
                    sample_ids=np.arange(first, first + 10, dtype=np.uint64),
                )
                futures.append(
                    await producer.send(
                        topics.features, codec.encode_push(push), key=codec.encode_key(model_id)
                    )
                )
                keys += [(push.device_id, first + k) for k in range(10)]
                if len(futures) == 500 or i == per_model // 10 - 1:
                    metas = await asyncio.gather(*futures)
                    positions += [(meta.partition, meta.offset) for meta in metas]
                    futures = []
                    seq += 1
                    await _answer(producer, topics, model_id, seq, positions, keys, settings)
                    keys, positions = [], []
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def _answer(
    producer: Any,
    topics: Topics,
    model_id: str,
    seq: int,
    positions: Sequence[tuple[int, int]],
    keys: Sequence[tuple[str, int]],
    settings: Settings,
) -> None:
    from pipeline.publishing import publish_update

    [partition] = {p for p, _ in positions}
    ranges = (
        OffsetRange(partition, min(o for _, o in positions), max(o for _, o in positions) + 1),
    )
    trigger = TrainingTrigger(
        model_id, f"{model_id}:{seq}", ranges, len(keys), TriggerReason.AGE, "v0", 1
    )
    await producer.send_and_wait(
        topics.triggers, codec.encode_trigger(trigger), key=codec.encode_key(model_id)
    )
    rule = ValidationRule(settings.val_fraction, settings.val_device_fraction)
    val = int(rule.mask(model_id, keys).sum())
    update = _update(model_id, f"v{seq}", trigger.trigger_id, ranges, len(keys) - val, val)
    await publish_update(producer, topics.models, update)


def _update(
    model_id: str,
    version: str,
    trigger_id: str | None,
    ranges: tuple[OffsetRange, ...],
    train: int,
    val: int,
) -> ModelUpdate:
    return ModelUpdate(
        model_id=model_id,
        version=version,
        parent_version=None,
        trigger_id=trigger_id,
        backbone=Backbone.INCEPTION_RESNET_V1,
        cut=Cut.FREEZE6,
        num_classes=100,
        checkpoint_uri="http://127.0.0.1:8080/unused",
        sha256="0" * 64,
        size=0,
        encoding="safetensors-fp16",
        metrics=ModelMetrics(0.0, None, train, val, 0.0, 1),
        is_best=True,
        trigger_ranges=ranges,
    )


# --------------------------------------------------------------------------- the bench


def _commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def run_chaos_bench(
    *,
    scenarios: Sequence[str],
    runs: int,
    audit_samples: int,
    out: Path | None,
    libs_dir: Path | None = None,
) -> Path:
    settings = Settings()
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # the devices' retries
    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    for name in scenarios:
        results[name] = [
            asyncio.run(run_scenario(settings, name, i, libs_dir)) for i in range(runs)
        ]
    audit = asyncio.run(measure_audit(settings, audit_samples, libs_dir)) if audit_samples else None
    rows = []
    for name, docs in results.items():
        for i, doc in enumerate(docs):
            s = doc["summary"]
            rows.append(
                [
                    f"{name} #{i + 1}",
                    "clean" if doc["clean"] else f"{s['violations']} violations",
                    "yes" if doc["settled"] else "NO",
                    s["pushes"],
                    s["distinct"],
                    s["copies"],
                    s["trained_samples"],
                    s["versions"],
                    ", ".join(f"{k} {v}" for k, v in doc["restarts"].items()),
                    doc["wall_seconds"],
                ]
            )
    print_table(
        "fedex bench chaos: the audit after each run",
        ["run", "audit", "settled", "pushes", "samples", "copies", "trained", "versions",
         "restarts", "wall s"],
        rows,
    )  # fmt: skip
    if audit is not None:
        print_table(
            "audit speed (synthetic deployment)",
            ["samples", "pushes", "triggers", "audit s", "samples/s", "clean"],
            [[audit["samples"], audit["pushes"], audit["triggers"], audit["audit_seconds"],
              audit["samples_per_s"], audit["clean"]]],
        )  # fmt: skip
    return write_result(
        "chaos",
        {
            "command": " ".join(["fedex", "bench", "chaos", *sys.argv[3:]]),
            **_commit(),
            "settings": {k: bench_settings(settings).model_dump()[k] for k in SETTINGS_SHOWN},
            "scenarios": results,
            "audit_speed": audit,
            "wall_seconds": round(time.perf_counter() - started, 1),
        },
        out,
    )
