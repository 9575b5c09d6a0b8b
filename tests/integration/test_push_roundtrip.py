"""Encoded pushes survive a trip through the real broker, byte for byte."""

from __future__ import annotations

import asyncio

from pipeline import clients, codec
from pipeline.records import Cut, FeatureDType
from pipeline.topics import Topics
from tests import factories


async def test_pushes_round_trip_through_kafka(kafka_bootstrap: str, kafka_topics: Topics) -> None:
    pushes = [
        factories.push("bench", device=i, n=10, first_id=i * 10, seed=i) for i in range(20)
    ] + [factories.push("bench", n=3, cut=Cut.FREEZE4, dtype=FeatureDType.FLOAT32, device=99)]
    producer = clients.make_producer(bootstrap=kafka_bootstrap)
    await producer.start()
    try:
        for push in pushes:
            await producer.send_and_wait(
                kafka_topics.features, codec.encode_push(push), key=codec.encode_key(push.model_id)
            )
    finally:
        await producer.stop()

    consumer = clients.make_consumer(
        kafka_topics.features, bootstrap=kafka_bootstrap, group_id=None
    )
    await consumer.start()
    received = []
    try:

        async def read_all() -> None:
            while len(received) < len(pushes):
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    received.extend(records)

        await asyncio.wait_for(read_all(), timeout=30)
    finally:
        await consumer.stop()

    # One key → one partition → the producer's order.
    assert len({r.partition for r in received}) == 1
    decoded = [codec.decode_push(r.value, num_classes=1000) for r in received]
    assert [codec.decode_key(r.key) for r in received] == ["bench"] * len(pushes)
    for sent, got in zip(pushes, decoded, strict=True):
        assert got.same_as(sent)
