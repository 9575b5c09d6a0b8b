"""The trainer process: training triggers in, model versions out.

A thin I/O shell around pure parts (:mod:`trainer.dataset` assembles the data,
:mod:`trainer.recipe` trains and judges, :mod:`pipeline.publishing` encodes and announces).
One :class:`Trainer` per GPU, all in the consumer group ``<prefix>-trainers`` on the
trigger topic, one job at a time:

1. A trigger arrives. Its version is ``v<seq>`` of its id ``<model_id>:<seq>``. If the
   registry (a :class:`~pipeline.registry.RegistryFollower` on the model topic, synced to
   the topic's end first) already has that version, the job was done by someone (a
   redelivery, a re-fired trigger, a trainer killed after publishing): commit, nothing else.
2. The trigger's offset ranges are read from the feature log with a group-less consumer
   (assign + seek, stopping at each range's end) into the model's
   :class:`~trainer.dataset.FeatureCache`, which only reads offsets it does not hold.
3. The model's head is built by the zoo, warm-started from the best version's checkpoint
   (inline bytes kept from the model topic, the local checkpoint store, or the model server
   over HTTP; safetensors, sha256-checked), evaluated on the validation split (champion),
   trained in a worker thread (the event loop keeps heartbeating), evaluated again
   (challenger) and judged by the recipe's champion/challenger rule.
4. The thawed layers go to the checkpoint store and the update to the model topic; only
   once the broker acknowledged it is the trigger's offset committed. A trainer killed
   anywhere before the commit leaves the trigger to the next owner of its partition, which
   retrains it or, when the version made it out, finds it published.

Before publishing, the trainer checks that it still owns the trigger's partition and that
the version is still unpublished, so a group rebalance mid-job yields one version.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from torch import Tensor

from pipeline import codec
from pipeline.broker_health import (
    BrokerHealth,
    backoff_delays,
    install_noise_filter,
    is_transient,
)
from pipeline.checkpoints import (
    CheckpointError,
    CheckpointStore,
    LocalCheckpointStore,
    checkpoint_uri,
    decode_checkpoint,
)
from pipeline.errors import FedexError
from pipeline.lifecycle import Service
from pipeline.metrics_http import MetricsServer
from pipeline.publishing import (
    build_update,
    make_update_producer,
    publish_update,
)
from pipeline.records import (
    DeadLetter,
    ModelUpdate,
    OffsetRange,
    TrainingTrigger,
    now_ms,
    version_for_trigger,
)
from pipeline.registry import ModelEntry, Registry, RegistryFollower
from pipeline.topics import Topics
from trainer.dataset import Dataset, FeatureCache
from trainer.job import (
    Candidate,
    HeadCache,
    JobError,
    JobReport,
    Outcome,
    check_device,
    job_seed,
    train_candidate,
)
from trainer.recipe import (
    EpochStats,
    TrainConfig,
)

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import ConsumerRecord, TopicPartition

    from pipeline.settings import Settings

log = logging.getLogger(__name__)


class TrainerError(FedexError):
    """A trainer could not start or run; the message says what to fix."""


class _Abandoned(Exception):
    """The job stops without publishing or committing (partition lost, trainer stopping)."""


class _Refused(Exception):
    """The trigger is dead-lettered and committed, never trained: ``reason`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# --------------------------------------------------------------------------- the process


class _Ownership:
    """Which trigger partitions this member owns, from the group's rebalance callbacks."""

    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()
        self.stable = asyncio.Event()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.stable.clear()
        self.assigned -= set(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assigned = set(assigned)
        self.stable.set()

    async def owns(self, tp: TopicPartition, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stable.wait(), timeout)
        return self.stable.is_set() and tp in self.assigned


JobHook = Callable[[TrainingTrigger], None]


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
        self._read_timeout = read_timeout
        self._threads = threads
        self._max_cached_models = max_cached_models
        self._on_job_started = on_job_started
        self._follower: RegistryFollower | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._ownership = _Ownership()
        self._caches: OrderedDict[str, FeatureCache] = OrderedDict()
        self._heads = HeadCache()
        #: The best version's blob per model, as it came inline on the model topic.
        self._blobs: dict[str, tuple[str, bytes]] = {}
        #: The ranges of every trigger id seen (on the trigger topic, or in the
        #: ``trigger_ranges`` of a published version): one id, one set of ranges.
        self._trigger_ranges: dict[str, tuple[OffsetRange, ...]] = {}
        #: The last trained candidate, kept so that a job retried after a broker outage
        #: publishes what it trained instead of training again.
        self._trained: tuple[str, Candidate] | None = None
        self.metrics_registry = CollectorRegistry(auto_describe=True)
        self.health = BrokerHealth(f"trainer {client_id}", registry=self.metrics_registry)
        self._jobs_metric = Counter(
            "fedex_trainer_jobs",
            "Triggers handled, by outcome.",
            ["outcome"],
            registry=self.metrics_registry,
        )
        self._refused_metric = Counter(
            "fedex_trainer_triggers_refused",
            "Triggers dead-lettered instead of trained, by reason "
            "(trigger_conflict: an id seen with other ranges; or the codec's reason).",
            ["reason"],
            registry=self.metrics_registry,
        )
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
            self._reader = clients.make_consumer(
                bootstrap=self.settings.bootstrap,
                group_id=None,
                client_id=f"{self._client_id}-reader",
                auto_offset_reset="earliest",
            )
            await self._reader.start()
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
            self._consumer.subscribe([self.topics.triggers], listener=self._listener())
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

    def _listener(self) -> Any:
        from aiokafka import ConsumerRebalanceListener

        ownership = self._ownership

        class Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
                await ownership.on_partitions_revoked(revoked)

            async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
                await ownership.on_partitions_assigned(assigned)

        return Listener()

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop taking triggers, let a running job finish its epoch (it is then abandoned,
        uncommitted), close every client. Idempotent."""
        self._stopping = True
        self._stop_requested.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), drain_timeout)
        for name in ("_consumer", "_reader", "_producer"):
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
                if report.outcome is not Outcome.ABANDONED:
                    await self._commit(consumer, tp, record.offset)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.health.failed(exc)
                await self._pause(next(delays))
                if self._stopping:
                    return self._report(record, None, Outcome.ABANDONED, "the trainer is stopping")
                continue
            self.health.ok()
            return report

    async def _outcome(self, tp: TopicPartition, record: ConsumerRecord[Any, Any]) -> JobReport:
        try:
            trigger = codec.decode_trigger(record.value)
        except codec.CodecError as exc:
            await self._refuse(record, exc.reason.value, exc.message)
            return self._report(record, None, Outcome.REFUSED, str(exc))
        try:
            report = await self._job(trigger, tp, record.offset)
        except JobError as exc:
            report = self._report(record, trigger, Outcome.SKIPPED, str(exc))
            log.error("%s", report.summary())
        except _Refused as exc:
            await self._refuse(record, exc.reason, exc.message)
            report = self._report(record, trigger, Outcome.REFUSED, exc.message)
        except _Abandoned as exc:
            report = self._report(record, trigger, Outcome.ABANDONED, str(exc))
            log.warning("%s", report.summary())
        else:
            log.info("%s", report.summary())
        return report

    @staticmethod
    def _report(
        record: ConsumerRecord[Any, Any],
        trigger: TrainingTrigger | None,
        outcome: Outcome,
        reason: str,
    ) -> JobReport:
        trigger_id, model_id = (trigger.trigger_id, trigger.model_id) if trigger else ("?", "?")
        return JobReport(trigger_id, model_id, None, outcome, reason, record.offset)

    async def _refuse(self, record: ConsumerRecord[Any, Any], reason: str, message: str) -> None:
        """Dead-letter a trigger record that must not be trained, and count it."""
        log.error(
            "refusing the trigger at %s[%d]@%d: %s: %s",
            record.topic, record.partition, record.offset, reason, message,
        )  # fmt: skip
        letter = DeadLetter(
            original=bytes(record.value or b""),
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
            message=message,
            key=record.key,
            at_ms=now_ms(),
        )
        assert self._producer is not None
        await self._producer.send_and_wait(
            self.topics.deadletter, codec.encode_dead_letter(letter), key=record.key
        )
        self._refused_metric.labels(reason).inc()

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

    def _check_ranges(self, trigger: TrainingTrigger) -> None:
        """One trigger id, one set of ranges: a trigger whose id was seen with others is
        refused (training it would train another sample set under the same version)."""
        seen = self._trigger_ranges.setdefault(trigger.trigger_id, trigger.ranges)
        if seen != trigger.ranges:
            raise _Refused(
                codec.Reject.TRIGGER_CONFLICT.value,
                f"trigger {trigger.trigger_id} (attempt {trigger.attempt}) names "
                f"{_ranges(trigger.ranges)}, but this id was seen with {_ranges(seen)}: "
                "a trigger id has one set of ranges; the agents' bookkeeping is wrong",
            )

    # ----------------------------------------------------------------- one job

    async def _job(self, trigger: TrainingTrigger, tp: TopicPartition, offset: int) -> JobReport:
        started = time.perf_counter()
        try:
            version = version_for_trigger(trigger.trigger_id, trigger.model_id)
        except FedexError as exc:
            raise JobError(str(exc)) from None
        await self._sync_registry()
        self._check_ranges(trigger)
        entry = self.registry.get(trigger.model_id)
        if entry is None:
            raise JobError(
                f"model {trigger.model_id!r} has no update on {self.topics.models}: "
                "register it (its v0) before training it"
            )
        if entry.version(version) is not None:
            return JobReport(
                trigger.trigger_id, trigger.model_id, version, Outcome.ALREADY_PUBLISHED,
                f"{version} is on the model topic", offset,
            )  # fmt: skip
        champion = entry.best
        assert champion is not None  # a registry entry has at least one version
        if trigger.base_version is not None and trigger.base_version != champion.version:
            log.info(
                "trigger %s names base %s; the registry's best is %s, training from it",
                trigger.trigger_id, trigger.base_version, champion.version,
            )  # fmt: skip
        champion_state = await self._champion_state(entry)
        cache = self._cache_for(entry)
        records = await self._read(cache, trigger.ranges)
        dataset = cache.select(trigger.ranges)
        if len(dataset) == 0:
            raise JobError(
                f"no samples of {trigger.model_id!r} in {_ranges(trigger.ranges)} "
                f"({cache.stats.rejected_records} records rejected so far)"
            )
        train, val = dataset.split(self.settings.val_fraction)
        cfg = TrainConfig(
            epochs=self.settings.train_epochs,
            batch_size=self.settings.train_batch_size,
            lr=self.settings.train_lr,
            weight_decay=self.settings.train_weight_decay,
            seed=job_seed(trigger.trigger_id),
            device=self.device,
            threads=self._threads,
        )
        kept = self._trained
        if kept is not None and kept[0] == trigger.trigger_id:
            candidate = kept[1]  # trained before a broker error interrupted the job
        else:
            candidate = await asyncio.to_thread(
                self._train, entry, trigger, champion_state, train, val, cfg
            )
            self._trained = (trigger.trigger_id, candidate)

        if not await self._ownership.owns(tp, self._session_timeout_ms / 1000 * 3):
            raise _Abandoned(f"partition {tp.partition} of {tp.topic} moved to another trainer")
        await self._sync_registry()
        if entry.version(version) is not None:
            return JobReport(
                trigger.trigger_id, trigger.model_id, version, Outcome.ALREADY_PUBLISHED,
                f"{version} appeared on the model topic while training", offset,
            )  # fmt: skip
        update = await asyncio.to_thread(
            build_update,
            store=self.store,
            model_id=trigger.model_id,
            version=version,
            state_dict=candidate.state_dict,
            backbone=entry.backbone,
            cut=entry.cut,
            num_classes=entry.num_classes,
            metrics=candidate.metrics(),
            is_best=candidate.verdict.is_best,
            parent_version=champion.version,
            trigger_id=trigger.trigger_id,
            server_url=self.settings.server_url,
            max_message_bytes=self.settings.max_message_bytes,
            dtype=self.settings.checkpoint_dtype,
        )
        update = dataclasses.replace(update, trigger_ranges=trigger.ranges)
        assert self._producer is not None
        await publish_update(self._producer, self.topics.models, update)
        self._trained = None
        # Fold our own update now: a redelivered trigger must find it even before the
        # follower reads it back (the follower then skips it as seen).
        if self.registry.apply(update) and update.checkpoint is not None:
            self._keep_blob(update, update.checkpoint)
        train_seconds = candidate.result.seconds
        return JobReport(
            trigger_id=trigger.trigger_id,
            model_id=trigger.model_id,
            version=version,
            outcome=Outcome.PUBLISHED,
            reason=candidate.verdict.reason,
            offset=offset,
            train_samples=candidate.train_samples,
            val_samples=candidate.val_samples,
            records_read=records,
            champion_version=champion.version,
            champion_accuracy=candidate.champion_accuracy,
            challenger_accuracy=candidate.challenger_accuracy,
            is_best=candidate.verdict.is_best,
            train_seconds=train_seconds,
            seconds=time.perf_counter() - started,
            samples_per_s=candidate.result.samples_per_s,
            update=update,
        )

    def _train(
        self,
        entry: ModelEntry,
        trigger: TrainingTrigger,
        champion: Mapping[str, Tensor],
        train: Dataset,
        val: Dataset,
        cfg: TrainConfig,
    ) -> Candidate:
        """Runs in a worker thread: builds the head, trains and judges it."""
        head = self._heads.get(entry.backbone, entry.cut, entry.num_classes)
        if self._on_job_started is not None:
            self._on_job_started(trigger)
        log.info(
            "job %s: training %s/%s (%d classes) on %d samples, %d epochs, %s",
            trigger.trigger_id, entry.backbone, entry.cut, entry.num_classes,
            len(train), cfg.epochs, cfg.device,
        )  # fmt: skip

        def on_epoch(stats: EpochStats) -> None:
            if stats.seconds > 2.0:
                log.info(
                    "job %s: epoch %d/%d loss %.4f, %,.0f samples/s",
                    trigger.trigger_id, stats.epoch + 1, cfg.epochs, stats.mean_loss,
                    stats.samples_per_s,
                )  # fmt: skip
            if self._stopping:
                raise _Abandoned("the trainer is stopping")

        return train_candidate(head, champion, train, val, cfg, on_epoch=on_epoch)

    # ----------------------------------------------------------------- registry & blobs

    def _on_update(self, update: ModelUpdate) -> None:
        # Synchronous on purpose: the follower folds a fetched batch without yielding to the
        # event loop, so once its position passes an offset the fold is complete.
        if update.trigger_id is not None and update.trigger_ranges:
            self._trigger_ranges.setdefault(update.trigger_id, update.trigger_ranges)
        if update.checkpoint is not None:
            self._keep_blob(update, update.checkpoint)

    def _keep_blob(self, update: ModelUpdate, blob: bytes) -> None:
        entry = self.registry.get(update.model_id)
        if entry is not None and entry.best is not None and entry.best.version == update.version:
            self._blobs[update.model_id] = (update.version, blob)

    async def _sync_registry(self) -> None:
        """Fold the model topic up to its current end, so a version published by another
        trainer a moment ago is known."""
        assert self._follower is not None
        # A TimeoutError here is a broker outage: the job waits it out and retries.
        await self._follower.sync(self._registry_timeout)

    async def _champion_state(self, entry: ModelEntry) -> dict[str, Tensor]:
        best = entry.best
        assert best is not None
        blob: bytes | None = None
        kept = self._blobs.get(entry.model_id)
        if kept is not None and kept[0] == best.version:
            blob = kept[1]
        if blob is None:
            uri = checkpoint_uri(entry.model_id, best.version)
            with contextlib.suppress(CheckpointError):
                if self.store.exists(uri):
                    blob = await asyncio.to_thread(self.store.get, uri)
        if blob is None and best.checkpoint_uri.startswith(("http://", "https://")):
            blob = await self._download(entry.model_id, best.version, best.sha256)
        if blob is None:
            raise JobError(
                f"checkpoint of the champion {entry.model_id} {best.version} is neither inline, "
                f"in the store at {getattr(self.store, 'root', self.store)}, nor at "
                f"{best.checkpoint_uri}"
            )
        try:
            state, _ = decode_checkpoint(blob, expected_sha256=best.sha256)
        except CheckpointError as exc:
            raise JobError(f"champion {entry.model_id} {best.version}: {exc}") from None
        return state

    async def _download(self, model_id: str, version: str, sha256: str) -> bytes:
        """A champion that is only on the model server (by reference, another trainer's
        store): GET it with a token of our own, signed with the server's secret."""
        import aiohttp

        from pipeline.auth import issue_token
        from pipeline.download import ServerCallError, fetch_checkpoint

        secret = self.settings.auth_secret
        if not secret:
            raise JobError(
                f"the champion {model_id} {version} is only on the model server, which needs "
                "a token: set FEDEX_AUTH_SECRET for the trainer to the server's secret"
            )
        token = issue_token(secret, "trainer", [model_id], 600, time.time())
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
                blob = await fetch_checkpoint(
                    http, self.settings.server_url, token, model_id, version, expected_sha256=sha256
                )
        except ServerCallError as exc:
            raise JobError(f"champion {model_id} {version}: {exc}") from None
        assert blob is not None  # no ETag sent, so never a 304
        return blob

    def _cache_for(self, entry: ModelEntry) -> FeatureCache:
        cache = self._caches.get(entry.model_id)
        if cache is None:
            cache = FeatureCache(
                entry.model_id,
                backbone=entry.backbone,
                cut=entry.cut,
                num_classes=entry.num_classes,
                max_push_samples=self.settings.max_push_samples,
            )
            self._caches[entry.model_id] = cache
            while len(self._caches) > self._max_cached_models:
                self._caches.popitem(last=False)
        self._caches.move_to_end(entry.model_id)
        return cache

    # ----------------------------------------------------------------- the feature log

    async def _read(self, cache: FeatureCache, ranges: tuple[OffsetRange, ...]) -> int:
        """Read into the cache what it lacks of the ranges' partitions from the start of the
        log to each range's end (a sample's first copy decides its job, so earlier offsets
        count too; the cache keeps them for the next job); returns records read."""
        from aiokafka.structs import TopicPartition

        assert self._reader is not None
        reader, topic = self._reader, self.topics.features
        partitions = sorted({r.partition for r in ranges} | set(cache.held.partitions()))
        if not partitions:
            return 0
        tps = {p: TopicPartition(topic, p) for p in partitions}
        begins = await reader.beginning_offsets(list(tps.values()))
        dropped = cache.forget_before({p: begins[tp] for p, tp in tps.items()})
        if dropped:
            log.info(
                "feature cache of %s: %d samples left the training window", cache.model_id, dropped
            )
        for r in ranges:
            if r.start < begins[tps[r.partition]]:
                log.warning(
                    "offsets %d-%d of %s left the log (retention)",
                    r.start, begins[tps[r.partition]], tps[r.partition],
                )  # fmt: skip
        window = [OffsetRange(r.partition, begins[tps[r.partition]], r.end) for r in ranges]
        gaps = cache.missing(w for w in window if w.end > w.start)
        if not gaps:
            return 0
        ends = await reader.end_offsets(list(tps.values()))
        reader.assign([tps[p] for p in sorted({g.partition for g in gaps})])
        deadline = time.monotonic() + self._read_timeout
        records = 0
        for gap in gaps:
            tp = tps[gap.partition]
            start, end = gap.start, min(gap.end, ends[tp])
            if end < gap.end:
                log.warning("offsets %d-%d of %s are not in the log (yet)", end, gap.end, tp)
            if start < end:
                reader.seek(tp, start)
                while await reader.position(tp) < end:
                    if time.monotonic() > deadline:
                        raise TrainerError(
                            f"reading {tp.topic}[{tp.partition}] {start}-{end} took over "
                            f"{self._read_timeout:g} s"
                        )
                    batch = await reader.getmany(tp, timeout_ms=500)
                    for record in batch.get(tp, []):
                        if record.offset >= end:
                            break
                        cache.add_record(tp.partition, record.offset, record.key, record.value)
                        records += 1
            cache.mark_read(OffsetRange(gap.partition, gap.start, max(end, gap.start)))
        return records


def _ranges(ranges: tuple[OffsetRange, ...]) -> str:
    return ", ".join(f"{r.partition}:[{r.start},{r.end})" for r in ranges) or "no ranges"


# --------------------------------------------------------------------------- entry points


def run_trainer(
    settings: Settings,
    *,
    device: str = "auto",
    max_jobs: int | None = None,
    idle_timeout: float | None = None,
) -> None:
    """Run a trainer until SIGINT/SIGTERM, ``max_jobs`` handled or ``idle_timeout`` idle.
    Blocking; the entry point of ``fedex trainer``."""
    asyncio.run(_serve(settings, device=device, max_jobs=max_jobs, idle_timeout=idle_timeout))


async def _serve(
    settings: Settings, *, device: str, max_jobs: int | None, idle_timeout: float | None
) -> None:
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop_requested.set)
    trainer = Trainer(settings, device=device)
    install_noise_filter(trainer.health)
    metrics = MetricsServer(
        trainer.metrics_registry, host=settings.server_host, port=settings.trainer_metrics_port
    )
    async with trainer, metrics:
        run = asyncio.create_task(trainer.run(max_jobs=max_jobs, idle_timeout=idle_timeout))
        stop = asyncio.create_task(stop_requested.wait())
        await asyncio.wait([run, stop], return_when=asyncio.FIRST_COMPLETED)
        if not run.done():
            log.info("stopping: finishing the current epoch, leaving the job uncommitted")
            await trainer.stop()
        stop.cancel()
        handled = await run
    published = sum(1 for j in trainer.jobs if j.outcome is Outcome.PUBLISHED)
    log.info("trainer stopped: %d triggers handled, %d versions published", handled, published)
