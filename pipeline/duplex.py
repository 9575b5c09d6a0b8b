"""One participant of a request/response exchange over two topics: a reader positioned at
its inbound topic's end and a producer for the outbound one, started and stopped together.

Both sides of the FedAvg baseline are such participants (the server reads updates and
sends rounds, the devices read rounds and send updates); this owns their clients'
lifecycle so that each side owns only its protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.lifecycle import Service

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import ConsumerRecord


class Duplex(Service):
    """``consumer`` reads ``topic`` from its end at :meth:`start` (what was there before is
    not ours); ``producer`` sends anywhere. Both are ``None`` until started and after
    :meth:`stop`, which is idempotent."""

    def __init__(self, *, bootstrap: str, topic: str, client_id: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.client_id = client_id
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        if self.producer is not None:
            return
        # Imported here: aiokafka loads only once a participant starts.
        from pipeline.clients import start_reader_and_producer

        self.consumer, self.producer = await start_reader_and_producer(
            bootstrap=self.bootstrap, topic=self.topic, client_id=self.client_id
        )

    async def poll(self, timeout_ms: int) -> list[ConsumerRecord[Any, Any]]:
        """What arrived within ``timeout_ms``: every partition's records, each in order."""
        assert self.consumer is not None, "start() first"
        batches = await self.consumer.getmany(timeout_ms=timeout_ms)
        return [message for messages in batches.values() for message in messages]

    async def stop(self) -> None:
        from pipeline.clients import stop_clients

        consumer, producer = self.consumer, self.producer
        self.consumer = self.producer = None
        await stop_clients(producer, consumer)
