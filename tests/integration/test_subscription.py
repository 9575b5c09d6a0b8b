"""The subscription side on the real broker and a real model server: a model update
reaches every subscribed device (inline, forced over HTTP, by reference), a late-joining
process activates the current best, and corrupted checkpoints are refused."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import torch
from aiokafka import AIOKafkaProducer

from device_sim.bank import FeatureBank
from device_sim.evaluation import HeldOutSet, RefusalReason, RefusedVersion, VersionEvent
from device_sim.heads import fit_head, new_head
from device_sim.subscription import ModelSubscriber
from device_sim.synthetic import random_devices, synthetic_bank
from pipeline import codec
from pipeline.auth import issue_token
from pipeline.checkpoints import LocalCheckpointStore, encode_checkpoint, sha256_hex
from pipeline.publishing import (
    PublishTarget,
    VersionSpec,
    build_update,
    make_update_producer,
    publish_update,
)
from pipeline.records import ModelMetrics, ModelUpdate, OffsetRange, TrainingTrigger, TriggerReason
from pipeline.server import ModelServer
from pipeline.settings import Settings
from pipeline.topics import Topics
from pipeline.zoo import head_state_dict, load_head_state

SECRET = "subscription-secret"
DEADLINE = 30.0
MODEL = "m1"
DEVICES = 500


@pytest.fixture(scope="module")
def bank() -> FeatureBank:
    return synthetic_bank(models=(MODEL, "m2"), identities=6, vendors=3, seed=2)


@pytest.fixture(scope="module")
def held_out(bank: FeatureBank) -> HeldOutSet:
    vendors, identities = random_devices(bank, MODEL, DEVICES, seed=1)
    return HeldOutSet.for_devices(bank, MODEL, vendors, identities)


def random_state(bank: FeatureBank, seed: int) -> dict[str, torch.Tensor]:
    return head_state_dict(new_head(bank.backbone, bank.cut, bank.num_classes, seed=seed))


def trained_state(bank: FeatureBank) -> dict[str, torch.Tensor]:
    """A head fitted on the devices' training rows: clearly better than a random one."""
    head = new_head(bank.backbone, bank.cut, bank.num_classes, seed=0)
    rows = bank.select(MODEL, domains=bank.vendor_domains, holdout=False)
    fit_head(head, *bank.take(rows), epochs=20, seed=0)
    return head_state_dict(head)


def expected_accuracy(
    held_out: HeldOutSet, bank: FeatureBank, state: Mapping[str, torch.Tensor]
) -> np.ndarray:
    head = new_head(bank.backbone, bank.cut, bank.num_classes)
    load_head_state(head, state)
    return held_out.evaluate(head)


class Harness:
    """This test's model server, producer and a way to publish versions and triggers."""

    def __init__(self, settings: Settings, server: ModelServer, producer: AIOKafkaProducer):
        self.settings = settings
        self.server = server
        self.producer = producer
        self.topics = Topics(settings.topic_prefix)
        self.store = LocalCheckpointStore(settings.checkpoint_dir)
        self.token = issue_token(SECRET, "fleet-1", [MODEL], 3600, time.time())

    def build(
        self,
        bank: FeatureBank,
        version: str,
        state: Mapping[str, torch.Tensor],
        *,
        inline: bool = True,
        is_best: bool = True,
    ) -> ModelUpdate:
        n = int(version[1:])
        spec = VersionSpec.in_chain(MODEL, n, bank.backbone, bank.cut, bank.num_classes)
        max_bytes = self.settings.max_message_bytes if inline else 1
        target = PublishTarget(self.store, self.server.url, max_bytes)
        return build_update(
            spec, target, state, metrics=ModelMetrics(0.5, None, 10, 2, 0.1, 1), is_best=is_best
        )

    async def publish(self, update: ModelUpdate) -> None:
        await publish_update(self.producer, self.topics.models, update)

    async def trigger(self, trigger: TrainingTrigger) -> None:
        await self.producer.send_and_wait(
            self.topics.triggers, codec.encode_trigger(trigger), key=codec.encode_key(MODEL)
        )

    def subscriber(self, held_out: HeldOutSet, **kwargs: Any) -> ModelSubscriber:
        return ModelSubscriber(
            bootstrap=self.settings.bootstrap,
            models_topic=self.topics.models,
            triggers_topic=self.topics.triggers,
            held_out={MODEL: held_out},
            server_url=self.server.url,
            token=self.token,
            retry_delay=0.02,
            **kwargs,
        )


@asynccontextmanager
async def harness(settings: Settings) -> AsyncIterator[Harness]:
    server = ModelServer.from_settings(settings, secret=SECRET, port=0)
    producer = make_update_producer(settings, client_id="test-subscription")
    async with server:
        await server.wait_ready(DEADLINE)
        await producer.start()
        try:
            yield Harness(settings, server, producer)
        finally:
            await producer.stop()


@pytest.fixture
async def h(settings: Settings, kafka_topics: Topics) -> AsyncIterator[Harness]:
    """The harness on this test's topics."""
    async with harness(settings) as running:
        yield running


@pytest.mark.parametrize("mode", ["inline", "prefer_http", "by_reference"])
async def test_a_model_update_reaches_every_subscribed_device(
    h: Harness, bank: FeatureBank, held_out: HeldOutSet, mode: str
) -> None:
    inline = mode != "by_reference"
    prefer_http = mode == "prefer_http"
    v0_state, v1_state = random_state(bank, 0), trained_state(bank)
    await h.publish(h.build(bank, "v0", v0_state, inline=inline))
    events: list[VersionEvent] = []
    refused: list[RefusedVersion] = []
    subscriber = h.subscriber(
        held_out,
        on_version=events.append,
        on_refused=refused.append,
        prefer_http=prefer_http,
        real_pull_fraction=0.02 if prefer_http else 0.0,
    )
    async with subscriber:
        # v0 was on the topic before the process started: it is the current best.
        await subscriber.wait_caught_up(DEADLINE)
        assert [(e.version, e.replayed, e.activated) for e in events] == [("v0", True, True)]

        ranges = (OffsetRange(0, 0, 40), OffsetRange(1, 5, 9))
        await h.trigger(TrainingTrigger(MODEL, f"{MODEL}:1", ranges, 44, TriggerReason.COUNT))
        update = h.build(bank, "v1", v1_state, inline=inline)
        assert (update.checkpoint is not None) == inline
        before = time.time()
        await h.publish(update)
        v1 = await subscriber.wait_version(MODEL, "v1", DEADLINE)
        assert isinstance(v1, VersionEvent), v1
        assert subscriber.active[MODEL].version == "v1" and v1.activated and not v1.replayed
        assert v1.source == ("http" if prefer_http or not inline else "inline")
        assert v1.covers == ranges and v1.trigger_id == f"{MODEL}:1"
        assert v1.size_bytes == update.size and v1.update.checkpoint is None
        assert before - 1 <= v1.produced_at <= v1.received_at <= v1.ready_at
        # Every device of the process has its accuracy under the new head.
        assert v1.accuracy.shape == (DEVICES,) and np.isfinite(v1.accuracy).all()
        np.testing.assert_allclose(v1.accuracy, expected_accuracy(held_out, bank, v1_state))
        assert v1.mean_accuracy >= events[0].mean_accuracy + 0.3
        active_state = subscriber.active[MODEL].state_dict
        assert torch.equal(active_state["logits.weight"], update_tensor(v1_state))

        # A version that is not the best is measured and reported, not activated.
        await h.publish(h.build(bank, "v2", random_state(bank, 2), inline=inline, is_best=False))
        v2 = await subscriber.wait_version(MODEL, "v2", DEADLINE)
        assert isinstance(v2, VersionEvent) and not v2.activated and v2.covers == ()
        assert subscriber.active[MODEL].version == "v1"
        assert [e.version for e in events] == ["v0", "v1", "v2"] and not refused

        stats = subscriber.stats
        assert stats.versions == 3 and stats.activated == 2 and stats.refused == 0
        if prefer_http or not inline:
            assert stats.http_downloads == 3 and stats.bytes_downloaded > 0
        else:
            assert stats.http_downloads == 0 and stats.inline_bytes > 0
        if prefer_http:  # 2% of 500 devices pulled v0 and v1 for real: 200, then 304
            await subscriber.wait_pulls()
            assert (stats.pulls_200, stats.pulls_304, stats.pull_errors) == (20, 20, 0)

    # A process joining now activates the current best (v1) and downloads only it.
    late: list[VersionEvent] = []
    async with h.subscriber(held_out, on_version=late.append, prefer_http=prefer_http) as s:
        await s.wait_caught_up(DEADLINE)
        assert [(e.version, e.replayed, e.activated) for e in late] == [("v1", True, True)]
        assert late[0].covers == ranges
        np.testing.assert_allclose(late[0].accuracy, v1.accuracy)


def update_tensor(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The weight as the fp16 checkpoint carries it."""
    return state["logits.weight"].to(torch.float16)


async def test_a_corrupted_checkpoint_is_refused_and_the_old_head_kept(
    h: Harness, bank: FeatureBank, held_out: HeldOutSet
) -> None:
    refused: list[RefusedVersion] = []
    events: list[VersionEvent] = []

    async def on_refused(item: RefusedVersion) -> None:  # async callbacks are awaited
        refused.append(item)

    subscriber = h.subscriber(
        held_out, on_version=events.append, on_refused=on_refused, download_attempts=3
    )
    async with subscriber:
        await subscriber.wait_caught_up(DEADLINE)
        await h.publish(h.build(bank, "v0", random_state(bank, 0)))
        assert isinstance(await subscriber.wait_version(MODEL, "v0", DEADLINE), VersionEvent)

        # By reference: the store holds other bytes than the update announces.
        good = h.build(bank, "v1", trained_state(bank), inline=False)
        h.store.put(MODEL, "v1", encode_checkpoint(random_state(bank, 9)))
        assert sha256_hex(h.store.get(f"ckpt://{MODEL}/v1")) != good.sha256
        await h.publish(good)
        bad = await subscriber.wait_version(MODEL, "v1", DEADLINE)
        assert isinstance(bad, RefusedVersion) and bad.reason is RefusalReason.SHA256_MISMATCH
        assert subscriber.stats.download_retries == 2  # 3 attempts, then refused

        # Inline: a flipped byte in the blob on the topic.
        update = h.build(bank, "v2", trained_state(bank))
        assert update.checkpoint is not None
        flipped = bytearray(update.checkpoint)
        flipped[-3] ^= 0xFF
        await h.publish(dataclasses.replace(update, checkpoint=bytes(flipped)))
        bad2 = await subscriber.wait_version(MODEL, "v2", DEADLINE)
        assert isinstance(bad2, RefusedVersion) and bad2.reason is RefusalReason.SHA256_MISMATCH

        # The devices keep v0; the fleet was told twice.
        assert subscriber.active[MODEL].version == "v0"
        assert [(r.version, r.reason) for r in refused] == [
            ("v1", RefusalReason.SHA256_MISMATCH),
            ("v2", RefusalReason.SHA256_MISMATCH),
        ]
        assert [e.version for e in events] == ["v0"]
        assert subscriber.stats.refused == 2 and subscriber.stats.versions == 1

        # A good version after the bad ones is activated as usual.
        await h.publish(h.build(bank, "v3", trained_state(bank)))
        v3 = await subscriber.wait_version(MODEL, "v3", DEADLINE)
        assert isinstance(v3, VersionEvent) and subscriber.active[MODEL].version == "v3"


async def test_updates_of_other_models_are_ignored(
    h: Harness, bank: FeatureBank, held_out: HeldOutSet
) -> None:
    events: list[VersionEvent] = []
    async with h.subscriber(held_out, on_version=events.append) as subscriber:
        await subscriber.wait_caught_up(DEADLINE)
        other = dataclasses.replace(h.build(bank, "v0", random_state(bank, 0)), model_id="m2")
        await h.publish(other)
        await h.publish(h.build(bank, "v0", random_state(bank, 0)))
        await subscriber.wait_version(MODEL, "v0", DEADLINE)
        assert [e.model_id for e in events] == [MODEL]
        assert subscriber.stats.ignored == 1
