"""The trainer on the real broker: a trigger becomes exactly one better version.

Tiny on purpose (freeze6, 10 classes, a few hundred separable 512-d samples, CPU): the
Kafka paths are what is tested; the recipe has its own tests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from aiokafka import TopicPartition

from pipeline import clients, codec
from pipeline.checkpoints import LocalCheckpointStore, checkpoint_uri, decode_checkpoint, sha256_hex
from pipeline.publishing import register_model
from pipeline.records import (
    Backbone,
    Cut,
    DeadLetter,
    FeatureDType,
    FeaturePush,
    ModelUpdate,
    OffsetRange,
    TrainingTrigger,
    TriggerReason,
)
from pipeline.samples import ValidationRule
from pipeline.settings import Settings
from pipeline.tail import read_topic
from pipeline.topics import Topics
from trainer.dataset import Dataset, offset_ranges
from trainer.job import JobOutcome, synthetic_dataset
from trainer.worker import Trainer

REPO = Path(__file__).resolve().parents[2]
MODEL = "faces-1"
CLASSES = 10
#: Short sessions so a killed member leaves the group in seconds, not the default 10 s.
SESSION_MS = 6_000


@pytest.fixture
def tiny(settings: Settings, kafka_topics: Topics) -> Settings:
    """Topics ensured; training tuned so a few hundred samples learn in well under a second."""
    return settings.model_copy(
        update={"train_epochs": 10, "train_batch_size": 64, "train_lr": 1e-2, "val_fraction": 0.2}
    )


@pytest.fixture
async def producer(tiny: Settings) -> AsyncIterator[object]:
    p = clients.make_producer(bootstrap=tiny.bootstrap, client_id="test-trainer")
    await p.start()
    yield p
    await p.stop()


def make_trainer(settings: Settings, **kw: object) -> Trainer:
    return Trainer(
        settings,
        device="cpu",
        session_timeout_ms=SESSION_MS,
        heartbeat_interval_ms=1_000,
        **kw,  # type: ignore[arg-type]
    )


async def push_dataset(
    producer: object, topics: Topics, data: Dataset, per_push: int = 30
) -> list[OffsetRange]:
    """Produce ``data`` as pushes from its devices; returns the offset ranges they landed in."""
    positions = []
    keys = np.asarray(data.device_ids)
    for device in sorted(set(data.device_ids)):
        rows = np.flatnonzero(keys == device)
        for at in range(0, len(rows), per_push):
            chunk = rows[at : at + per_push]
            push = FeaturePush(
                model_id=MODEL,
                device_id=device,
                backbone=Backbone.INCEPTION_RESNET_V1,
                cut=Cut.FREEZE6,
                dtype=FeatureDType.FLOAT16,
                sample_ids=data.sample_ids[chunk],
                labels=data.labels[chunk].astype(np.int32),
                timestamps_ms=np.zeros(len(chunk), np.int64),
                features=data.features[chunk],
            )
            meta = await producer.send_and_wait(  # type: ignore[attr-defined]
                topics.features, codec.encode_push(push), key=codec.encode_key(MODEL)
            )
            positions.append((meta.partition, meta.offset))
    return offset_ranges(positions)


async def send_trigger(
    producer: object,
    topics: Topics,
    ranges: list[OffsetRange],
    samples: int,
    attempt: int = 1,
    seq: int = 1,
) -> tuple[TopicPartition, int]:
    trigger = TrainingTrigger(
        model_id=MODEL,
        trigger_id=f"{MODEL}:{seq}",
        ranges=tuple(ranges),
        sample_count=samples,
        reason=TriggerReason.MANUAL,
        base_version="v0",
        attempt=attempt,
    )
    meta = await producer.send_and_wait(  # type: ignore[attr-defined]
        topics.triggers, codec.encode_trigger(trigger), key=codec.encode_key(MODEL)
    )
    return TopicPartition(topics.triggers, meta.partition), meta.offset


async def register(settings: Settings, **kw: Any) -> ModelUpdate:
    """Registers MODEL (its base version v0) as every test here trains it."""
    return await register_model(
        settings, MODEL, Backbone.INCEPTION_RESNET_V1, Cut.FREEZE6, CLASSES, **kw
    )


async def push_and_trigger(
    producer: object, topics: Topics, samples: int, seed: int
) -> tuple[Dataset, list[OffsetRange], TopicPartition, int]:
    """Pushes a synthetic dataset of ``samples`` and triggers trigger 1 on all of it; returns
    the data, its offset ranges and where the trigger landed."""
    data = synthetic_dataset(samples, CLASSES, seed=seed)
    ranges = await push_dataset(producer, topics, data)
    tp, offset = await send_trigger(producer, topics, ranges, len(data))
    return data, ranges, tp, offset


async def model_updates(settings: Settings, topics: Topics) -> list[ModelUpdate]:
    """Every update on the model topic, read from its start to its current end."""
    consumer = clients.make_consumer(bootstrap=settings.bootstrap, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topics.models, p) for p in range(settings.models_partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        updates = []
        for tp, end in ends.items():
            while await consumer.position(tp) < end:
                for record in (await consumer.getmany(tp, timeout_ms=500)).get(tp, []):
                    updates.append(codec.decode_update(record.value))
        return updates
    finally:
        await consumer.stop()


async def committed(settings: Settings, tp: TopicPartition) -> int | None:
    admin = clients.make_admin(bootstrap=settings.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(f"{settings.topic_prefix}-trainers")
    finally:
        await admin.close()
    meta = offsets.get(tp)
    return None if meta is None or meta.offset < 0 else meta.offset


def accuracy(state: dict[str, torch.Tensor], data: Dataset) -> float:
    logits = torch.from_numpy(data.features.astype(np.float32)) @ state["logits.weight"].float().T
    logits += state["logits.bias"].float()
    return float((logits.argmax(1).numpy() == data.labels).mean())


# --------------------------------------------------------------------------- tests


async def test_trigger_publishes_a_better_v1_and_commits(
    tiny: Settings, kafka_topics: Topics, producer: object
) -> None:
    v0 = await register(tiny, seed=0)
    data, ranges, tp, offset = await push_and_trigger(producer, kafka_topics, 360, seed=7)

    async with make_trainer(tiny) as trainer:
        assert await trainer.run(max_jobs=1, idle_timeout=20) == 1
    (report,) = trainer.jobs
    assert report.outcome is JobOutcome.PUBLISHED, report.summary()
    assert report.records_read == sum(r.count for r in ranges)
    assert report.train_samples + report.val_samples == len(data)

    updates = await model_updates(tiny, kafka_topics)
    assert [u.version for u in updates] == ["v0", "v1"]
    v1 = updates[1]
    assert (v1.parent_version, v1.trigger_id, v1.is_best) == ("v0", f"{MODEL}:1", True)
    assert v1.metrics.val_accuracy > (v1.metrics.champion_val_accuracy or 0) + 0.3
    assert v1.metrics.val_samples == report.val_samples and v1.metrics.epochs == 10
    # The first job has nothing earlier to replay; its validation set is its held-out share.
    assert (v1.metrics.replay_samples, v1.metrics.eval_samples) == (0, report.val_samples)

    # The blob in the store is the one announced, inline and by sha256.
    blob = LocalCheckpointStore(tiny.checkpoint_dir).get(checkpoint_uri(MODEL, "v1"))
    assert sha256_hex(blob) == v1.sha256 and len(blob) == v1.size and v1.checkpoint == blob
    assert v1.checkpoint_uri.endswith(f"/v1/models/{MODEL}/checkpoints/v1")

    # Judged independently on the same set (whole devices and a share of samples held
    # out): v1 beats v0.
    rule = ValidationRule(tiny.val_fraction, tiny.val_device_fraction)
    held = rule.mask(MODEL, data.keys)
    assert rule.held_out_devices(MODEL, data.device_ids), "the test needs a validation device"
    val = data.take(held)
    assert len(val) == v1.metrics.val_samples
    assert v0.checkpoint is not None
    champion, _ = decode_checkpoint(v0.checkpoint, expected_sha256=v0.sha256)
    challenger, _ = decode_checkpoint(blob, expected_sha256=v1.sha256)
    assert accuracy(challenger, val) > accuracy(champion, val) + 0.3
    assert accuracy(challenger, val) == pytest.approx(
        v1.metrics.val_accuracy, abs=1 / len(val) + 1e-6
    )

    assert await committed(tiny, tp) == offset + 1


async def test_redelivered_trigger_publishes_no_second_version(
    tiny: Settings, kafka_topics: Topics, producer: object
) -> None:
    await register(tiny)
    data, ranges, _, _ = await push_and_trigger(producer, kafka_topics, 200, seed=3)

    async with make_trainer(tiny) as trainer:
        assert await trainer.run(max_jobs=1, idle_timeout=20) == 1
        # The same trigger again (a re-fire after a timeout): right behind the publish,
        # before the follower could read v1 back.
        await send_trigger(producer, kafka_topics, ranges, len(data), attempt=2)
        assert await trainer.run(max_jobs=1, idle_timeout=20) == 1
    # And once more to a fresh trainer, which knows v1 only from the model topic.
    tp, offset = await send_trigger(producer, kafka_topics, ranges, len(data), attempt=3)
    async with make_trainer(tiny) as fresh:
        assert await fresh.run(max_jobs=1, idle_timeout=20) == 1

    outcomes = [j.outcome for j in [*trainer.jobs, *fresh.jobs]]
    assert outcomes == [
        JobOutcome.PUBLISHED,
        JobOutcome.ALREADY_PUBLISHED,
        JobOutcome.ALREADY_PUBLISHED,
    ]
    updates = await model_updates(tiny, kafka_topics)
    assert [u.version for u in updates] == ["v0", "v1"]
    assert await committed(tiny, tp) == offset + 1


HOLDING_TRAINER = textwrap.dedent(
    """
    import asyncio, logging, sys, threading
    from pathlib import Path

    from pipeline.settings import Settings
    from trainer.worker import Trainer

    marker = Path(sys.argv[1])

    def hold(trigger):
        marker.write_text(trigger.trigger_id)
        threading.Event().wait()  # a job that never ends: the test kills this process

    async def main():
        trainer = Trainer(
            Settings(), device="cpu", session_timeout_ms={session_ms},
            heartbeat_interval_ms=1000, on_job_started=hold,
        )
        async with trainer:
            await trainer.run(max_jobs=1)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(main())
    """
)


async def test_trainer_killed_mid_job_is_replaced_and_one_version_is_published(
    tiny: Settings, kafka_topics: Topics, producer: object, tmp_path: Path
) -> None:
    await register(tiny)
    _, _, tp, offset = await push_and_trigger(producer, kafka_topics, 240, seed=5)

    script, marker, log_path = tmp_path / "hold.py", tmp_path / "started", tmp_path / "hold.log"
    script.write_text(HOLDING_TRAINER.format(session_ms=SESSION_MS))
    env = {
        **os.environ,
        "FEDEX_KAFKA_BOOTSTRAP": tiny.bootstrap,
        "FEDEX_TOPIC_PREFIX": tiny.topic_prefix,
        "FEDEX_HOME": str(tiny.home),
        "FEDEX_TRAIN_EPOCHS": str(tiny.train_epochs),
        "PYTHONPATH": str(REPO),
    }
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), str(marker), env=env, stdout=log_file, stderr=log_file
        )
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert proc.returncode is None, f"trainer exited early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"the job never started:\n{log_path.read_text()}"
            await asyncio.sleep(0.05)
        assert marker.read_text() == f"{MODEL}:1"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert await committed(tiny, tp) is None
    assert [u.version for u in await model_updates(tiny, kafka_topics)] == ["v0"]

    async with make_trainer(tiny) as survivor:
        assert await survivor.run(max_jobs=1, idle_timeout=30) == 1
    (report,) = survivor.jobs
    assert report.outcome is JobOutcome.PUBLISHED, report.summary()
    assert report.offset == offset
    assert [u.version for u in await model_updates(tiny, kafka_topics)] == ["v0", "v1"]
    assert await committed(tiny, tp) == offset + 1


async def dead_letters(settings: Settings, topics: Topics) -> list[DeadLetter]:
    return [
        codec.decode_dead_letter(r.value)
        for r in await read_topic(settings.bootstrap, topics.deadletter)
    ]


async def test_a_trigger_id_seen_with_other_ranges_is_refused_with_a_dead_letter(
    tiny: Settings, kafka_topics: Topics, producer: object
) -> None:
    await register(tiny)
    data, ranges, _, _ = await push_and_trigger(producer, kafka_topics, 200, seed=11)
    [r] = ranges
    shorter = [OffsetRange(r.partition, r.start, r.end - 1)]
    async with make_trainer(tiny) as trainer:
        assert await trainer.run(max_jobs=1, idle_timeout=20) == 1
        # Same id, other ranges: to the trainer that trained it...
        await send_trigger(producer, kafka_topics, shorter, len(data) - 30, attempt=2)
        assert await trainer.run(max_jobs=1, idle_timeout=20) == 1
    # ...and to a fresh one, which knows the id's ranges from the published version only.
    tp, offset = await send_trigger(producer, kafka_topics, shorter, len(data) - 30, attempt=3)
    async with make_trainer(tiny) as fresh:
        assert await fresh.run(max_jobs=1, idle_timeout=20) == 1
        metric = fresh.metrics_registry.get_sample_value(
            "fedex_trainer_triggers_refused_total", {"reason": "trigger_conflict"}
        )
    outcomes = [j.outcome for j in [*trainer.jobs, *fresh.jobs]]
    assert outcomes == [JobOutcome.PUBLISHED, JobOutcome.REFUSED, JobOutcome.REFUSED]
    assert metric == 1.0
    updates = await model_updates(tiny, kafka_topics)
    assert [u.version for u in updates] == ["v0", "v1"]
    assert updates[1].trigger_ranges == tuple(ranges)
    letters = await dead_letters(tiny, kafka_topics)
    assert [d.reason for d in letters] == ["trigger_conflict", "trigger_conflict"]
    assert letters[1].offset == offset and letters[1].topic == kafka_topics.triggers
    assert codec.decode_trigger(letters[1].original).ranges == tuple(shorter)
    assert "was seen with" in letters[1].message
    assert await committed(tiny, tp) == offset + 1


async def test_an_undecodable_trigger_is_dead_lettered_and_committed(
    tiny: Settings, kafka_topics: Topics, producer: object
) -> None:
    meta = await producer.send_and_wait(  # type: ignore[attr-defined]
        kafka_topics.triggers, b"this is not a FedEx Stream trigger", key=codec.encode_key(MODEL)
    )
    async with make_trainer(tiny) as trainer:
        assert await trainer.run(max_jobs=1, idle_timeout=20) == 1
    assert [j.outcome for j in trainer.jobs] == [JobOutcome.REFUSED]
    [letter] = await dead_letters(tiny, kafka_topics)
    assert (letter.reason, letter.original, letter.offset) == (
        "bad_magic",
        b"this is not a FedEx Stream trigger",
        meta.offset,
    )
    assert (
        await committed(tiny, TopicPartition(kafka_topics.triggers, meta.partition))
        == meta.offset + 1
    )


async def test_a_sample_re_sent_into_a_later_trigger_is_trained_once(
    tiny: Settings, kafka_topics: Topics, producer: object
) -> None:
    """A device re-sends a push it got no acknowledgement for: the copy lands in the next
    trigger's ranges. The sample belongs to the job of its first copy, also for a trainer
    that never read that job's ranges."""
    await register(tiny)
    first, _, _, _ = await push_and_trigger(producer, kafka_topics, 200, seed=13)
    async with make_trainer(tiny) as trainer:
        assert await trainer.run(max_jobs=1, idle_timeout=20) == 1
    resent = first.take(np.arange(60))
    fresh_data = synthetic_dataset(100, CLASSES, seed=14)
    fresh_data = Dataset(
        features=fresh_data.features,
        labels=fresh_data.labels,
        device_ids=fresh_data.device_ids,
        sample_ids=fresh_data.sample_ids + 10_000,
    )
    ranges2 = offset_ranges(
        (r.partition, o)
        for ranges in (
            await push_dataset(producer, kafka_topics, resent),
            await push_dataset(producer, kafka_topics, fresh_data),
        )
        for r in ranges
        for o in (r.start, r.end - 1)
    )
    await send_trigger(producer, kafka_topics, ranges2, 160, seq=2)
    async with make_trainer(tiny) as cold:
        assert await cold.run(max_jobs=1, idle_timeout=20) == 1
    reports = [*trainer.jobs, *cold.jobs]
    assert [j.outcome for j in reports] == [JobOutcome.PUBLISHED, JobOutcome.PUBLISHED]
    assert reports[0].train_samples + reports[0].val_samples == 200
    assert reports[1].train_samples + reports[1].val_samples == 100
    # The second job replays the first one's training samples (they fit the budget), never
    # its validation samples, and is judged on the model's validation set so far.
    assert reports[1].replay_samples == reports[0].train_samples
    assert reports[1].eval_samples == reports[0].val_samples + reports[1].val_samples


async def test_a_champion_only_on_the_model_server_is_fetched_with_a_token(
    tiny: Settings, kafka_topics: Topics, producer: object, tmp_path: Path
) -> None:
    """The champion went by reference (too large to ride inline) and its blob is in the
    server's store only: the trainer downloads it, authenticated, and warm-starts from it."""
    from pipeline.server import ModelServer

    secret = "test-secret"
    server_store = LocalCheckpointStore(tmp_path / "server-store")
    server = ModelServer.from_settings(tiny, secret=secret, store=server_store, port=0)
    async with server:
        await server.wait_ready()
        live = tiny.model_copy(
            update={"auth_secret": secret, "server_url": server.url, "max_message_bytes": 66_000}
        )
        v0 = await register(live, store=server_store)
        assert v0.checkpoint is None, "the base version must go by reference"
        await push_and_trigger(producer, kafka_topics, 200, seed=21)
        trainer_store = LocalCheckpointStore(tmp_path / "trainer-store")
        async with make_trainer(live, store=trainer_store) as trainer:
            assert not trainer_store.exists(checkpoint_uri(MODEL, "v0"))
            assert await trainer.run(max_jobs=1, idle_timeout=20) == 1
    (report,) = trainer.jobs
    assert report.outcome is JobOutcome.PUBLISHED, report.summary()
    assert report.champion_version == "v0"
