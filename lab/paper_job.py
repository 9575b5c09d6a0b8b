"""``fedex bench paper-job``: one training job of the paper's size through the real pipeline.

The paper trains its classifier on 437,855 additional features of 8,631 identities for 10
epochs in 231 s on a Titan Xp. Here the same job goes the product's way: the expanded
world's device features (:func:`lab.bench_banks.expanded_bank`, ``--scale 1`` is the
paper's size) are pushed to the feature topic as devices' ``FeaturePush`` records, one
trigger names their offset ranges, a real :class:`~trainer.worker.Trainer` reads the log,
trains from ``v0`` and publishes the version, and a registry follower sees it. Measured:

- **produce**: pushing every record to the broker (acknowledged);
- **data path**: a cold read of the job's ranges from the log into a fresh cache (fetch,
  decode, validate, first-copy dedupe) and the selection of the job's dataset, timed apart
  on a second reader so the trainer's own numbers are untouched;
- **job**: trigger acknowledged → version seen by the follower, and the trainer's own
  training seconds (``train_seconds``: the epochs alone) inside it;
- the version's accuracy on the world's held-out device features, against ``v0``.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from device_sim.bank import FeatureBank
from device_sim.heads import head_accuracy, new_head, train_base_head
from lab.bench_banks import expanded_bank, load_bank
from lab.feature_pushes import feature_push
from lab.update_latency import followed_trainer
from pipeline import codec
from pipeline.checkpoints import LocalCheckpointStore, checkpoint_uri, decode_checkpoint
from pipeline.clients import make_producer
from pipeline.publishing import register_model
from pipeline.records import FeaturePush, ModelUpdate, TrainingTrigger, TriggerReason
from pipeline.settings import Settings
from pipeline.topics import Topics, ensure_topics, topic_specs
from pipeline.zoo import load_head_state
from trainer.dataset import offset_ranges
from trainer.feature_log import FeatureLog

#: Samples per push (a device's push_max).
PER_PUSH = 64
MODEL_ID = "paper"


def pushes_of(bank: FeatureBank, rows: np.ndarray, model_id: str) -> list[FeaturePush]:
    """The rows as pushes of :data:`PER_PUSH` samples, one pseudo-device each."""
    now = int(time.time() * 1000)
    out = []
    for k, start in enumerate(range(0, rows.size, PER_PUSH)):
        chunk = rows[start : start + PER_PUSH]
        x, y = bank.take(chunk)
        out.append(
            feature_push(
                model_id,
                f"paper-dev{k:06d}",
                backbone=bank.backbone,
                cut=bank.cut,
                sample_ids=np.arange(chunk.size),
                labels=y,
                features=x,
                timestamp_ms=now,
            )
        )
    return out


async def run_paper_job(
    settings: Settings,
    *,
    scale: float,
    epochs: int = 10,
    device: str = "auto",
    config: str = "default",
) -> dict[str, Any]:
    """The job at ``scale`` of the paper on the broker of ``settings`` (see the module),
    its world fitted on the real bank of ``config``."""
    real = await asyncio.to_thread(load_bank, config, settings.bank_dir, home=settings.home)
    bank, _ = await asyncio.to_thread(expanded_bank, real, scale)
    model_id = bank.model_ids[0]
    rows = bank.select(model_id, domains=list(bank.vendor_domains), holdout=False)
    base = await asyncio.to_thread(train_base_head, bank, model_id, epochs=epochs)
    with tempfile.TemporaryDirectory(prefix="fedex-paper-job-") as home:
        live = settings.model_copy(
            update={
                "topic_prefix": f"bench-paper-{uuid.uuid4().hex[:8]}",
                "home": Path(home),
                "train_epochs": epochs,
                "replay_max_samples": 0,
            }
        )
        result = await _run(live, bank, rows, base.state_dict, device)
    held = bank.select(model_id, domains=list(bank.vendor_domains), holdout=True)
    head = new_head(bank.backbone, bank.cut, bank.num_classes)
    load_head_state(head, result.pop("state_dict"))
    return {
        "scale": scale,
        "identities": bank.num_classes,
        "pushed_samples": int(rows.size),
        "pushes": -(-int(rows.size) // PER_PUSH),
        "epochs": epochs,
        "device": device,
        "fitted_on": real.path.name,
        "v0_device_accuracy": base.device_accuracy,
        "version_device_accuracy": head_accuracy(head, *bank.take(held)),
        "device_holdout_rows": int(held.size),
        **result,
    }


async def _run(
    settings: Settings,
    bank: FeatureBank,
    rows: np.ndarray,
    v0_state: dict[str, Any],
    device: str,
) -> dict[str, Any]:
    topics = Topics(settings.topic_prefix)
    await ensure_topics(settings.bootstrap, topic_specs(settings))
    store = LocalCheckpointStore(settings.checkpoint_dir)
    await register_model(
        settings,
        MODEL_ID,
        bank.backbone,
        bank.cut,
        bank.num_classes,
        head_state=v0_state,
        store=store,
    )
    pushes = await asyncio.to_thread(pushes_of, bank, rows, MODEL_ID)
    producer = make_producer(
        bootstrap=settings.bootstrap, linger_ms=20, max_request_size=settings.max_push_bytes * 2
    )
    arrived: asyncio.Future[ModelUpdate] = asyncio.get_running_loop().create_future()

    def on_update(update: ModelUpdate) -> None:
        if update.version != "v0" and not arrived.done():
            arrived.set_result(update)

    await producer.start()
    try:
        started = time.perf_counter()
        key = codec.encode_key(MODEL_ID)
        sent = [await producer.send(topics.features, codec.encode_push(p), key=key) for p in pushes]
        metas = await asyncio.gather(*sent)
        produce_s = time.perf_counter() - started
        ranges = tuple(offset_ranges([(m.partition, m.offset) for m in metas]))
        data_path = await _cold_read(settings, topics, bank, ranges)
        trigger = TrainingTrigger(
            model_id=MODEL_ID,
            trigger_id=f"{MODEL_ID}:1",
            ranges=ranges,
            sample_count=int(rows.size),
            reason=TriggerReason.MANUAL,
            base_version="v0",
        )
        async with followed_trainer(
            settings, device=device, store=store, on_update=on_update
        ) as trainer:
            running = asyncio.create_task(trainer.run(max_jobs=1, idle_timeout=7200))
            await producer.send_and_wait(topics.triggers, codec.encode_trigger(trigger), key=key)
            sent_at = time.perf_counter()
            update = await asyncio.wait_for(arrived, 7200)
            job_s = time.perf_counter() - sent_at
            await asyncio.wait_for(running, 120)
            report = trainer.jobs[-1]
    finally:
        await producer.stop()
    blob = update.checkpoint or store.get(checkpoint_uri(MODEL_ID, update.version))
    state, _ = decode_checkpoint(blob, expected_sha256=update.sha256)
    return {
        "produce_s": round(produce_s, 2),
        "data_path": data_path,
        "job_s": round(job_s, 2),
        "train_seconds": round(report.train_seconds, 2),
        "train_samples": report.train_samples,
        "val_samples": report.val_samples,
        "train_samples_per_s": round(
            report.train_samples * update.metrics.epochs / max(report.train_seconds, 1e-9), 1
        ),
        "is_best": update.is_best,
        "val_accuracy": update.metrics.val_accuracy,
        "champion_val_accuracy": update.metrics.champion_val_accuracy,
        "state_dict": state,
    }


async def _cold_read(
    settings: Settings, topics: Topics, bank: FeatureBank, ranges: tuple[Any, ...]
) -> dict[str, Any]:
    """The log read, decode and first-copy selection of the job's ranges, on a fresh cache."""
    log = FeatureLog(
        bootstrap=settings.bootstrap,
        topic=topics.features,
        client_id="fedex-paper-job-read",
        max_push_samples=settings.max_push_samples,
    )
    async with log:
        cache = log.cache_for(MODEL_ID, bank.backbone, bank.cut, bank.num_classes)
        started = time.perf_counter()
        records = await log.read(cache, ranges)
        read_s = time.perf_counter() - started
        started = time.perf_counter()
        dataset = cache.select(ranges)
        select_s = time.perf_counter() - started
    return {
        "records": records,
        "samples": len(dataset),
        "read_decode_s": round(read_s, 2),
        "select_dedupe_s": round(select_s, 3),
        "samples_per_s": round(len(dataset) / max(read_s + select_s, 1e-9), 1),
    }


def run_paper_job_bench(
    settings: Settings,
    *,
    scale: float,
    epochs: int = 10,
    device: str = "auto",
    config: str = "default",
    keep: bool = False,
    out: Path | None = None,
) -> dict[str, Any]:
    """``fedex bench paper-job``: run, print, write ``paper-job.json``."""
    from lab.bench_broker import bench_kafka
    from lab.benchio import write_result
    from pipeline.tables import print_table

    async def run() -> dict[str, Any]:
        async with bench_kafka(settings, keep=keep) as bootstrap:
            live = settings.model_copy(update={"kafka_bootstrap": bootstrap})
            return await run_paper_job(
                live, scale=scale, epochs=epochs, device=device, config=config
            )

    result = asyncio.run(run())
    d = result["data_path"]
    print_table(
        f"one job of {result['pushed_samples']:,} features × {epochs} epochs, "
        f"{result['identities']:,} identities, through the pipeline ({device})",
        ["step", "seconds", "rate"],
        [
            ["produce (acked)", result["produce_s"], f"{result['pushes']:,} pushes"],
            ["log read + decode (cold)", d["read_decode_s"], f"{d['samples_per_s']:,} samples/s"],
            ["first-copy select", d["select_dedupe_s"], f"{d['samples']:,} samples"],
            ["trigger → version seen", result["job_s"], ""],
            [
                "  of which training",
                result["train_seconds"],
                f"{result['train_samples_per_s']:,} samples/s",
            ],
            [
                "accuracy v0 → version",
                "",
                f"{result['v0_device_accuracy']:.3f} → {result['version_device_accuracy']:.3f}",
            ],
        ],
    )
    name = "paper-job" if scale == 1.0 else f"paper-job-{scale:g}"
    print(f"wrote {write_result(name, result, out)}")
    return result
