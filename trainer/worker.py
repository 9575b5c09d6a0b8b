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
import enum
import hashlib
import logging
import math
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline import codec
from pipeline.checkpoints import (
    CheckpointError,
    CheckpointStore,
    LocalCheckpointStore,
    checkpoint_uri,
    decode_checkpoint,
)
from pipeline.errors import ConfigError, FedexError
from pipeline.lifecycle import Service
from pipeline.publishing import (
    build_update,
    make_update_producer,
    publish_update,
    version_for_trigger,
)
from pipeline.records import Backbone, Cut, ModelMetrics, ModelUpdate, OffsetRange, TrainingTrigger
from pipeline.registry import ModelEntry, Registry, RegistryFollower
from pipeline.topics import Topics
from trainer.dataset import Dataset, FeatureCache
from trainer.recipe import (
    EpochStats,
    TrainConfig,
    TrainResult,
    Verdict,
    champion_challenger,
    evaluate,
    resolve_device,
    train_head,
    warm_start,
)

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import ConsumerRecord, TopicPartition

    from pipeline.settings import Settings

log = logging.getLogger(__name__)


class TrainerError(FedexError):
    """A trainer could not start or run; the message says what to fix."""


class JobError(FedexError):
    """A trigger cannot be trained (unknown model, no samples, no champion checkpoint).
    The trigger is committed and skipped: the agents re-fire it if it still matters."""


class _Abandoned(Exception):
    """The job stops without publishing or committing (partition lost, trainer stopping)."""


class Outcome(enum.StrEnum):
    PUBLISHED = "published"
    ALREADY_PUBLISHED = "already_published"
    SKIPPED = "skipped"
    ABANDONED = "abandoned"


@dataclass(frozen=True, slots=True)
class JobReport:
    """What one trigger came to. Accuracies are on the job's validation split."""

    trigger_id: str
    model_id: str
    version: str | None
    outcome: Outcome
    reason: str = ""
    offset: int = -1
    train_samples: int = 0
    val_samples: int = 0
    records_read: int = 0
    champion_version: str | None = None
    champion_accuracy: float | None = None
    challenger_accuracy: float | None = None
    is_best: bool | None = None
    train_seconds: float = 0.0
    seconds: float = 0.0
    samples_per_s: float = 0.0
    update: ModelUpdate | None = None

    def summary(self) -> str:
        head = f"job {self.trigger_id} -> {self.version or '?'}: {self.outcome}"
        if self.outcome is not Outcome.PUBLISHED:
            return f"{head} ({self.reason})" if self.reason else head
        inline = self.update is not None and self.update.checkpoint is not None
        return (
            f"{head}; {self.train_samples} train / {self.val_samples} val samples "
            f"({self.records_read} records read), val acc {_fmt(self.champion_accuracy)} "
            f"({self.champion_version}) -> {_fmt(self.challenger_accuracy)} "
            f"{'best' if self.is_best else 'not best'}; train {self.train_seconds:.2f} s, "
            f"{self.samples_per_s:,.0f} samples/s, job {self.seconds:.2f} s; "
            f"checkpoint {self.update.size if self.update else 0:,} B "
            f"{'inline' if inline else 'by reference'}"
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


# --------------------------------------------------------------------------- the pure step


@dataclass(frozen=True, slots=True)
class Candidate:
    """A trained challenger next to its champion, judged on one validation split."""

    state_dict: dict[str, Tensor]
    champion_accuracy: float
    challenger_accuracy: float
    verdict: Verdict
    result: TrainResult
    train_samples: int
    val_samples: int

    def metrics(self) -> ModelMetrics:
        # A NaN cannot travel (JSON): an empty validation split reads 0.0 with val_samples 0.
        def number(value: float) -> float:
            return 0.0 if math.isnan(value) else value

        return ModelMetrics(
            val_accuracy=number(self.challenger_accuracy),
            champion_val_accuracy=None
            if math.isnan(self.champion_accuracy)
            else self.champion_accuracy,
            train_samples=self.train_samples,
            val_samples=self.val_samples,
            train_seconds=self.result.seconds,
            epochs=len(self.result.epochs),
        )


def train_candidate(
    head: nn.Module,
    champion: Mapping[str, Tensor] | None,
    train: Dataset,
    val: Dataset,
    cfg: TrainConfig,
    *,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> Candidate:
    """Warm-start ``head`` from ``champion`` (None: train from the head as it is), evaluate
    it, train it on ``train``, evaluate it again on the same ``val`` and judge. Pure apart
    from ``head``, which ends trained."""
    if len(train) == 0:
        raise JobError("no training samples: every sample fell in the validation split")
    if champion is not None:
        warm_start(head, champion)
    device = str(resolve_device(cfg.device))
    judged = len(val) > 0
    champion_acc = math.nan
    if champion is not None and judged:
        champion_acc = evaluate(head, val.features, val.labels, device=device)
    result = train_head(head, train.features, train.labels, cfg, on_epoch=on_epoch)
    challenger_acc = evaluate(head, val.features, val.labels, device=device) if judged else math.nan
    if champion is not None and not judged:
        # The recipe reads a NaN champion as "no champion"; with nothing to judge on, the
        # champion stays.
        verdict = Verdict(False, "empty validation split: champion kept")
    else:
        verdict = champion_challenger(
            challenger_acc, None if champion is None else champion_acc, val_samples=len(val)
        )
    state = {key: value.detach().to("cpu", copy=True) for key, value in head.state_dict().items()}
    return Candidate(
        state_dict=state,
        champion_accuracy=champion_acc,
        challenger_accuracy=challenger_acc,
        verdict=verdict,
        result=result,
        train_samples=len(train),
        val_samples=len(val),
    )


def job_seed(trigger_id: str) -> int:
    """Training seed of a trigger: a retrained trigger repeats its shuffles."""
    return int.from_bytes(hashlib.blake2b(trigger_id.encode(), digest_size=4).digest(), "little")


class HeadCache:
    """Built heads per (backbone, cut, num_classes), least recently used evicted. Building
    a backbone costs seconds; every job re-loads the champion's state into the head."""

    def __init__(self, size: int = 2) -> None:
        self._size = size
        self._heads: OrderedDict[tuple[Backbone, Cut, int], nn.Module] = OrderedDict()

    def get(self, backbone: Backbone, cut: Cut, num_classes: int) -> nn.Module:
        from pipeline.zoo import build_backbone, split

        key = (backbone, cut, num_classes)
        head = self._heads.get(key)
        if head is None:
            model = build_backbone(backbone, num_classes=num_classes)
            head = split(model, backbone, cut).head
            self._heads[key] = head
            while len(self._heads) > self._size:
                self._heads.popitem(last=False)
        self._heads.move_to_end(key)
        return head


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
        self.device = _check_device(device)
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
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
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

    # ----------------------------------------------------------------- the loop

    async def run(self, max_jobs: int | None = None, idle_timeout: float | None = None) -> int:
        """Handle triggers one at a time until ``max_jobs`` are handled, no trigger came for
        ``idle_timeout`` seconds, or :meth:`stop`. Returns the number handled."""
        from aiokafka.errors import ConsumerStoppedError

        if self._consumer is None:
            raise TrainerError("start the trainer before running it")
        handled = 0
        idle_since = time.monotonic()
        while not self._stopping and (max_jobs is None or handled < max_jobs):
            consumer = self._consumer
            if consumer is None:
                break
            try:
                batch = await consumer.getmany(timeout_ms=200, max_records=1)
            except ConsumerStoppedError:
                break
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
            handled += 1
            idle_since = time.monotonic()
        return handled

    async def _handle(
        self, consumer: AIOKafkaConsumer, record: ConsumerRecord[Any, Any]
    ) -> JobReport:
        from aiokafka.structs import TopicPartition

        tp = TopicPartition(record.topic, record.partition)
        try:
            trigger = codec.decode_trigger(record.value)
        except codec.CodecError as exc:
            log.error("skipping a bad trigger at %s:%d: %s", tp.topic, record.offset, exc)
            await self._commit(consumer, tp, record.offset)
            return JobReport("?", "?", None, Outcome.SKIPPED, str(exc), record.offset)
        try:
            report = await self._job(trigger, tp, record.offset)
        except JobError as exc:
            report = JobReport(
                trigger.trigger_id, trigger.model_id, None, Outcome.SKIPPED, str(exc), record.offset
            )
            log.error("%s", report.summary())
        except _Abandoned as exc:
            report = JobReport(
                trigger.trigger_id,
                trigger.model_id,
                None,
                Outcome.ABANDONED,
                str(exc),
                record.offset,
            )
            log.warning("%s", report.summary())
            return report
        else:
            log.info("%s", report.summary())
        await self._commit(consumer, tp, record.offset)
        return report

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

    # ----------------------------------------------------------------- one job

    async def _job(self, trigger: TrainingTrigger, tp: TopicPartition, offset: int) -> JobReport:
        started = time.perf_counter()
        try:
            version = version_for_trigger(trigger.trigger_id, trigger.model_id)
        except FedexError as exc:
            raise JobError(str(exc)) from None
        await self._sync_registry()
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
        candidate = await asyncio.to_thread(
            self._train, entry, trigger, champion_state, train, val, cfg
        )

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
        assert self._producer is not None
        await publish_update(self._producer, self.topics.models, update)
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
        try:
            await self._follower.sync(self._registry_timeout)
        except TimeoutError as exc:
            raise TrainerError(f"{exc}; is the broker healthy?") from exc

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
            blob = await fetch_checkpoint(best.checkpoint_uri)
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
        """Read the parts of ``ranges`` the cache lacks into it; returns records read."""
        from aiokafka.structs import TopicPartition

        assert self._reader is not None
        reader, topic = self._reader, self.topics.features
        gaps = cache.missing(ranges)
        partitions = sorted({g.partition for g in gaps} | set(cache.held.partitions()))
        if not partitions:
            return 0
        tps = {p: TopicPartition(topic, p) for p in partitions}
        begins = await reader.beginning_offsets(list(tps.values()))
        dropped = cache.forget_before({p: begins[tp] for p, tp in tps.items()})
        if dropped:
            log.info(
                "feature cache of %s: %d samples left the training window", cache.model_id, dropped
            )
        if not gaps:
            return 0
        ends = await reader.end_offsets(list(tps.values()))
        reader.assign([tps[p] for p in sorted({g.partition for g in gaps})])
        deadline = time.monotonic() + self._read_timeout
        records = 0
        for gap in gaps:
            tp = tps[gap.partition]
            start, end = max(gap.start, begins[tp]), min(gap.end, ends[tp])
            if start > gap.start:
                log.warning("offsets %d-%d of %s left the log (retention)", gap.start, start, tp)
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


def _check_device(device: str) -> str:
    try:
        resolved = resolve_device(device)
    except RuntimeError as exc:
        raise ConfigError(
            f"device {device!r} is not a torch device: use auto, cpu, cuda or cuda:N"
        ) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA devices here"
            )
    elif resolved.type != "cpu":
        raise ConfigError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return str(resolved)


async def fetch_checkpoint(url: str, *, timeout: float = 120.0) -> bytes:
    """GET a checkpoint from the model server (the caller verifies its sha256)."""
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url) as response,
        ):
            if response.status != 200:
                raise JobError(f"GET {url} answered {response.status}")
            return await response.read()
    except aiohttp.ClientError as exc:
        raise JobError(f"GET {url} failed: {exc}") from exc


# --------------------------------------------------------------------------- entry points


def run_trainer(
    settings: Settings,
    *,
    device: str = "auto",
    max_jobs: int | None = None,
    idle_timeout: float | None = None,
) -> None:
    """Run a trainer until SIGINT/SIGTERM, ``max_jobs`` handled or ``idle_timeout`` idle.
    Blocking; the entry point of ``fedex trainer`` and ``python -m trainer``."""
    asyncio.run(_serve(settings, device=device, max_jobs=max_jobs, idle_timeout=idle_timeout))


async def _serve(
    settings: Settings, *, device: str, max_jobs: int | None, idle_timeout: float | None
) -> None:
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop_requested.set)
    async with Trainer(settings, device=device) as trainer:
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


def synthetic_dataset(
    samples: int, num_classes: int, *, dim: int = 512, seed: int = 0, spread: float = 1.0
) -> Dataset:
    """Separable float16 features (a centre per class plus noise) for tests and benches."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(seed + 1).normal(size=(num_classes, dim)) * spread
    labels = rng.integers(0, num_classes, size=samples)
    features = (centres[labels] + rng.normal(size=(samples, dim))).astype(np.float16)
    return Dataset(
        features=features,
        labels=labels.astype(np.int64),
        device_ids=tuple(f"dev-{i % 100:03d}" for i in range(samples)),
        sample_ids=np.arange(samples, dtype=np.uint64),
    )


def measure_job(
    *,
    samples: int = 20_000,
    num_classes: int = 1000,
    epochs: int = 5,
    batch_size: int = 256,
    device: str = "auto",
    backbone: Backbone = Backbone.INCEPTION_RESNET_V1,
    val_fraction: float = 0.1,
) -> dict[str, float | int | str]:
    """Time one job's compute as the trainer runs it (split, warm start, champion eval,
    training, challenger eval, checkpoint encoding) on synthetic freeze6 features. No
    Kafka. Returns the numbers the summary line reports."""
    from pipeline.checkpoints import encode_checkpoint
    from pipeline.publishing import random_head_state

    dev = _check_device(device)
    dataset = synthetic_dataset(samples, num_classes)
    t0 = time.perf_counter()
    train, val = dataset.split(val_fraction)
    split_s = time.perf_counter() - t0
    head = HeadCache().get(backbone, Cut.FREEZE6, num_classes)
    champion = random_head_state(backbone, Cut.FREEZE6, num_classes, seed=1)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, device=dev, seed=0)
    t0 = time.perf_counter()
    candidate = train_candidate(head, champion, train, val, cfg)
    job_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    blob = encode_checkpoint(candidate.state_dict, dtype="fp16")
    encode_s = time.perf_counter() - t0
    return {
        "device": dev,
        "samples": samples,
        "train_samples": candidate.train_samples,
        "val_samples": candidate.val_samples,
        "num_classes": num_classes,
        "epochs": epochs,
        "batch_size": batch_size,
        "split_seconds": split_s,
        "train_seconds": candidate.result.seconds,
        "train_samples_per_s": candidate.result.samples_per_s,
        "job_seconds": job_s + split_s + encode_s,
        "job_samples_per_s": candidate.train_samples * epochs / (job_s + split_s + encode_s),
        "champion_accuracy": candidate.champion_accuracy,
        "challenger_accuracy": candidate.challenger_accuracy,
        "checkpoint_bytes": len(blob),
    }
