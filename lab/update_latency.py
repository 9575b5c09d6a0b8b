"""Update latency for ``fedex bench pipeline``: a trigger on the topic → its model update.

Runs a real :class:`~trainer.worker.Trainer` against the broker at hand: registers a
model, pushes synthetic separable features, then sends triggers one at a time (each
covering the pushes since the last) and times each from the trigger's acknowledgement to
the update's arrival at a registry follower, as any subscriber would see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from lab.feature_pushes import feature_push
from lab.measure import Distribution
from pipeline import codec
from pipeline.checkpoints import LocalCheckpointStore
from pipeline.clients import make_producer
from pipeline.publishing import register_model
from pipeline.records import (
    Backbone,
    Cut,
    FeaturePush,
    ModelUpdate,
    TrainingTrigger,
    TriggerReason,
)
from pipeline.registry import RegistryFollower, UpdateCallback
from pipeline.settings import Settings
from pipeline.topics import Topics, ensure_topics, topic_specs
from trainer.dataset import offset_ranges
from trainer.worker import Trainer


@contextlib.asynccontextmanager
async def followed_trainer(
    settings: Settings,
    *,
    device: str,
    store: LocalCheckpointStore,
    on_update: UpdateCallback,
) -> AsyncIterator[Trainer]:
    """An in-process trainer, and a registry follower of the models topic that is caught up
    before the trainer is handed out: every version published after the first trigger
    reaches ``on_update``, timed as any subscriber would see it."""
    async with (
        RegistryFollower(
            bootstrap=settings.bootstrap,
            topic=Topics(settings.topic_prefix).models,
            on_update=on_update,
        ) as follower,
        Trainer(settings, device=device, store=store) as trainer,
    ):
        await follower.wait_caught_up()
        yield trainer


def _pushes(
    model_id: str, job: int, samples: int, num_classes: int, per_push: int = 50
) -> list[FeaturePush]:
    rng = np.random.default_rng(job)
    prototypes = np.random.default_rng(0).standard_normal((num_classes, 512)).astype(np.float32)
    pushes = []
    for first in range(0, samples, per_push):
        labels = rng.integers(0, num_classes, per_push).astype(np.int32)
        features = prototypes[labels] + 0.5 * rng.standard_normal((per_push, 512))
        pushes.append(
            feature_push(
                model_id,
                f"dev-{job}-{first // per_push}",
                backbone=Backbone.INCEPTION_RESNET_V1,
                cut=Cut.FREEZE6,
                sample_ids=np.arange(per_push),
                labels=labels,
                features=features,
                timestamp_ms=int(time.time() * 1000),
            )
        )
    return pushes


async def measure_update_latency(
    settings: Settings,
    *,
    jobs: int = 100,
    warmup_jobs: int = 1,
    samples_per_job: int = 2000,
    num_classes: int = 100,
    device: str = "auto",
) -> dict[str, Any]:
    """Runs ``warmup_jobs + jobs`` training jobs on fresh topics; returns the latencies and
    job timings of the last ``jobs`` (the first ones load the backbone and warm the
    allocator: reported apart as the warm-up)."""
    with tempfile.TemporaryDirectory(prefix="fedex-update-bench-") as home:
        live = settings.model_copy(
            update={"topic_prefix": f"bench-update-{uuid.uuid4().hex[:8]}", "home": Path(home)}
        )
        return await _measure(live, jobs, warmup_jobs, samples_per_job, num_classes, device)


async def _measure(
    settings: Settings,
    jobs: int,
    warmup_jobs: int,
    samples_per_job: int,
    num_classes: int,
    device: str,
) -> dict[str, Any]:
    total = warmup_jobs + jobs
    topics = Topics(settings.topic_prefix)
    await ensure_topics(settings.bootstrap, topic_specs(settings))
    store = LocalCheckpointStore(settings.checkpoint_dir)
    model_id = "bench-latency"
    await register_model(
        settings, model_id, Backbone.INCEPTION_RESNET_V1, Cut.FREEZE6, num_classes, store=store
    )

    arrived: dict[str, asyncio.Future[float]] = {}

    def on_update(update: ModelUpdate) -> None:
        future = arrived.get(update.version)
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    latencies, train_seconds = [], []
    producer = make_producer(bootstrap=settings.bootstrap)
    await producer.start()
    try:
        async with followed_trainer(
            settings, device=device, store=store, on_update=on_update
        ) as trainer:
            running = asyncio.create_task(trainer.run(max_jobs=total, idle_timeout=300))
            for job in range(1, total + 1):
                positions = []
                pushes = _pushes(model_id, job, samples_per_job, num_classes)
                for push in pushes:
                    meta = await producer.send_and_wait(
                        topics.features, codec.encode_push(push), key=codec.encode_key(model_id)
                    )
                    positions.append((meta.partition, meta.offset))
                trigger = TrainingTrigger(
                    model_id=model_id,
                    trigger_id=f"{model_id}:{job}",
                    ranges=tuple(offset_ranges(positions)),
                    sample_count=samples_per_job,
                    reason=TriggerReason.MANUAL,
                    base_version=f"v{job - 1}",
                )
                arrived[f"v{job}"] = asyncio.get_running_loop().create_future()
                await producer.send_and_wait(
                    topics.triggers, codec.encode_trigger(trigger), key=codec.encode_key(model_id)
                )
                sent = time.perf_counter()
                latencies.append(await asyncio.wait_for(arrived[f"v{job}"], 300) - sent)
            await asyncio.wait_for(running, 60)
            train_seconds = [report.train_seconds for report in trainer.jobs]
    finally:
        await producer.stop()
    return {
        "jobs": jobs,
        "warmup_jobs": warmup_jobs,
        "samples_per_job_new": samples_per_job,
        "num_classes": num_classes,
        "device": device,
        "warmup_latencies_s": latencies[:warmup_jobs],
        "update_latency_s": Distribution.of(latencies[warmup_jobs:]).as_dict(),
        "train_seconds": Distribution.of(train_seconds[warmup_jobs:]).as_dict(),
        "latencies_s": latencies[warmup_jobs:],
    }
