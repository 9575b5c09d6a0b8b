"""The aggregation agents on the real broker: triggers, dead letters, restart from the
changelog, and two workers sharing (then handing over) the work.

Each test runs in-process agents workers (memory store, so state can only come back from
the changelog) on its own topic prefix, with 2 partitions (4 for the two-worker test) to
keep start-up and rebalances quick on small machines. Nothing sleeps for a fixed time:
waits poll with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from agents.app import AppOptions
from agents.policy import ModelState
from agents.summarizer import UNKNOWN_MODEL
from agents.worker import AgentError, AgentWorker
from pipeline import clients, codec
from pipeline.records import (
    DeadLetter,
    FeaturePush,
    ModelUpdate,
    TrainingTrigger,
    TriggerReason,
)
from pipeline.settings import Settings
from pipeline.topics import Topics
from tests import factories

NUM_CLASSES = 10
WAIT = 30.0


def agent_settings(settings: Settings, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "features_partitions": 2,
        "models_partitions": 2,
        "triggers_partitions": 2,
        "min_samples": 50,
        "age_floor_samples": 10,
        "max_age_s": 3600.0,
        "job_timeout_s": 3600.0,
        "agent_tick_s": 0.2,
    }
    return settings.model_copy(update={**base, **overrides})


def base_update(
    model_id: str, *, version: str = "v0", trigger_id: str | None = None
) -> ModelUpdate:
    return factories.update(
        model_id, version, trigger_id=trigger_id, num_classes=NUM_CLASSES, blob=None
    )


def make_push(model_id: str, *, device: int = 0, first_id: int = 0, n: int = 10) -> FeaturePush:
    return factories.push(model_id, device=device, n=n, first_id=first_id, num_classes=NUM_CLASSES)


class Tail:
    """Reads a topic from its beginning, group-less, and keeps what it decoded."""

    def __init__(
        self, bootstrap: str, topic: str, partitions: int, decode: Callable[[bytes], Any]
    ) -> None:
        self.consumer = clients.make_consumer(bootstrap=bootstrap, group_id=None)
        self.topic = topic
        self.partitions = partitions
        self.decode = decode
        self.items: list[Any] = []

    async def start(self) -> None:
        await self.consumer.start()
        tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_beginning(*tps)

    async def wait_for(self, count: int, timeout: float = WAIT) -> list[Any]:
        async def fill() -> None:
            while len(self.items) < count:
                batches = await self.consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    self.items += [self.decode(r.value) for r in records]

        await asyncio.wait_for(fill(), timeout)
        return self.items

    async def drained(self) -> list[Any]:
        """Everything on the topic now (reads up to the current end offsets)."""
        tps = list(self.consumer.assignment())
        ends = await self.consumer.end_offsets(tps)

        async def fill() -> None:
            while [tp for tp, end in ends.items() if await self.consumer.position(tp) < end]:
                batches = await self.consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    self.items += [self.decode(r.value) for r in records]

        await asyncio.wait_for(fill(), WAIT)
        return self.items

    async def stop(self) -> None:
        await self.consumer.stop()


async def until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def partition_of(model_id: str, partitions: int) -> int:
    """The partition of a model's pushes, updates and table key (the default partitioner)."""
    every = list(range(partitions))
    return int(DefaultPartitioner()(codec.encode_key(model_id), every, every))


class Harness:
    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings = settings
        self.tmp = tmp
        self.topics = Topics(settings.topic_prefix)
        self.producer: AIOKafkaProducer = clients.make_producer(bootstrap=settings.bootstrap)
        self.triggers = Tail(
            settings.bootstrap,
            self.topics.triggers,
            settings.triggers_partitions,
            codec.decode_trigger,
        )
        self.dead = Tail(settings.bootstrap, self.topics.deadletter, 1, codec.decode_dead_letter)
        self.workers: list[AgentWorker] = []
        self.clock_offset = 0.0

    def clock(self) -> float:
        return time.time() + self.clock_offset

    async def start_worker(self, name: str = "faust") -> AgentWorker:
        worker = AgentWorker(
            self.settings, AppOptions(store="memory://", clock=self.clock, datadir=self.tmp / name)
        )
        self.workers.append(worker)
        await worker.start()
        await worker.wait_ready()
        return worker

    async def stop_worker(self, worker: AgentWorker | None = None) -> None:
        for w in [worker] if worker is not None else list(self.workers):
            self.workers.remove(w)
            await w.stop()

    def owner(self, model_id: str) -> AgentWorker | None:
        """The worker whose table partition holds the model now."""
        partition = partition_of(model_id, self.settings.features_partitions)
        return next((w for w in self.workers if partition in w.partitions), None)

    def state(self, model_id: str) -> ModelState | None:
        owner = self.owner(model_id)
        return None if owner is None else owner.state(model_id)

    def balanced(self) -> bool:
        """Every worker is ready and the partitions of both groups are split between them."""
        every = set(range(self.settings.features_partitions))
        tables = [w.partitions for w in self.workers]
        reads = [{tp.partition for tp in w.ingest.assignment} for w in self.workers]
        return all(
            w.ready and sum(len(p) for p in parts) == len(every) and set().union(*parts) == every
            for w in self.workers
            for parts in (tables, reads)
        )

    async def publish_update(self, update: ModelUpdate) -> None:
        await self.producer.send_and_wait(
            self.topics.models, codec.encode_update(update), key=codec.encode_key(update.model_id)
        )

    async def add_model(self, model_id: str) -> None:
        await self.publish_update(base_update(model_id))
        await until(lambda: (s := self.state(model_id)) is not None and s.known, "base model")

    async def push(self, *pushes: FeaturePush) -> None:
        await self.send_raw(*((p.model_id, codec.encode_push(p)) for p in pushes))

    async def send_raw(self, *items: tuple[str | None, bytes]) -> None:
        futures = [
            await self.producer.send(
                self.topics.features, value, key=None if key is None else codec.encode_key(key)
            )
            for key, value in items
        ]
        await asyncio.gather(*futures)

    async def pending(self, model_id: str, samples: int) -> None:
        await until(
            lambda: (s := self.state(model_id)) is not None and s.counted_samples >= samples,
            f"{samples} samples counted",
        )


@pytest.fixture
async def harness(settings: Settings, tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(agent_settings(settings), tmp_path)
    await h.producer.start()
    await h.start_worker()
    await h.triggers.start()
    await h.dead.start()
    try:
        yield h
    finally:
        await h.stop_worker()
        await h.triggers.stop()
        await h.dead.stop()
        await h.producer.stop()


async def test_count_trigger_covers_the_pushed_ranges(harness: Harness) -> None:
    await harness.add_model("faces-1")
    await harness.push(*(make_push("faces-1", device=i, first_id=i * 10) for i in range(5)))
    [trigger] = await harness.triggers.wait_for(1)
    assert isinstance(trigger, TrainingTrigger)
    assert trigger.trigger_id == "faces-1:1"
    assert trigger.reason is TriggerReason.COUNT
    assert trigger.sample_count == 50
    assert trigger.attempt == 1
    assert trigger.base_version == "v0"
    [r] = trigger.ranges
    assert (r.start, r.end) == (0, 5)


async def test_age_trigger_then_retry_with_the_same_id(harness: Harness) -> None:
    await harness.add_model("faces-2")
    await harness.push(make_push("faces-2", n=12), make_push("faces-2", device=1, n=8))
    await harness.pending("faces-2", 20)  # over the age floor (10), under min_samples (50)
    harness.clock_offset += harness.settings.max_age_s + 1  # the next tick sees them old
    [first] = await harness.triggers.wait_for(1)
    assert (first.trigger_id, first.reason, first.attempt) == ("faces-2:1", TriggerReason.AGE, 1)
    assert first.sample_count == 20
    harness.clock_offset += harness.settings.job_timeout_s + 1  # no update came back
    retry = (await harness.triggers.wait_for(2))[1]
    assert (retry.trigger_id, retry.reason, retry.attempt) == ("faces-2:1", TriggerReason.RETRY, 2)
    assert (retry.ranges, retry.sample_count) == (first.ranges, first.sample_count)


async def test_one_job_in_flight_and_the_next_covers_only_new_data(harness: Harness) -> None:
    model = "faces-3"
    await harness.add_model(model)
    await harness.push(*(make_push(model, device=i, first_id=i * 10) for i in range(5)))
    [first] = await harness.triggers.wait_for(1)
    # Enough for another count trigger, but the first job is still running.
    await harness.push(*(make_push(model, device=i, first_id=100 + i * 10) for i in range(6)))
    await harness.pending(model, 110)
    state = harness.state(model)
    assert state is not None and state.in_flight is not None
    assert (state.in_flight.trigger_id, state.pending_samples) == (first.trigger_id, 60)
    assert len(await harness.triggers.drained()) == 1
    # An update for another trigger id does not end the job; the matching one does.
    await harness.publish_update(base_update(model, version="v9", trigger_id=f"{model}:9"))
    await harness.publish_update(base_update(model, version="v1", trigger_id=first.trigger_id))
    second = (await harness.triggers.wait_for(2))[1]
    assert len(harness.triggers.items) == 2
    assert (second.trigger_id, second.sample_count, second.base_version) == (f"{model}:2", 60, "v1")
    [r0], [r1] = first.ranges, second.ranges
    assert r1.partition == r0.partition and (r1.start, r1.end) == (r0.end, r0.end + 6)


async def test_bad_pushes_are_dead_lettered_and_good_ones_still_count(harness: Harness) -> None:
    model = "faces-4"
    await harness.add_model(model)
    good = make_push(model, n=10)
    nan = make_push(model, first_id=10)
    features = nan.features.copy()
    features[3, 7] = np.nan
    rng = np.random.default_rng(0)
    bad = {
        "non_finite": codec.encode_push(replace(nan, features=features)),
        "shape_mismatch": codec.encode_push(
            replace(good, features=rng.standard_normal((10, 256)).astype(np.float16))
        ),
        "label_out_of_range": codec.encode_push(
            replace(good, labels=np.full(10, NUM_CLASSES, dtype=np.int32))
        ),
        "bad_magic": b"this is not a FedEx Stream record",
    }
    await harness.send_raw(
        (model, codec.encode_push(good)),
        *((model, value) for value in bad.values()),
        ("ghost-1", codec.encode_push(make_push("ghost-1"))),
        (model, codec.encode_push(make_push(model, first_id=20, n=5))),
    )
    letters: list[DeadLetter] = await harness.dead.wait_for(5)
    assert [d.reason for d in letters] == [*bad, UNKNOWN_MODEL]
    assert [d.original for d in letters[:4]] == list(bad.values())
    offsets = [d.offset for d in letters]
    assert offsets[:4] == sorted(offsets[:4]) and letters[0].offset >= 1
    for letter in letters:
        assert letter.topic == harness.topics.features
        assert letter.message
    assert letters[-1].key == b"ghost-1"
    assert letters[0].key == model.encode()
    await harness.pending(model, 15)
    state = harness.state(model)
    assert state is not None and state.counted_pushes == 2
    assert harness.state("ghost-1") is None


async def test_state_survives_a_restart_through_the_changelog(harness: Harness) -> None:
    model = "faces-5"
    await harness.add_model(model)
    await harness.push(*(make_push(model, device=i, first_id=i * 10) for i in range(5)))
    [first] = await harness.triggers.wait_for(1)
    await harness.push(*(make_push(model, device=9, first_id=100 + i * 10) for i in range(3)))
    await harness.pending(model, 80)
    before = harness.state(model)
    assert before is not None

    await harness.stop_worker()
    await harness.start_worker()  # memory store: everything comes from the changelog
    after = harness.state(model)
    assert after is not None
    assert after.in_flight is not None and after.in_flight.trigger_id == first.trigger_id
    assert (after.pending_samples, after.next_offsets) == (30, before.next_offsets)
    assert after.pending_ranges == before.pending_ranges

    await harness.push(*(make_push(model, device=8, first_id=500 + i * 10) for i in range(2)))
    await harness.pending(model, 100)
    await harness.publish_update(base_update(model, version="v1", trigger_id=first.trigger_id))
    second = (await harness.triggers.wait_for(2))[1]
    assert (second.trigger_id, second.sample_count) == (f"{model}:2", 50)
    [r0], [r1] = first.ranges, second.ranges
    assert (r1.start, r1.end) == (r0.end, r0.end + 5)
    assert len(await harness.triggers.drained()) == 2  # none lost, none duplicated


def two_models_per_partition(partitions: int) -> list[str]:
    """Model ids, two on every partition of a feature log of ``partitions``."""
    models: list[str] = []
    for i in range(200):
        model = f"multi-{i}"
        if sum(partition_of(m, partitions) == partition_of(model, partitions) for m in models) < 2:
            models.append(model)
    assert len(models) == 2 * partitions
    return models


def assert_restored(h: Harness, models: list[str]) -> None:
    """Every model's state, as the survivor restored it from the changelog: its first job
    in flight, the 30 samples since pending, 80 counted."""
    for model in models:
        state = h.state(model)
        assert state is not None and state.in_flight is not None, model
        assert (state.in_flight.trigger_id, state.pending_samples) == (f"{model}:1", 30)
        assert state.counted_samples == 80


async def test_two_workers_share_the_work_and_the_survivor_takes_over(
    settings: Settings, tmp_path: Path
) -> None:
    partitions = 4
    h = Harness(
        agent_settings(
            settings,
            features_partitions=partitions,
            models_partitions=partitions,
            triggers_partitions=partitions,
        ),
        tmp_path,
    )
    models = two_models_per_partition(partitions)
    await h.producer.start()
    await h.triggers.start()
    try:
        a = await h.start_worker("a")
        b = await h.start_worker("b")
        await until(h.balanced, "both workers sharing the partitions", 60)
        for model in models:
            await h.publish_update(base_update(model))
        await until(
            lambda: all((s := h.state(m)) is not None and s.known for m in models), "models known"
        )

        # Every model reaches min_samples (50): each fires once, whichever worker owns it.
        await h.push(*(make_push(m, device=i, first_id=i * 10) for m in models for i in range(5)))
        first = {t.model_id: t for t in await h.triggers.wait_for(len(models))}
        assert sorted(t.trigger_id for t in first.values()) == sorted(f"{m}:1" for m in models)
        assert {t.sample_count for t in first.values()} == {50}
        owners = {m: h.owner(m) for m in models}
        assert set(owners.values()) == {a, b}  # the work is shared

        # 30 samples more per model stay pending behind the jobs in flight.
        await h.push(
            *(make_push(m, device=7, first_id=100 + i * 10) for m in models for i in range(3))
        )
        for model in models:
            await h.pending(model, 80)

        # b leaves: a takes its partitions over and restores their state from the changelog.
        await h.stop_worker(b)
        # The takeover is bounded by Faust's changelog recovery, which on this machine
        # sometimes waits ~60 s for its partitions before it resumes (see the session note).
        await until(h.balanced, "the survivor owning every partition", 180)
        assert a.partitions == set(range(partitions))
        assert_restored(h, models)

        # The survivor counts new pushes for b's models too, and the answers to the first
        # jobs fire the second ones with exactly the samples since.
        await h.push(
            *(make_push(m, device=8, first_id=500 + i * 10) for m in models for i in range(2))
        )
        for model in models:
            await h.pending(model, 100)
        for trigger in first.values():
            await h.publish_update(
                base_update(trigger.model_id, version="v1", trigger_id=trigger.trigger_id)
            )
        second = (await h.triggers.wait_for(2 * len(models)))[len(models) :]
        assert sorted(t.trigger_id for t in second) == sorted(f"{m}:2" for m in models)
        for trigger in second:
            [r0], [r1] = first[trigger.model_id].ranges, trigger.ranges
            assert trigger.sample_count == 50
            # Two models share each partition, so a model's ranges skip the other's records.
            assert r1.partition == r0.partition and r1.start >= r0.end
        # None lost, none duplicated.
        assert len(await h.triggers.drained()) == 2 * len(models)
    finally:
        await h.stop_worker()
        await h.triggers.stop()
        await h.dead.stop()
        await h.producer.stop()


async def test_a_batch_not_committed_before_a_crash_is_re_read_and_counted_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = "faces-6"
    await harness.add_model(model)
    [worker] = harness.workers
    consumer = worker.ingest._consumer  # the ingest stage's feature-log consumer

    async def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed after the summary was sent, before the commit")

    monkeypatch.setattr(consumer, "commit", crash)
    await harness.push(*(make_push(model, device=i, first_id=i * 10) for i in range(3)))
    with pytest.raises(AgentError, match="before the commit"):
        await asyncio.wait_for(worker.wait_stopped(), WAIT)
    await harness.pending(model, 30)  # its summary was durable: the table counted it

    await harness.stop_worker()
    await harness.start_worker()  # re-reads the uncommitted batch: already counted, skipped
    await harness.push(*(make_push(model, device=5, first_id=100 + i * 10) for i in range(2)))
    [trigger] = await harness.triggers.wait_for(1)
    state = harness.state(model)
    assert state is not None and (state.counted_samples, state.counted_pushes) == (50, 5)
    assert trigger.sample_count == 50
    [r] = trigger.ranges
    assert (r.start, r.end) == (0, 5)
    assert len(await harness.triggers.drained()) == 1


async def test_handlers_of_one_model_never_interleave(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lost update an audit found: the updates agent fires a trigger and, while its send
    is in flight, the summaries agent counts new pushes of the same model from the state the
    updates agent is about to replace; the later write wins and the pushes are never
    trained. Here the send is held until the summaries agent has counted (or 3 s, which is
    what a serialised worker waits, the summaries agent queued behind the lock)."""
    model = "faces-7"
    await harness.add_model(model)
    [worker] = harness.workers
    app = worker.agents
    await harness.push(*(make_push(model, device=i, first_id=i * 10) for i in range(5)))
    [first] = await harness.triggers.wait_for(1)
    await harness.push(*(make_push(model, device=i, first_id=100 + i * 10) for i in range(6)))
    await harness.pending(model, 110)  # 60 pending behind the job in flight

    send = app.triggers_topic.send
    holding = asyncio.Event()

    async def held_send(*args: Any, **kwargs: Any) -> Any:
        counted = app.counted_samples
        holding.set()
        with contextlib.suppress(TimeoutError):
            await until(lambda: app.counted_samples > counted, "the summaries agent", 3.0)
        return await send(*args, **kwargs)

    monkeypatch.setattr(app.triggers_topic, "send", held_send)
    # The answer to job 1 fires job 2 (60 pending ≥ 50) from the updates agent...
    await harness.publish_update(base_update(model, version="v1", trigger_id=first.trigger_id))
    await asyncio.wait_for(holding.wait(), WAIT)
    # ...and 10 samples arrive while its trigger is being sent.
    await harness.push(make_push(model, device=9, first_id=900))
    second = (await harness.triggers.wait_for(2))[1]
    monkeypatch.setattr(app.triggers_topic, "send", send)
    assert (second.trigger_id, second.sample_count) == (f"{model}:2", 60)
    await harness.pending(model, 120)
    state = harness.state(model)
    assert state is not None
    assert (state.counted_samples, state.counted_pushes) == (120, 12)
    assert state.pending_samples == 10
    [r2] = second.ranges
    assert state.pending_ranges == {r2.partition: (r2.end, r2.end + 1)}
    # The 10 samples go into job 3: nothing counted was dropped.
    await harness.push(*(make_push(model, device=i, first_id=2000 + i * 10) for i in range(4)))
    await harness.publish_update(base_update(model, version="v2", trigger_id=second.trigger_id))
    third = (await harness.triggers.wait_for(3))[2]
    assert (third.trigger_id, third.sample_count) == (f"{model}:3", 50)
    [r3] = third.ranges
    assert (r3.start, r3.end) == (r2.end, r2.end + 5)


async def test_a_trigger_lost_between_state_and_send_is_re_fired_by_the_next_owner(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state (which fixes the trigger's id and ranges) is durable before the trigger is
    sent. A worker that dies in between leaves a job in flight that no trigger announced:
    the worker that takes the partition over re-fires it, same id, ranges and count."""
    model = "faces-8"
    await harness.add_model(model)
    [worker] = harness.workers

    async def broken_send(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("killed after the state was written, before the trigger")

    monkeypatch.setattr(worker.agents.triggers_topic, "send", broken_send)
    await harness.push(*(make_push(model, device=i, first_id=i * 10) for i in range(5)))
    with pytest.raises(AgentError, match="before the trigger"):
        await asyncio.wait_for(worker.wait_stopped(), WAIT)
    await harness.stop_worker()
    assert await harness.triggers.drained() == []

    await harness.start_worker()  # memory store: the state comes from the changelog
    [trigger] = await harness.triggers.wait_for(1)
    assert (trigger.trigger_id, trigger.reason, trigger.sample_count) == (
        f"{model}:1",
        TriggerReason.RETRY,
        50,
    )
    [r] = trigger.ranges
    assert (r.start, r.end) == (0, 5)
    state = harness.state(model)
    assert state is not None and state.in_flight is not None
    assert (state.in_flight.trigger_id, state.pending_samples) == (f"{model}:1", 0)
