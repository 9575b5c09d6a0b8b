"""The fleet on a real broker: devices push exactly what they cached, nothing is lost
while the broker is down, the fleet stops by itself, and it applies a published version.

Small fleets of a tiny world (MobileNetV2 bank, 8 identities) keep each test short."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device_sim.devices import Availability, DeviceParams
from device_sim.fleet import FleetConfig, FleetRunner
from device_sim.fleet_config import FleetSchedule, SendPolicy
from device_sim.fleet_setup import load_bank
from device_sim.report import FleetProgress
from device_sim.world import WorldConfig
from pipeline import codec
from pipeline.clients import make_consumer
from pipeline.kafka_local import LocalKafka, free_port
from pipeline.records import Backbone, ModelMetrics
from pipeline.settings import Settings
from pipeline.topics import Topics, ensure_topics, topic_specs
from tests.integration.conftest import JAR_CACHE, TEST_HEAP

#: The easy world (aligned portraits) on a random backbone: this tests the mechanics;
#: the learning on the hard world is measured by the benches (docs/learning.md).
WORLD = WorldConfig(
    seed=5, identities=8, pretrain_images=4, device_images=4, vendors=3, variation=0.0
)
PARAMS = DeviceParams(
    availability=Availability.ALWAYS,
    inferences_per_hour=20.0,
    cache_capacity=256,
    push_batch=5,
    push_max=64,
    simulate_transfer=False,
    backoff_base_s=30.0,
    backoff_max_s=120.0,
)


@pytest.fixture(scope="module")
def fleet_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One home (feature bank, checkpoints) shared by the module's fleets."""
    home = tmp_path_factory.mktemp("fleet-home")
    settings = Settings(home=home)
    load_bank(settings, FleetConfig(backbone=Backbone.MOBILENET_V2, world=WORLD))
    return home


SCHEDULE = FleetSchedule(time_scale=60.0, tick_s=0.05, progress_s=0.2)


def config(**changes: object) -> FleetConfig:
    base = FleetConfig(
        count=60,
        models=2,
        backbone=Backbone.MOBILENET_V2,
        world=WORLD,
        params=PARAMS,
        schedule=SCHEDULE,
        sending=SendPolicy(send_timeout_s=2.0, drain_timeout_s=10.0),
        audit=True,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


class Watch:
    """Progress samples as events a test can await."""

    def __init__(self) -> None:
        self.latest: FleetProgress | None = None
        self._changed = asyncio.Event()

    def __call__(self, progress: FleetProgress) -> None:
        self.latest = progress
        self._changed.set()

    async def until(self, check: Callable[[FleetProgress], bool], timeout: float = 30) -> None:
        async def wait() -> None:
            while self.latest is None or not check(self.latest):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)


async def read_log(bootstrap: str, topic: str) -> dict[str, list[int]]:
    """Every push on the feature log: device id → sample ids (duplicates kept)."""
    from aiokafka import TopicPartition

    consumer = make_consumer(bootstrap=bootstrap, group_id=None)
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        tps = [TopicPartition(topic, p) for p in cluster.partitions_for_topic(topic) or ()]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        ids: dict[str, list[int]] = defaultdict(list)

        async def behind() -> bool:
            return any([await consumer.position(tp) < end for tp, end in ends.items()])

        while await behind():
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    push = codec.decode_push(record.value)
                    ids[push.device_id].extend(push.sample_ids.tolist())
        return ids
    finally:
        await consumer.stop()


def audit(runner: FleetRunner) -> dict[str, list[int]]:
    fleet = runner.fleet
    assert fleet is not None
    return {
        fleet.device_ids[k]: [int(i) for ids in pushes for i in ids]
        for k, pushes in runner.pushed.items()
    }


async def test_devices_push_exactly_what_they_cached(
    settings: Settings, kafka_topics: Topics, fleet_home: Path
) -> None:
    live = settings.model_copy(update={"home": fleet_home})
    watch = Watch()
    async with FleetRunner(
        live, config(schedule=dataclasses.replace(SCHEDULE, max_pushes=120)), on_progress=watch
    ) as runner:
        report = await asyncio.wait_for(runner.run(), 60)
    assert report.summary["stop_reason"] == "max_pushes"
    logged = await read_log(live.bootstrap, kafka_topics.features)
    mine = audit(runner)
    assert sum(len(v) for v in mine.values()) == report.totals["samples_pushed"] > 0
    # Exactly once: no failure happened, so no retry could duplicate a push.
    assert report.totals["retries"] == 0
    assert {d: sorted(v) for d, v in logged.items()} == {d: sorted(v) for d, v in mine.items()}
    # Every sample a device labelled was pushed, is still cached, or was evicted (counted).
    t = report.totals
    assert t["backlog"] + t["feedback"] == t["samples_pushed"] + t["cached_unsent"] + t["evicted"]


async def test_broker_down_then_up_loses_nothing(fleet_home: Path, tmp_path: Path) -> None:
    """At-least-once: a push whose ack was lost may arrive twice; deduplicated by
    (device id, sample id) the log holds exactly what the devices pushed, and every
    labelled sample is in the log or still cached (none evicted)."""
    kafka = LocalKafka(
        work_dir=tmp_path / "kafka",
        libs_dir=JAR_CACHE,
        port=free_port(),
        controller_port=free_port(),
        heap=TEST_HEAP,
        start_timeout=120,
    )
    await kafka.start()
    try:
        live = Settings(kafka_bootstrap=kafka.bootstrap, topic_prefix="down", home=fleet_home)
        await ensure_topics(live.bootstrap, topic_specs(live))
        watch = Watch()
        stop = asyncio.Event()
        cfg = config(count=40, subscribe=False)
        async with FleetRunner(live, cfg, on_progress=watch, stop_event=stop) as runner:
            run = asyncio.create_task(runner.run())
            await watch.until(lambda p: p.pushes >= 20)
            await kafka.stop()
            await watch.until(lambda p: p.retries >= 10)
            before = watch.latest
            assert before is not None
            await kafka.start()
            await watch.until(lambda p: p.pushes >= before.pushes + 20, timeout=60)
            stop.set()
            report = await asyncio.wait_for(run, 60)
        logged = await read_log(live.bootstrap, Topics("down").features)
    finally:
        await kafka.stop()
    mine = audit(runner)
    t = report.totals
    assert t["retries"] >= 10 and t["evicted"] == 0
    assert {d: sorted(set(v)) for d, v in logged.items()} == {d: sorted(v) for d, v in mine.items()}
    assert t["samples_pushed"] == sum(len(v) for v in mine.values())
    assert t["backlog"] + t["feedback"] == t["samples_pushed"] + t["cached_unsent"]


@pytest.mark.parametrize(
    ("changes", "reason"), [({"duration_s": 2.0}, "duration"), ({"max_pushes": 25}, "max_pushes")]
)
async def test_the_fleet_stops_by_itself(
    settings: Settings,
    kafka_topics: Topics,
    fleet_home: Path,
    changes: dict[str, object],
    reason: str,
) -> None:
    live = settings.model_copy(update={"home": fleet_home})
    async with FleetRunner(
        live, config(subscribe=False, schedule=dataclasses.replace(SCHEDULE, **changes))
    ) as runner:
        report = await asyncio.wait_for(runner.run(), 30)
    assert report.summary["stop_reason"] == reason
    if reason == "duration":
        assert 2.0 <= report.summary["wall_s"] < 6.0
    else:
        # The runner never starts more pushes than max_pushes still allows.
        assert report.totals["pushes"] == report.totals["push_attempts"] == 25


async def test_the_fleet_applies_a_published_version(
    settings: Settings, kafka_topics: Topics, fleet_home: Path
) -> None:
    import torch

    from device_sim.bank import FeatureBank
    from device_sim.heads import fit_head, new_head
    from pipeline.checkpoints import LocalCheckpointStore
    from pipeline.publishing import (
        PublishTarget,
        VersionSpec,
        build_update,
        make_update_producer,
        publish_update,
    )
    from pipeline.zoo import head_state_dict

    live = settings.model_copy(update={"home": fleet_home})
    watch = Watch()
    stop = asyncio.Event()
    async with FleetRunner(live, config(count=80), on_progress=watch, stop_event=stop) as runner:
        run = asyncio.create_task(runner.run())
        await watch.until(lambda p: p.versions >= 2)  # both base models are active
        bank: FeatureBank = runner.bank
        # A head fitted on device data (vendor cameras): better on the devices than v0.
        head = new_head(bank.backbone, bank.cut, bank.num_classes)
        rows = bank.select("faces-1", domains=list(bank.vendor_domains), holdout=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            fit_head(head, *bank.take(rows), epochs=40)
        update = build_update(
            VersionSpec("faces-1", "v1", bank.backbone, bank.cut, bank.num_classes, "v0"),
            PublishTarget(
                LocalCheckpointStore(live.checkpoint_dir), live.server_url, live.max_message_bytes
            ),
            head_state_dict(head),
            metrics=_metrics(),
            is_best=True,
        )
        producer = make_update_producer(live)
        await producer.start()
        try:
            await publish_update(producer, kafka_topics.models, update)
        finally:
            await producer.stop()
        fleet = runner.fleet
        assert fleet is not None
        mine = fleet.devices_of(0)
        await watch.until(lambda p: p.versions >= 3)
        await watch.until(lambda p: bool((fleet.active_version[mine] == 2).all()))
        stop.set()
        report = await asyncio.wait_for(run, 30)
    v1 = next(v for v in report.summary["versions"] if v["version"] == "v1")
    assert v1["model_id"] == "faces-1" and v1["applied"] == mine.size == 40
    assert v1["accuracy_after"] > v1["accuracy_before"]
    assert report.totals["bytes_down"] == update.size * mine.size
    assert np.isfinite(v1["fanout_wall_s"]["max"])


def _metrics() -> ModelMetrics:
    """v1's: 0.9 against the champion's 0.5, 100 + 10 samples, 1 s for 40 epochs."""
    return ModelMetrics(0.9, 0.5, 100, 10, 1.0, 40)
