"""The Faust app of the aggregation agents: topics, the per-model table, agents and the timer.

A thin I/O shell around :class:`agents.aggregator.Aggregator`. Pushes do not reach Faust one
by one: the worker's ingest stage (``agents.ingest``) validates the feature log in large
batches, dead-letters bad pushes, and sends one *batch summary* per feature-log partition
(model, offset, sample count, log time and device of each good push) to the internal
summaries topic, to the partition of the same number: one Faust event per partition and
batch instead of one per push. The agents here are:

- ``summaries`` consumes the summaries topic in batches (``take_events``) and counts each
  summary's pushes into the per-model table; a count trigger fires as soon as a model's
  pending samples reach ``min_samples`` (checked after every push, so replays trigger the
  same ranges).
- ``updates`` consumes the model topic: learns a model's classes, backbone and cut from
  its updates, and ends the job in flight when an update answers its trigger id.
- ``ticks``: a timer on every worker sends, every ``agent_tick_s``, one tick to each
  partition of an internal ticks topic this worker owns; the ``ticks`` agent then checks
  age triggers and job timeouts for the models of that partition. The detour through a
  topic is what lets the timer's decisions change the table: Faust writes a table key
  only in the context of an event, whose partition is the changelog partition.

Consumer group = app id ``<prefix>-agents`` (the ingest stage has its own,
``<prefix>-agents-ingest``). The summaries, model and ticks topics and the table's changelog
have the feature log's partition count, so Faust's assignor gives a worker the same
partitions of all of them (co-partitioning): the worker that counts a model's summaries
also folds its updates and ticks it. More workers = the partitions spread over them.

One writer per model state: the three agents run in their own tasks, and each batch's
load → decide → write (and the awaits on its outputs) holds the worker's one transition
lock, so no handler ever decides from a state that another handler is about to replace
(the lost update that dropped counted pushes; see ``docs/invariants.md``).

Durability (at-least-once, nothing lost), for every batch under that lock: the new state
is written to the table and its changelog records are awaited first (write-ahead: a
trigger's id, ranges and sample count are fixed by the durable state before the trigger
exists anywhere); then triggers and dead letters are sent with ``acks=all`` and awaited
(re-sent with backoff through a broker outage: the state names them, so a re-send is the
same trigger); only then are the source events acked, and Faust commits an offset only
once every event before it is acked (it also flushes its producer before committing). A
batch that fails or is cancelled is never acked: its partition stops committing, and the
agent's crash stops the worker, so a restart re-reads the batch. Replays are harmless: the
table remembers the next feature-log offset it counted per partition and skips every push
below it. A state whose trigger may not have reached the topic (a crash between the two
writes) is re-fired when its partition is taken over: the first tick of a partition newly
assigned to a worker says so, and every job in flight there is re-sent with the same id,
ranges and count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, cast

import faust
from faust.streams import _current_event  # the contextvar behind faust.current_event()
from mode.supervisors import CrashingSupervisor

from agents.aggregator import Aggregator, AggregatorOutput, Record
from agents.policy import ModelState, TriggerPolicy
from pipeline import codec
from pipeline.broker_health import backoff_delays, is_transient
from pipeline.clients import DEFAULT_MAX_REQUEST_SIZE
from pipeline.errors import ConfigError
from pipeline.settings import Settings
from pipeline.topics import Topics

log = logging.getLogger(__name__)

#: Summaries per batch at most, and how long a batch waits to fill (part of the trigger
#: latency).
BATCH_MAX = 1000
BATCH_WITHIN_S = 0.02
#: The per-model table; Faust names its changelog `Topics.agents_changelog` after it.
TABLE_NAME = "models"
#: The value of a partition's first tick on a worker that was newly assigned it.
TAKEOVER_TICK = b"takeover"


class DurableTable(faust.Table):
    """A Faust table whose changelog writes can be awaited (``flush_changelog``), so that the
    shell can hold back the source offsets until the state is durable."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unflushed: list[asyncio.Future[Any]] = []

    def on_key_set(self, key: Any, value: Any) -> None:
        fut = self.send_changelog(self.partition_for_key(key), key, value)
        self._unflushed.append(fut)
        self._sensor_on_set(self, key, value)

    async def flush_changelog(self) -> None:
        pending, self._unflushed = self._unflushed, []
        if pending:
            await asyncio.gather(*pending)


@contextlib.contextmanager
def _event_context(event: Any) -> Iterator[None]:
    """Makes ``event`` Faust's current event in this task, so that a table write goes to the
    changelog (and RocksDB) partition of that event. ``take_events`` collects events in
    another task, so the agent's own task has no current event while it handles a batch."""
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


def _withhold_acks(events: Sequence[Any]) -> None:
    """Marks messages acked for the stream without telling the consumer, so their offsets
    (and everything after them in their partition) are never committed by this process:
    a batch whose outputs may not be durable is re-read after a restart."""
    for event in events:
        event.message.acked = True


@dataclass(frozen=True, slots=True)
class Emitted:
    """What the agents put on the output topics, for observers (tests, the bench)."""

    triggers: int
    dead_letters: int


@dataclass(frozen=True, slots=True)
class AppOptions:
    """How one worker's Faust app runs, beyond the process's settings: one value that the
    worker hands to its app unchanged, so the two cannot drift apart.

    ``store``: ``rocksdb://`` (default; table data under ``settings.state_dir``) or
    ``memory://`` (tests: state then comes back only from the changelog). ``clock``
    returns seconds since the epoch; tests inject their own. ``batch_max`` /
    ``batch_within_s`` bound a summaries batch. ``datadir`` defaults to
    ``settings.state_dir / <app id>``. ``on_emit`` is awaited after every batch whose
    outputs are durable.
    """

    store: str = "rocksdb://"
    clock: Callable[[], float] = time.time
    web_enabled: bool = False
    batch_max: int = BATCH_MAX
    batch_within_s: float = BATCH_WITHIN_S
    datadir: Path | None = None
    on_emit: Callable[[Emitted], Awaitable[None] | None] | None = None


#: The production options (RocksDB, the wall clock, no web server); frozen, so shared.
DEFAULT_OPTIONS: Final = AppOptions()


class AgentApp:
    """Builds and owns the Faust app of one worker, run as ``options`` say."""

    def __init__(
        self,
        settings: Settings,
        options: AppOptions = DEFAULT_OPTIONS,
        *,
        on_error: Callable[[str, BaseException], Awaitable[None]] | None = None,
    ) -> None:
        if settings.models_partitions != settings.features_partitions:
            raise ConfigError(
                f"the model topic has {settings.models_partitions} partitions and the feature "
                f"log {settings.features_partitions}: the agents need them equal (co-partitioned "
                "by model id); set FEDEX_MODELS_PARTITIONS = FEDEX_FEATURES_PARTITIONS"
            )
        self.settings = settings
        self.clock = options.clock
        self.on_emit = options.on_emit
        self.batch_max = options.batch_max
        self.batch_within_s = options.batch_within_s
        self.topics = Topics(settings.topic_prefix)
        self.app_id = self.topics.agents_app_id
        partitions = settings.features_partitions
        self.datadir = options.datadir or settings.state_dir / self.app_id
        self.app = _faust_app(
            settings, self.app_id, options.store, self.datadir, options.web_enabled
        )
        raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
        self.models_topic = self.app.topic(self.topics.models, allow_empty=True, **raw)
        self.triggers_topic = self.app.topic(self.topics.triggers, **raw)
        self.deadletter_topic = self.app.topic(self.topics.deadletter, **raw)
        # Internal to this app, like the table's changelog (Faust names and creates both).
        self.ticks_topic = self.app.topic(
            self.topics.agents_ticks,
            internal=True,
            partitions=partitions,
            retention=timedelta(hours=1),
            deleting=True,
            **raw,
        )
        self.summaries_topic = self.app.topic(
            self.topics.agents_summaries,
            internal=True,
            partitions=partitions,
            retention=timedelta(milliseconds=settings.training_window_ms),
            deleting=True,
            **raw,
        )
        self.table = cast(
            DurableTable,
            self.app.Table(TABLE_NAME, partitions=partitions, key_type=bytes, value_type=bytes),
        )
        self.policy = TriggerPolicy.from_settings(settings)
        self.aggregator = Aggregator(self.policy, load=self.load_state)
        self.counted_samples = 0
        self.triggers_sent = 0
        #: Held by every handler from loading a model state to its changelog write and
        #: the outputs being durable: one writer per state at a time.
        self.transition = asyncio.Lock()
        self._ticked: set[int] = set()
        self.dead_letters_sent = 0

        # A failed agent is not restarted in-process: its batch was withheld from the
        # commit, so the worker must stop and a restart re-reads it.
        self._on_error = on_error
        for channel, name, fun in (
            (self.summaries_topic, "summaries", self._summaries_agent),
            (self.models_topic, "updates", self._updates_agent),
            (self.ticks_topic, "ticks", self._ticks_agent),
        ):
            self.app.agent(channel, name=name, supervisor_strategy=CrashingSupervisor)(fun)
        self.app.timer(settings.agent_tick_s)(self._send_ticks)
        self.app.on_partitions_revoked.connect(self._on_partitions_revoked)

    # ------------------------------------------------------------------ table access

    def load_state(self, model_id: str) -> ModelState | None:
        data = self.table.get(codec.encode_key(model_id))
        if data is None:
            return None
        return ModelState.from_fields(codec.decode_model_state(data))

    def states(self, partition: int | None = None) -> list[ModelState]:
        """Every model state this worker holds (its active partitions), or those of one
        feature-log ``partition``."""
        fields = (codec.decode_model_state(v) for v in self.table.values())
        return [
            ModelState.from_fields(f)
            for f in fields
            if partition is None or f.get("partition") == partition
        ]

    # ------------------------------------------------------------------------ agents

    async def _summaries_agent(self, stream: Any) -> AsyncIterator[None]:
        async for events in stream.take_events(self.batch_max, self.batch_within_s):
            async with self.transition:
                outcome = self.aggregator.add_summaries(
                    [Record.of_faust_event(e) for e in events], self.clock()
                )
                await self._guarded(events, outcome)
            yield None

    async def _updates_agent(self, stream: Any) -> AsyncIterator[None]:
        async for event in stream.events():
            async with self.transition:
                outcome = self.aggregator.add_update(Record.of_faust_event(event), self.clock())
                await self._guarded([event], outcome)
            yield None

    async def _ticks_agent(self, stream: Any) -> AsyncIterator[None]:
        async for event in stream.events():
            partition = event.message.partition
            async with self.transition:
                due = self.states(partition)
                if event.message.value == TAKEOVER_TICK:
                    outcome = self.aggregator.take_over(due, self.clock())
                else:
                    outcome = self.aggregator.tick(due, self.clock())
                await self._guarded([event], outcome)
            yield None

    async def _send_ticks(self) -> None:
        ticks = self.ticks_topic.get_topic_name()
        owned = {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == ticks}
        for partition in sorted(owned):
            value = b"" if partition in self._ticked else TAKEOVER_TICK
            await self.ticks_topic.send(key=None, value=value, partition=partition)
        self._ticked = owned

    async def _on_partitions_revoked(
        self, sender: Any, /, *args: Any, signal: Any, **kwargs: Any
    ) -> None:
        # A partition that comes back is a takeover again, even between two ticks.
        revoked = args[0] if args else kwargs.get("revoked", ())
        self._ticked -= {tp.partition for tp in revoked}

    # ---------------------------------------------------------------------- outputs

    async def _guarded(self, events: Sequence[Any], outcome: AggregatorOutput) -> None:
        try:
            await self._commit(outcome, events)
        except BaseException as exc:
            _withhold_acks(events)
            if self._on_error is not None and not isinstance(exc, asyncio.CancelledError):
                await self._on_error(events[-1].message.topic, exc)
            raise

    async def _commit(self, out: AggregatorOutput, events: Sequence[Any]) -> None:
        """State durable, then outputs durable; the caller acks the events afterwards."""
        await self._store(out, events, out.states)
        delays = backoff_delays()
        while True:  # the state is durable: re-sending the same triggers is safe
            try:
                await self._send_outputs(out)
                break
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.debug("sending a batch's outputs failed (%r); retrying", exc)
                await asyncio.sleep(next(delays))
        if out.triggers:
            # The triggers are on the topic: a takeover need not re-fire them.
            for trigger in out.triggers:
                flight = out.states[trigger.model_id].in_flight
                assert flight is not None
                flight.announced = True
            await self._store(out, events, {t.model_id for t in out.triggers})
        self.counted_samples += out.counted_samples
        self.triggers_sent += len(out.triggers)
        self.dead_letters_sent += len(out.dead_letters)
        if self.on_emit is not None and (out.triggers or out.dead_letters or out.counted_samples):
            result = self.on_emit(Emitted(len(out.triggers), len(out.dead_letters)))
            if result is not None:
                await result

    async def _send_outputs(self, out: AggregatorOutput) -> None:
        sends = [
            await self.triggers_topic.send(
                key=codec.encode_key(t.model_id), value=codec.encode_trigger(t)
            )
            for t in out.triggers
        ]
        sends += [
            await self.deadletter_topic.send(key=d.key, value=codec.encode_dead_letter(d))
            for d in out.dead_letters
        ]
        if sends:
            await asyncio.gather(*sends)

    async def _store(
        self, out: AggregatorOutput, events: Sequence[Any], model_ids: Iterable[str]
    ) -> None:
        """Writes the states of ``model_ids`` and awaits their changelog records. A model's
        state is written in the context of its last record's event (a tick's states in the
        tick's), so it lands in that partition of the changelog."""
        by_offset = {(e.message.partition, e.message.offset): e for e in events}
        for model_id in model_ids:
            state = out.states[model_id]
            record = out.last_record.get(model_id)
            event = by_offset[(record.partition, record.offset)] if record else events[-1]
            with _event_context(event):
                self.table[codec.encode_key(model_id)] = codec.encode_model_state(state.to_fields())
        await self.table.flush_changelog()


def _faust_app(
    settings: Settings, app_id: str, store: str, datadir: Path, web_enabled: bool
) -> faust.App:
    """The worker's Faust app: acks=all, manual offsets through acks, the durable table."""
    return faust.App(
        app_id,
        broker=f"kafka://{settings.bootstrap}",
        store=store,
        datadir=str(datadir),
        web_enabled=web_enabled,
        web_port=settings.worker_port,
        web_bind="127.0.0.1",
        topic_partitions=settings.features_partitions,
        topic_replication_factor=settings.replication_factor,
        table_standby_replicas=0,
        producer_acks=-1,
        producer_max_request_size=DEFAULT_MAX_REQUEST_SIZE,
        consumer_max_fetch_size=DEFAULT_MAX_REQUEST_SIZE,
        consumer_auto_offset_reset="earliest",
        # Unacked events are re-read after a restart; waiting for them at shutdown
        # would only delay it.
        stream_wait_empty=False,
        Table=DurableTable,
        autodiscover=False,
    )
