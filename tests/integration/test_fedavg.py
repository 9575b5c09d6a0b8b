"""The FedAvg baseline on the real broker: a tiny world, a dozen devices, three rounds in
fp32, then two in fp16.

Rounds advance and close at quorum, the global head changes every round, every device's
byte count equals the sizes of the messages it really pushed and pulled, and the harness's
accuracy measurement sees the broadcast heads (round 0 is exactly v0). The devices' samples
are fresh draws: no two alike, none equal to a bank row the devices are tested on. In fp16
the head travels in half the bytes, both ways.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import pytest
import torch

from device_sim.bank import FeatureBank, build_bank
from device_sim.heads import train_base_head
from device_sim.world import World, WorldConfig
from lab.fedavg_devices import DeviceData, FedAvgFleet, OnBroadcast
from lab.fedavg_report import copies
from lab.fedavg_server import FedAvgConfig, FedAvgServer, RoundReport
from lab.fedavg_task import Device, Evaluator, distinct_check, make_devices
from pipeline import codec
from pipeline.clients import make_consumer
from pipeline.records import Backbone, Cut, FeatureDType, RoundBroadcast
from pipeline.settings import Settings
from pipeline.topics import Topics, ensure_topics, fedavg_topic_specs

MODEL = "m1"
WORLD = WorldConfig(
    seed=3,
    models=(MODEL,),
    identities=4,
    pretrain_images=3,
    device_images=4,
    vendors=2,
    identities_per_device=(2, 3),
)


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> FeatureBank:
    return build_bank(
        World(WORLD),
        backbone=Backbone.MOBILENET_V2,
        cut=Cut.FREEZE6,
        out=tmp_path_factory.mktemp("banks"),
        batch_size=16,
    )


async def read_all(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """The first ``count`` messages of a one-partition topic."""
    from aiokafka import TopicPartition

    consumer = make_consumer(bootstrap=bootstrap, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        values: list[bytes] = []
        while len(values) < count:
            batches = await asyncio.wait_for(consumer.getmany(timeout_ms=500), 30)
            values += [m.value for messages in batches.values() for m in messages]
        return values
    finally:
        await consumer.stop()


def arms(
    settings: Settings,
    topics: Topics,
    bank: FeatureBank,
    base: Mapping[str, torch.Tensor],
    devices: Sequence[Device],
    config: FedAvgConfig,
) -> tuple[FedAvgFleet, FedAvgServer]:
    """The devices and the server of one FedAvg run over ``devices``, from ``base``, in
    ``config.dtype``."""
    data = {d.device_id: DeviceData(d.features, d.labels) for d in devices}
    fleet = FedAvgFleet(
        bootstrap=settings.bootstrap,
        topics=topics,
        model_id=MODEL,
        devices=data,
        dtype=config.dtype,
    )
    server = FedAvgServer(
        bootstrap=settings.bootstrap,
        topics=topics,
        model_id=MODEL,
        backbone=bank.backbone,
        cut=bank.cut,
        num_classes=bank.num_classes,
        init_state=base,
        devices=[d.device_id for d in devices],
        config=config,
    )
    return fleet, server


async def run_rounds(
    fleet: FedAvgFleet, server: FedAvgServer, on_broadcast: OnBroadcast
) -> tuple[list[RoundReport], RoundBroadcast | None]:
    """Every round of ``server`` with ``fleet`` answering; the reports and the last
    broadcast the devices saw."""
    async with fleet, server:
        devices_task = asyncio.create_task(fleet.run(on_broadcast=on_broadcast, idle_timeout=60))
        reports = await asyncio.wait_for(server.run(), 120)
        last = await asyncio.wait_for(devices_task, 60)
    return reports, last


async def assert_bytes_are_message_sizes(
    settings: Settings,
    topics: Topics,
    fleet: FedAvgFleet,
    devices: Sequence[Device],
    seen: Sequence[tuple[RoundBroadcast, int, float, dict[str, np.ndarray]]],
) -> list[bytes]:
    """Bytes per device are the real message sizes: pushes read back from the update topic,
    broadcasts of the rounds the device was selected in. Returns the pushes."""
    pushed = await read_all(settings.bootstrap, topics.fedavg_updates, 3 * 6)
    up: dict[str, int] = defaultdict(int)
    for value in pushed:
        up[codec.decode_round_update(value).device_id] += len(value)
    down: dict[str, int] = defaultdict(int)
    for broadcast, size, _, _ in seen:
        for device_id in broadcast.selected:
            down[device_id] += size
    broadcasts = await read_all(settings.bootstrap, topics.fedavg_rounds, 4)
    assert [len(v) for v in broadcasts] == [size for _, size, _, _ in seen]
    for device in devices:
        ledger = fleet.ledgers[device.device_id]
        assert ledger.bytes_up == up[device.device_id]
        assert ledger.bytes_down == down[device.device_id]
        assert (ledger.compute_seconds > 0) == (ledger.rounds > 0)
    assert sum(ledger.rounds for ledger in fleet.ledgers.values()) == 3 * 6
    return pushed


async def test_fedavg_rounds_over_kafka(
    settings: Settings, kafka_topics: Topics, bank: FeatureBank
) -> None:
    await ensure_topics(settings.bootstrap, fedavg_topic_specs(settings))
    world = World(WORLD)
    base = train_base_head(bank, MODEL, epochs=5)
    devices = make_devices(bank, world, MODEL, 12, 16, seed=0)
    assert copies(distinct_check(bank, devices, np.zeros(12 * 16, dtype=np.bool_))) == 0
    evaluate = Evaluator(bank, devices)
    config = FedAvgConfig(
        rounds=3, fraction=0.5, deadline_s=60, local_epochs=2, batch_size=8, lr=0.1
    )
    fleet, server = arms(settings, kafka_topics, bank, base.state_dict, devices, config)
    seen: list[tuple[RoundBroadcast, int, float, dict[str, np.ndarray]]] = []

    async def on_broadcast(broadcast: RoundBroadcast, size: int) -> bool:
        copy = {k: np.array(v) for k, v in broadcast.tensors.items()}
        seen.append((broadcast, size, evaluate(broadcast.tensors), copy))
        return False

    reports, last = await run_rounds(fleet, server, on_broadcast)

    # Rounds advance, each closes when every selected device reported.
    assert [r.round for r in reports] == [0, 1, 2]
    for report in reports:
        assert report.selected == 6 and report.accepted == 6, report
        assert report.closed_by == "quorum" and report.ignored == {}
        assert report.samples == 6 * 16 and report.mean_loss is not None
    assert [b.round for b, *_ in seen] == [0, 1, 2, 3]
    assert last is not None and last.round == 3 and last.selected == ()
    assert fleet.run_id == server.run_id

    # The global head changes every round; round 0 is v0 and scores as v0 does.
    weights = [tensors["logits.weight"] for *_, tensors in seen]
    assert np.array_equal(weights[0], base.state_dict["logits.weight"].numpy())
    for before, after in itertools.pairwise(weights):
        assert not np.allclose(before, after)
    np.testing.assert_array_equal(weights[-1], server.state["logits.weight"])
    accuracies = [accuracy for _, _, accuracy, _ in seen]
    assert accuracies[0] == evaluate(base.state_dict)
    assert all(0.0 <= a <= 1.0 for a in accuracies)

    pushed = await assert_bytes_are_message_sizes(settings, kafka_topics, fleet, devices, seen)
    # a freeze6 head of 4 classes in fp32: 4·512·4 + 4·4 bytes of tensors per message
    assert min(len(v) for v in pushed) > 4 * 512 * 4 + 16
    assert evaluate.vendors(server.state)["spread"] >= 0.0

    # The same rounds in fp16: broadcasts and updates carry half the tensor bytes.
    half, half_server = arms(
        settings,
        kafka_topics,
        bank,
        base.state_dict,
        devices,
        replace(config, rounds=2, dtype=FeatureDType.FLOAT16),
    )
    sizes: list[int] = []

    async def on_half(broadcast: RoundBroadcast, size: int) -> bool:
        assert broadcast.dtype is FeatureDType.FLOAT16
        sizes.append(size)
        return False

    half_reports, _ = await run_rounds(half, half_server, on_half)
    assert [r.accepted for r in half_reports] == [6, 6]
    # a 4-class freeze6 head has 4·512 + 4 elements: 2 bytes each fewer in fp16
    saved = 2 * (4 * 512 + 4)
    # round by round (a broadcast's size also depends on how many it selects)
    full = [size for _, size, _, _ in seen]
    pairs = [*zip(full[:2], sizes[:2], strict=True), (full[-1], sizes[-1])]
    assert all(abs((a - b) - saved) < 64 for a, b in pairs), (full, sizes)
    per_update_32 = {x.bytes_up // x.rounds for x in fleet.ledgers.values() if x.rounds}
    per_update_16 = {x.bytes_up // x.rounds for x in half.ledgers.values() if x.rounds}
    assert all(abs((a - b) - saved) < 64 for a in per_update_32 for b in per_update_16)
