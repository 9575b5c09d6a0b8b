"""The ingest stage of the aggregation agents: the feature log in, batch summaries out.

Faust pays a per-event cost far above what counting one push needs, so pushes do not go
through Faust: :class:`IngestStage` reads the feature log with a plain aiokafka consumer in
large ``getmany`` batches, validates every push (:class:`agents.summarizer.Summarizer`,
models known from the model topic through a :class:`~pipeline.registry.RegistryFollower`),
dead-letters the bad ones with their origin and reason, and sends one summary per
feature-log partition to the agents' summaries topic, to the partition of the same number
(so the Faust agent that counts it owns the table partition of every model in it: pushes
are keyed by model id). Only once the
summaries and dead letters are acknowledged by every in-sync replica does it commit the
batch's feature-log offsets: a stage that dies re-reads the batch, and the re-sent summaries
are harmless because the table skips offsets it already counted. A batch whose sends or
commit fail on a broker outage is retried with backoff until the broker is back.

Its consumer group is ``<app id>-ingest``: the stages of several workers share the
feature log's partitions. A rebalance waits for the batch in flight to be committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from agents.aggregator import Record
from agents.summarizer import IngestOutcome, Summarizer
from pipeline import clients, codec
from pipeline.broker_health import BrokerHealth, backoff_delays, is_transient
from pipeline.lifecycle import Service
from pipeline.registry import RegistryFollower
from pipeline.samples import ModelFit

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

log = logging.getLogger(__name__)

#: How long one fetch waits when the feature log is quiet (bounds how long a rebalance
#: or a stop waits for the loop to notice).
POLL_MS = 100


class _HoldRevocation(ConsumerRebalanceListener):
    """Makes a rebalance wait until the batch in flight is committed, so partitions move
    with their offsets up to date (no batch is summarized twice on a clean handover)."""

    def __init__(self, lock: asyncio.Lock) -> None:
        self._lock = lock

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self._lock:
            pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("ingest assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))


class IngestStage(Service):
    """Validates and summarizes the feature log; ``start()``, ``stop()``, ``async with``.

    ``on_error`` is awaited when the loop fails (the batch in flight stays uncommitted);
    the stage then stops taking input and ``error`` holds the exception.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        features_topic: str,
        models_topic: str,
        summaries_topic: str,
        deadletter_topic: str,
        group_id: str,
        max_push_bytes: int,
        max_push_samples: int,
        batch_max: int,
        linger_ms: int,
        clock: Callable[[], float] = time.time,
        on_error: Callable[[str, BaseException], Awaitable[None]] | None = None,
        client_id: str = "fedex-agents-ingest",
        health: BrokerHealth | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self.features_topic = features_topic
        self.summaries_topic = summaries_topic
        self.deadletter_topic = deadletter_topic
        self.group_id = group_id
        self.batch_max = batch_max
        self.linger_ms = linger_ms
        self._clock = clock
        self._on_error = on_error
        self._client_id = client_id
        self._health = health or BrokerHealth("agents ingest")
        self.follower = RegistryFollower(
            bootstrap=bootstrap, topic=models_topic, client_id=f"{client_id}-registry"
        )
        self._max_push_bytes = max_push_bytes
        self._max_push_samples = max_push_samples
        self.summarizer = Summarizer(
            max_push_bytes=max_push_bytes, max_push_samples=max_push_samples, lookup=self._fit
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._in_flight = asyncio.Lock()
        self._stopping = False
        self.error: BaseException | None = None
        self.pushes = 0
        self.samples = 0
        self.summaries_sent = 0
        self.dead_letters_sent = 0
        self.batches = 0

    @property
    def producer(self) -> AIOKafkaProducer | None:
        """The stage's producer once started (the worker probes the broker through it)."""
        return self._producer

    # ------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._task is not None:
            return
        await self.follower.start()
        try:
            await self.follower.wait_caught_up()
            self._producer = clients.make_producer(
                bootstrap=self._bootstrap, client_id=self._client_id, linger_ms=0
            )
            await self._producer.start()
            self._consumer = clients.make_consumer(
                bootstrap=self._bootstrap, group_id=self.group_id, client_id=self._client_id
            )
            self._consumer.subscribe(
                [self.features_topic], listener=_HoldRevocation(self._in_flight)
            )
            await self._consumer.start()
        except BaseException:
            await self._close()
            raise
        self._task = asyncio.create_task(self._run(), name="agents-ingest")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stops taking input, lets the batch in flight finish (up to ``timeout``), then
        cancels and closes the clients. Idempotent."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            _, pending = await asyncio.wait({task}, timeout=timeout)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            if pending:
                log.warning(
                    "ingest batch still in flight after %s s; it stays uncommitted", timeout
                )
        await self._close()

    async def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            await consumer.stop()
        if producer is not None:
            await producer.stop()
        await self.follower.stop()

    @property
    def assignment(self) -> set[TopicPartition]:
        """The feature-log partitions this stage reads now."""
        return set(self._consumer.assignment()) if self._consumer is not None else set()

    # ------------------------------------------------------------------------ loop

    def _fit(self, model_id: str) -> ModelFit | None:
        entry = self.follower.registry.get(model_id)
        if entry is None:
            return None
        return ModelFit.of_entry(
            entry, max_push_samples=self._max_push_samples, max_push_bytes=self._max_push_bytes
        )

    async def _run(self) -> None:
        try:
            while not self._stopping:
                async with self._in_flight:
                    records = await self._fetch()
                    if records:
                        await self._handle_through_outages(records)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.error = exc
                log.error("ingest failed: %r; its batch stays uncommitted", exc)
                if self._on_error is not None:
                    await self._on_error(self.features_topic, exc)
            raise

    async def _fetch(self) -> list[Record]:
        consumer = self._consumer
        assert consumer is not None
        batches = await consumer.getmany(timeout_ms=POLL_MS, max_records=self.batch_max)
        count = sum(len(rs) for rs in batches.values())
        if count and count < self.batch_max and self.linger_ms:
            more = await consumer.getmany(
                timeout_ms=self.linger_ms, max_records=self.batch_max - count
            )
            for tp, rs in more.items():
                batches[tp] = [*batches.get(tp, []), *rs]
        return [Record.of_consumer_record(r) for rs in batches.values() for r in rs]

    async def _handle_through_outages(self, records: list[Record]) -> None:
        """:meth:`_handle`, retried with backoff while the broker is away (the batch is
        uncommitted meanwhile; re-sent summaries count nothing twice, a re-sent dead letter
        names the same origin)."""
        delays = backoff_delays()
        while True:
            try:
                await self._handle(records)
            except Exception as exc:
                if not is_transient(exc) or self._stopping:
                    raise
                self._health.failed(exc)
                await asyncio.sleep(next(delays))
                continue
            self._health.ok()
            return

    async def _handle(self, records: list[Record]) -> None:
        """Summaries and dead letters durable, then the offsets committed."""
        await self._know_models(records)
        out = self.summarizer.summarize(records, self._clock())
        producer = self._producer
        assert producer is not None
        sends = [
            await producer.send(
                self.summaries_topic,
                codec.encode_summary(s),
                key=None,
                partition=s.partition,
            )
            for s in out.summaries
        ]
        sends += [
            await producer.send(self.deadletter_topic, codec.encode_dead_letter(d), key=d.key)
            for d in out.dead_letters
        ]
        await asyncio.gather(*sends)
        await self._commit(out)
        self.batches += 1
        self.pushes += out.pushes
        self.samples += out.samples
        self.summaries_sent += len(out.summaries)
        self.dead_letters_sent += len(out.dead_letters)

    async def _know_models(self, records: list[Record]) -> None:
        """A push for a model the registry does not know yet may follow its base update by
        a moment: catch up with the model topic before rejecting it as unknown."""
        registry = self.follower.registry
        keys = {r.key for r in records}
        if any((m := codec.decode_key(k)) is not None and m not in registry for k in keys):
            await self.follower.sync()

    async def _commit(self, out: IngestOutcome) -> None:
        consumer = self._consumer
        assert consumer is not None
        offsets = {TopicPartition(t, p): o for (t, p), o in out.commit.items()}
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The partitions moved while the batch was in flight: its outputs are durable,
            # and the new owner re-reads it (the table skips what was counted).
            log.warning("ingest commit skipped, partitions moved: %s", exc)
