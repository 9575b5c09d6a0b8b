"""ensure_topics / describe_topics against the real broker, and a raw bytes round trip."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable

import pytest
from aiokafka import ConsumerRecord
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from pipeline.clients import make_admin, make_consumer, make_producer
from pipeline.settings import Settings
from pipeline.topics import (
    Role,
    TopicDescription,
    Topics,
    describe_topics,
    ensure_topics,
    topic_specs,
)

pytestmark = pytest.mark.integration


async def _describe_until(
    settings: Settings, done: Callable[[list[TopicDescription]], bool], within: float = 20
) -> list[TopicDescription]:
    """Poll describe_topics until ``done`` holds (changes made behind ensure_topics' back
    reach the broker's metadata a moment after the admin call returns)."""
    deadline = time.monotonic() + within
    while True:
        descriptions = await describe_topics(settings.bootstrap, topic_specs(settings))
        if done(descriptions):
            return descriptions
        assert time.monotonic() < deadline, f"condition not met within {within} s"
        await asyncio.sleep(0.05)


async def test_ensure_creates_per_spec_and_second_call_changes_nothing(settings: Settings) -> None:
    specs = topic_specs(settings)

    first = await ensure_topics(settings.bootstrap, specs)

    assert first.created == [s.name for s in specs]
    descriptions = await describe_topics(settings.bootstrap, specs)
    for desc in descriptions:
        assert desc.state is not None, desc.spec.name
        assert desc.state.partitions == desc.spec.partitions
        assert desc.state.replication_factor == desc.spec.replication_factor
        assert desc.drift == {}
        for name, value in desc.spec.config.items():
            assert desc.config(name) == value
    models = next(d for d in descriptions if d.spec.role is Role.MODELS)
    assert models.config("cleanup.policy") == "compact"
    assert models.config("max.message.bytes") == str(settings.max_message_bytes)

    second = await ensure_topics(settings.bootstrap, specs)

    assert not second.changed
    assert second.unchanged == [s.name for s in specs]
    assert second.warnings == []


async def test_describe_reports_missing_topics_without_creating_them(settings: Settings) -> None:
    descriptions = await describe_topics(settings.bootstrap, topic_specs(settings))
    assert [d.exists for d in descriptions] == [False] * len(descriptions)

    # Looking must not have auto-created anything (the broker allows auto-creation).
    admin = make_admin(bootstrap=settings.bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    assert not existing & {d.spec.name for d in descriptions}


async def test_ensure_repairs_drifted_configs_and_partitions(settings: Settings) -> None:
    topics = Topics(settings.topic_prefix)
    admin = make_admin(bootstrap=settings.bootstrap)
    await admin.start()
    try:
        # The feature log exists with too few partitions; the model topic has drifted.
        await admin.create_topics([NewTopic(topics.features, 1, 1)])
        await ensure_topics(
            settings.bootstrap, [s for s in topic_specs(settings) if s.role != Role.FEATURES]
        )
        await admin.alter_configs(
            [
                ConfigResource(
                    ConfigResourceType.TOPIC,
                    topics.models,
                    {"cleanup.policy": "delete", "retention.ms": "3600000"},
                )
            ]
        )
    finally:
        await admin.close()

    def drifted(descriptions: list[TopicDescription]) -> bool:
        by_role = {d.spec.role: d for d in descriptions}
        return by_role[Role.FEATURES].exists and "cleanup.policy" in by_role[Role.MODELS].drift

    await _describe_until(settings, drifted)

    report = await ensure_topics(settings.bootstrap, topic_specs(settings))

    assert sorted(report.updated) == sorted([topics.features, topics.models])
    by_name = {t.name: t for t in report.topics}
    assert by_name[topics.features].partitions_before == 1
    assert by_name[topics.features].partitions == settings.features_partitions
    assert by_name[topics.models].config_changes["cleanup.policy"] == ("delete", "compact")
    after = {
        d.spec.name: d for d in await describe_topics(settings.bootstrap, topic_specs(settings))
    }
    assert all(d.drift == {} for d in after.values())
    features_state = after[topics.features].state
    assert features_state is not None
    assert features_state.partitions == settings.features_partitions
    # Our override of a config the spec does not manage survives the repair.
    assert after[topics.models].config("retention.ms") == "3600000"
    assert not (await ensure_topics(settings.bootstrap, topic_specs(settings))).changed


async def test_raw_bytes_round_trip_including_a_large_record(
    settings: Settings, kafka_topics: Topics
) -> None:
    topic = kafka_topics.models
    records = [
        (b"model-a", b"\x00\x01small"),
        (b"model-b", os.urandom(3 * 1024 * 1024)),  # a checkpoint-sized message
        (b"model-a", b""),
    ]
    producer = make_producer(bootstrap=settings.bootstrap, client_id="test-producer")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key, headers=[("h", b"v")])
    finally:
        await producer.stop()

    consumer = make_consumer(
        topic, bootstrap=settings.bootstrap, group_id=f"test-{uuid.uuid4().hex}"
    )
    await consumer.start()
    try:
        got: list[ConsumerRecord[bytes, bytes]] = []
        while len(got) < len(records):
            message = await asyncio.wait_for(consumer.getone(), 30)
            got.append(message)
        await consumer.commit()
    finally:
        await consumer.stop()

    # Order holds per key (partition); compare as sets of (key, value) plus per-key order.
    assert sorted((m.key, m.value) for m in got) == sorted(records)
    assert [m.value for m in got if m.key == b"model-a"] == [b"\x00\x01small", b""]
    assert all(m.headers == (("h", b"v"),) for m in got)
