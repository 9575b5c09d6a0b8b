"""Reading a whole topic without a consumer group: every partition from its start.

:class:`TopicTail` is the building block of followers that fold a topic into local state
(the fleet's subscriber reads the model and trigger topics this way): ``open`` assigns
every partition and records where each ended at start, the owner's task calls ``fetch`` /
``advance`` in a loop, and ``sync`` returns once everything on the topic *now* is folded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from pipeline.errors import FedexError

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition


class TopicTail:
    """One group-less consumer reading every partition of one topic from its start."""

    def __init__(
        self, *, bootstrap: str, topic: str, client_id: str, fetch_max_wait_ms: int = 500
    ) -> None:
        self.topic = topic
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._bootstrap = bootstrap
        self._client_id = client_id
        self.consumer: AIOKafkaConsumer | None = None
        self.start_ends: dict[TopicPartition, int] = {}
        self.folded: dict[TopicPartition, int] = {}
        self.progress = asyncio.Event()

    async def open(self) -> AIOKafkaConsumer:

        from pipeline import clients

        consumer = clients.make_consumer(
            bootstrap=self._bootstrap,
            group_id=None,
            client_id=self._client_id,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self._fetch_max_wait_ms,
        )
        await consumer.start()
        try:
            tps = await clients.assign_all_partitions(consumer, self.topic)
            await consumer.seek_to_beginning(*tps)
            self.start_ends = await consumer.end_offsets(tps)
        except BaseException:
            await asyncio.sleep(0)  # aiokafka: stop() right after start() needs one turn
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await consumer.stop()
            raise
        self.folded = dict.fromkeys(tps, 0)
        self.consumer = consumer
        return consumer

    async def fetch(self) -> dict[TopicPartition, list[ConsumerRecord[Any, Any]]]:
        consumer = self.consumer
        assert consumer is not None
        return await consumer.getmany(timeout_ms=500)

    async def advance(self) -> None:
        """After a fetched batch is handled: its positions count as folded (this also steps
        over compaction gaps and reaches the end of empty partitions)."""
        consumer = self.consumer
        assert consumer is not None
        for tp in self.folded:
            self.folded[tp] = max(self.folded[tp], await consumer.position(tp))
        self.progress.set()
        self.progress = asyncio.Event()

    def caught_up_with(self, ends: Mapping[TopicPartition, int]) -> bool:
        return all(self.folded.get(tp, 0) >= end for tp, end in ends.items())

    async def sync(self, task: asyncio.Task[None] | None, timeout: float) -> None:
        """Returns once every record on the topic now is folded (TimeoutError if not)."""
        consumer = self.consumer
        if consumer is None or task is None:
            raise FedexError(f"not following {self.topic!r}: open() it and run its reader task")
        ends = await consumer.end_offsets(list(self.folded))
        await wait_until(
            lambda: self.caught_up_with(ends),
            lambda: self.progress,
            task,
            timeout,
            f"caught up with {self.topic!r}",
        )

    async def close(self) -> None:
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            await consumer.stop()


async def iter_topic(
    bootstrap: str, topic: str, *, client_id: str = "fedex-reader"
) -> AsyncIterator[tuple[int, list[ConsumerRecord[Any, Any]]]]:
    """Every record on ``topic`` now (up to each partition's end at the call), as
    ``(partition, records)`` batches in offset order per partition; records produced
    meanwhile are left out. A missing topic is a ConfigError."""
    tail = TopicTail(bootstrap=bootstrap, topic=topic, client_id=client_id)
    await tail.open()
    try:
        ends = dict(tail.start_ends)
        while not tail.caught_up_with(ends):
            for tp, records in (await tail.fetch()).items():
                kept = [r for r in records if r.offset < ends[tp]]
                if kept:
                    yield tp.partition, kept
            await tail.advance()
    finally:
        await tail.close()


async def read_topic(
    bootstrap: str, topic: str, *, client_id: str = "fedex-reader"
) -> list[ConsumerRecord[Any, Any]]:
    """:func:`iter_topic` collected into one list (small topics: triggers, dead letters)."""
    out: list[ConsumerRecord[Any, Any]] = []
    async for _, records in iter_topic(bootstrap, topic, client_id=client_id):
        out.extend(records)
    return out


async def wait_until(
    done: Callable[[], bool],
    news: Callable[[], asyncio.Event],
    task: asyncio.Task[None],
    timeout: float,
    what: str,
) -> None:
    """Waits for ``done()``, re-checking whenever ``news()`` fires; a crash of ``task``
    (the loop that makes progress) fails the wait."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"{what} within {timeout:g} s")
        progress = asyncio.ensure_future(news().wait())
        finished, _ = await asyncio.wait(
            [progress, task], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
        )
        progress.cancel()
        if task in finished and not done():
            task.result()  # a crashed loop fails whoever waits on it
            raise FedexError(f"the reader stopped before: {what}")
