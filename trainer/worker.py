"""The trainer: training triggers in, model versions out.

A thin I/O shell around pure parts (:mod:`trainer.dataset` assembles the data,
:mod:`trainer.recipe` trains and judges, :mod:`trainer.training` runs a job's training
step, :mod:`trainer.publisher` on :mod:`pipeline.publishing` encodes and announces) and its
helpers (:mod:`trainer.feature_log` reads the log into per-model caches,
:mod:`trainer.champions` finds the champion's checkpoint, :mod:`trainer.ledger` keeps one
set of ranges per trigger id, :mod:`trainer.ownership` follows the group's rebalances;
:mod:`trainer.process` is the ``fedex trainer`` process).
One :class:`Trainer` per GPU, all in the consumer group ``<prefix>-trainers`` on the
trigger topic, one job at a time:

1. A trigger arrives. Its version is ``v<seq>`` of its id ``<model_id>:<seq>``. If the
   registry (a :class:`~pipeline.registry.RegistryFollower` on the model topic, synced to
   the topic's end first) already has that version, the job was done by someone (a
   redelivery, a re-fired trigger, a trainer killed after publishing): commit, nothing else.
2. A trigger whose id was seen with other ranges is refused (dead letter, metric). The
   trigger's partitions are read from the feature log's start to its ranges' ends into the
   model's :class:`~trainer.dataset.FeatureCache`, which only reads offsets it does not
   hold; the job's new samples are those whose first copy lies in its ranges.
   :mod:`trainer.replay` plans the job on the window the cache holds: the new samples that
   are not validation, a label- and device-stratified replay of earlier jobs' samples
   (``replay_max_samples``), and the model's fixed validation set (``val_fraction``,
   ``val_device_fraction``, ``val_max_samples``), never trained on.
3. The model's head is built by the zoo, warm-started from the best version's checkpoint
   (inline bytes kept from the model topic, the local checkpoint store, or the model server
   over HTTP; safetensors, sha256-checked), evaluated on the validation set (champion),
   trained in a worker thread (the event loop keeps heartbeating), evaluated again on the
   same set (challenger) and judged by the recipe's champion/challenger rule: best only when
   it beats the champion by more than ``promote_margin``.
4. The thawed layers go to the checkpoint store and the update to the model topic; only
   once the broker acknowledged it is the trigger's offset committed. A trainer killed
   anywhere before the commit leaves the trigger to the next owner of its partition, which
   retrains it or, when the version made it out, finds it published.

Before publishing, the trainer checks that it still owns the trigger's partition and that
the version is still unpublished, so a group rebalance mid-job yields one version. A broker
error on the way is waited out with backoff and the job retried; the trained candidate is
kept, so it trains once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter

from pipeline import codec
from pipeline.broker_health import (
    BrokerHealth,
    backoff_delays,
    is_transient,
)
from pipeline.checkpoints import (
    CheckpointStore,
    LocalCheckpointStore,
)
from pipeline.errors import FedexError
from pipeline.lifecycle import Service
from pipeline.publishing import VersionSpec, make_update_producer
from pipeline.records import (
    ModelUpdate,
    TrainingTrigger,
    version_for_trigger,
)
from pipeline.registry import ModelEntry, Registry, RegistryFollower
from pipeline.topics import Topics
from trainer.champions import Champions
from trainer.feature_log import FeatureLog
from trainer.job import (
    Candidate,
    JobAbandoned,
    JobError,
    JobOutcome,
    JobReport,
    check_device,
    job_seed,
)
from trainer.ledger import Refused, TriggerLedger
from trainer.ownership import PartitionOwnership
from trainer.publisher import VersionPublisher, version_spec
from trainer.training import JobHook, JobTraining

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import ConsumerRecord, TopicPartition

    from pipeline.settings import Settings

log = logging.getLogger(__name__)


class TrainerError(FedexError):
    """A trainer could not start or run; the message says what to fix."""


# --------------------------------------------------------------------------- the process


class Trainer(Service):
    """One trainer process's Kafka side: trigger consumer (group ``<prefix>-trainers``,
    manual commits), feature-log reader (no group), registry follower, update producer.

    ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``. ``store``
    defaults to the local store at ``settings.checkpoint_dir``. ``max_poll_interval_ms``
    must exceed the longest job: past it the member is dropped from the group (heartbeats
    alone do not keep it). ``on_job_started`` is called in the training thread right before
    training (tests use it to hold a job).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        device: str = "auto",
        store: CheckpointStore | None = None,
        client_id: str = "fedex-trainer",
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        max_poll_interval_ms: int | None = None,
        registry_timeout: float = 60.0,
        read_timeout: float = 300.0,
        threads: int | None = None,
        max_cached_models: int = 8,
        on_job_started: JobHook | None = None,
    ) -> None:
        self.settings = settings
        self.device = check_device(device)
        self.store: CheckpointStore = store or LocalCheckpointStore(settings.checkpoint_dir)
        self.topics = Topics(settings.topic_prefix)
        self.group_id = f"{settings.topic_prefix}-trainers"
        self.jobs: list[JobReport] = []
        self._client_id = client_id
        self._session_timeout_ms = session_timeout_ms
        self._heartbeat_interval_ms = heartbeat_interval_ms
        self._max_poll_interval_ms = max_poll_interval_ms or max(
            3_600_000, int(4 * settings.job_timeout_s * 1000)
        )
        self._registry_timeout = registry_timeout
        self._follower: RegistryFollower | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._ownership = PartitionOwnership()
        self._features = FeatureLog(
            bootstrap=settings.bootstrap,
            topic=self.topics.features,
            client_id=f"{client_id}-reader",
            max_push_samples=settings.max_push_samples,
            max_models=max_cached_models,
            read_timeout=read_timeout,
        )
        self._training = JobTraining(
            settings,
            device=self.device,
            threads=threads,
            should_stop=lambda: self._stopping,
            on_job_started=on_job_started,
        )
        self._champions = Champions(settings, self.store)
        self._publisher = VersionPublisher(settings, self.store, self.topics.models)
        #: The last trained candidate, kept so that a job retried after a broker outage
        #: publishes what it trained instead of training again.
        self._trained: tuple[str, Candidate, int] | None = None
        self.metrics_registry = CollectorRegistry(auto_describe=True)
        self.health = BrokerHealth(f"trainer {client_id}", registry=self.metrics_registry)
        self._jobs_metric = Counter(
            "fedex_trainer_jobs",
            "Triggers handled, by outcome.",
            ["outcome"],
            registry=self.metrics_registry,
        )
        self._ledger = TriggerLedger(self.topics.deadletter, self.metrics_registry)
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._started = False

    @property
    def registry(self) -> Registry:
        if self._follower is None:
            raise TrainerError("the trainer is not started")
        return self._follower.registry

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        from pipeline import clients

        try:
            self._follower = RegistryFollower(
                bootstrap=self.settings.bootstrap,
                topic=self.topics.models,
                on_update=self._on_update,
                client_id=f"{self._client_id}-registry",
            )
            await self._follower.start()
            await self._follower.wait_caught_up(self._registry_timeout)
            self._producer = make_update_producer(self.settings, client_id=self._client_id)
            await self._producer.start()
            self.health.probe = clients.metadata_probe(self._producer)
            await self.health.start()
            await self._features.start()
            self._consumer = clients.make_consumer(
                bootstrap=self.settings.bootstrap,
                group_id=self.group_id,
                client_id=self._client_id,
                auto_offset_reset="earliest",
                session_timeout_ms=self._session_timeout_ms,
                heartbeat_interval_ms=self._heartbeat_interval_ms,
                max_poll_interval_ms=self._max_poll_interval_ms,
                rebalance_timeout_ms=max(self._session_timeout_ms * 3, 30_000),
            )
            self._consumer.subscribe([self.topics.triggers], listener=self._ownership.listener())
            await self._consumer.start()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "trainer %s started on %s: group %s, %d models known",
            self._client_id,
            self.device,
            self.group_id,
            len(self.registry),
        )

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop taking triggers, let a running job finish its epoch (it is then abandoned,
        uncommitted), close every client. Idempotent."""
        self._stopping = True
        self._stop_requested.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
        await self._features.stop()
        for name in ("_consumer", "_producer"):
            client = getattr(self, name)
            setattr(self, name, None)
            if client is not None:
                try:
                    await client.stop()
                except Exception:
                    log.exception("stopping the trainer's %s failed", name.strip("_"))
        follower, self._follower = self._follower, None
        if follower is not None:
            await follower.stop()
        await self.health.stop()

    # ----------------------------------------------------------------- the loop

    async def run(self, max_jobs: int | None = None, idle_timeout: float | None = None) -> int:
        """Handle triggers one at a time until ``max_jobs`` are handled, no trigger came for
        ``idle_timeout`` seconds, or :meth:`stop`. Returns the number handled. A broker
        outage is waited out (with backoff), never a reason to exit."""
        from aiokafka.errors import ConsumerStoppedError

        if self._consumer is None:
            raise TrainerError("start the trainer before running it")
        handled = 0
        idle_since = time.monotonic()
        delays = backoff_delays()
        while not self._stopping and (max_jobs is None or handled < max_jobs):
            consumer = self._consumer
            if consumer is None:
                break
            try:
                batch = await consumer.getmany(timeout_ms=200, max_records=1)
            except ConsumerStoppedError:
                break
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.health.failed(exc)
                await self._pause(next(delays))
                continue
            delays = backoff_delays()
            records = [record for records in batch.values() for record in records]
            if not records:
                if idle_timeout is not None and time.monotonic() - idle_since > idle_timeout:
                    log.info("trainer idle for %.1f s, stopping", idle_timeout)
                    break
                continue
            self._idle.clear()
            try:
                report = await self._handle(consumer, records[0])
            finally:
                self._idle.set()
            self.jobs.append(report)
            self._jobs_metric.labels(report.outcome.value).inc()
            handled += 1
            idle_since = time.monotonic()
        return handled

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when the trainer is told to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_requested.wait(), seconds)

    async def _handle(
        self, consumer: AIOKafkaConsumer, record: ConsumerRecord[Any, Any]
    ) -> JobReport:
        """One trigger record to its end: trained and published (or found published),
        refused with a dead letter, or skipped; committed in every case except an abandoned
        job. Broker errors on the way are waited out and the job retried (it trains once:
        the trained candidate is kept)."""
        from aiokafka.structs import TopicPartition

        tp = TopicPartition(record.topic, record.partition)
        delays = backoff_delays()
        while True:
            try:
                report = await self._outcome(tp, record)
                if report.outcome is not JobOutcome.ABANDONED:
                    await self._commit(consumer, tp, record.offset)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.health.failed(exc)
                await self._pause(next(delays))
                if self._stopping:
                    return self._report(
                        record, None, JobOutcome.ABANDONED, "the trainer is stopping"
                    )
                continue
            self.health.ok()
            return report

    async def _outcome(self, tp: TopicPartition, record: ConsumerRecord[Any, Any]) -> JobReport:
        try:
            trigger = codec.decode_trigger(record.value)
        except codec.CodecError as exc:
            await self._ledger.refuse(self._producer, record, exc.reason.value, exc.message)
            return self._report(record, None, JobOutcome.REFUSED, str(exc))
        try:
            report = await self._job(trigger, tp, record.offset)
        except JobError as exc:
            report = self._report(record, trigger, JobOutcome.SKIPPED, str(exc))
            log.error("%s", report.summary())
        except Refused as exc:
            await self._ledger.refuse(self._producer, record, exc.reason, exc.message)
            report = self._report(record, trigger, JobOutcome.REFUSED, exc.message)
        except JobAbandoned as exc:
            report = self._report(record, trigger, JobOutcome.ABANDONED, str(exc))
            log.warning("%s", report.summary())
        else:
            log.info("%s", report.summary())
        return report

    @staticmethod
    def _report(
        record: ConsumerRecord[Any, Any],
        trigger: TrainingTrigger | None,
        outcome: JobOutcome,
        reason: str,
    ) -> JobReport:
        trigger_id, model_id = (trigger.trigger_id, trigger.model_id) if trigger else ("?", "?")
        return JobReport(trigger_id, model_id, None, outcome, reason, record.offset)

    async def _commit(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
        from aiokafka.errors import CommitFailedError, IllegalStateError

        try:
            await consumer.commit({tp: offset + 1})
        except (CommitFailedError, IllegalStateError) as exc:
            # The partition moved in a rebalance: its new owner sees the trigger again and
            # finds the version published (or trains it). Nothing is lost.
            log.warning(
                "commit of %s offset %d failed (%s); the next owner redoes it", tp, offset, exc
            )

    async def _job(self, trigger: TrainingTrigger, tp: TopicPartition, offset: int) -> JobReport:
        started = time.perf_counter()
        try:
            version = version_for_trigger(trigger.trigger_id, trigger.model_id)
        except FedexError as exc:
            raise JobError(str(exc)) from None
        await self._sync_registry()
        self._ledger.check(trigger)
        entry = self.registry.get(trigger.model_id)
        if entry is None:
            raise JobError(
                f"model {trigger.model_id!r} has no update on {self.topics.models}: "
                "register it (its v0) before training it"
            )
        if entry.version(version) is not None:
            return JobReport(
                trigger.trigger_id, trigger.model_id, version, JobOutcome.ALREADY_PUBLISHED,
                f"{version} is on the model topic", offset,
            )  # fmt: skip
        champion = entry.best
        assert champion is not None  # a registry entry has at least one version
        if trigger.base_version is not None and trigger.base_version != champion.version:
            log.info(
                "trigger %s names base %s; the registry's best is %s, training from it",
                trigger.trigger_id, trigger.base_version, champion.version,
            )  # fmt: skip
        candidate, records = await self._candidate(entry, trigger)

        if not await self._ownership.owns(tp, self._session_timeout_ms / 1000 * 3):
            raise JobAbandoned(f"partition {tp.partition} of {tp.topic} moved to another trainer")
        await self._sync_registry()
        if entry.version(version) is not None:
            return JobReport(
                trigger.trigger_id, trigger.model_id, version, JobOutcome.ALREADY_PUBLISHED,
                f"{version} appeared on the model topic while training", offset,
            )  # fmt: skip
        update = await self._publish(
            version_spec(entry, trigger, version, champion.version), candidate, trigger
        )
        return JobReport.published(
            trigger,
            version,
            offset,
            candidate,
            records_read=records,
            champion_version=champion.version,
            seconds=time.perf_counter() - started,
            update=update,
        )

    async def _candidate(
        self, entry: ModelEntry, trigger: TrainingTrigger
    ) -> tuple[Candidate, int]:
        """The trigger's dataset read from the log, trained from the champion (or the
        candidate kept from an attempt a broker error interrupted: no second champion
        fetch, read or training); and records read."""
        kept = self._trained
        if kept is not None and kept[0] == trigger.trigger_id:
            return kept[1], kept[2]
        champion_state = await self._champions.state(entry)
        cache = self._features.cache_for(
            entry.model_id, entry.backbone, entry.cut, entry.num_classes
        )
        records = await self._features.read(cache, trigger.ranges)
        seed = job_seed(trigger.trigger_id)
        # In a thread: hashing a large window's new rows and copying the job's samples
        # would hold up the event loop (heartbeats); nothing else touches the cache now.
        data = await asyncio.to_thread(self._training.assemble, cache, trigger, seed)
        candidate = await asyncio.to_thread(
            self._training.train, entry, trigger, champion_state, data, self._training.config(seed)
        )
        self._trained = (trigger.trigger_id, candidate, records)
        return candidate, records

    async def _publish(
        self, spec: VersionSpec, candidate: Candidate, trigger: TrainingTrigger
    ) -> ModelUpdate:
        """Store the checkpoint, announce the version (acknowledged) and fold it."""
        assert self._producer is not None
        update = await self._publisher.publish(self._producer, spec, candidate, trigger)
        self._trained = None
        # Fold our own update now: a redelivered trigger must find it even before the
        # follower reads it back (the follower then skips it as seen).
        if self.registry.apply(update) and update.checkpoint is not None:
            self._champions.keep(self.registry, update, update.checkpoint)
        return update

    # ----------------------------------------------------------------- registry & blobs

    def _on_update(self, update: ModelUpdate) -> None:
        # Synchronous on purpose: the follower folds a fetched batch without yielding to the
        # event loop, so once its position passes an offset the fold is complete.
        self._ledger.learn(update)
        if update.checkpoint is not None:
            self._champions.keep(self.registry, update, update.checkpoint)

    async def _sync_registry(self) -> None:
        """Fold the model topic up to its current end, so a version published by another
        trainer a moment ago is known."""
        assert self._follower is not None
        # A TimeoutError here is a broker outage: the job waits it out and retries.
        await self._follower.sync(self._registry_timeout)
