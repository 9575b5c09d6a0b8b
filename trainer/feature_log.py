"""The trainer's window on the feature log: one decoded :class:`FeatureCache` per model
(least recently used evicted), filled from the log by a group-less reader.

A job names its trigger's ranges; :meth:`FeatureLog.read` reads what the model's cache
lacks of those ranges' partitions *from the start of the log* to each range's end (a
sample's first copy decides which job trains it, so earlier offsets count too) and drops
what retention removed. The cache keeps what it read, so the next job of the model reads
only the new records.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from pipeline.errors import FedexError
from pipeline.lifecycle import Service
from pipeline.records import Backbone, Cut, OffsetRange
from trainer.dataset import FeatureCache

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer

log = logging.getLogger(__name__)


class FeatureLogTimeout(FedexError, TimeoutError):
    """Reading a job's ranges took too long (a broker outage): the job is retried."""


class FeatureLog(Service):
    """Per-model feature caches and the reader that fills them."""

    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str,
        client_id: str,
        max_push_samples: int,
        max_models: int = 8,
        read_timeout: float = 300.0,
    ) -> None:
        self.topic = topic
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._max_push_samples = max_push_samples
        self._max_models = max_models
        self._read_timeout = read_timeout
        self._caches: OrderedDict[str, FeatureCache] = OrderedDict()
        self._reader: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        from pipeline import clients

        if self._reader is not None:
            return
        reader = clients.make_consumer(
            bootstrap=self._bootstrap,
            group_id=None,
            client_id=self._client_id,
            auto_offset_reset="earliest",
        )
        await reader.start()
        self._reader = reader

    async def stop(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.stop()

    def cache_for(
        self, model_id: str, backbone: Backbone, cut: Cut, num_classes: int
    ) -> FeatureCache:
        cache = self._caches.get(model_id)
        if cache is None:
            cache = FeatureCache(
                model_id,
                backbone=backbone,
                cut=cut,
                num_classes=num_classes,
                max_push_samples=self._max_push_samples,
            )
            self._caches[model_id] = cache
            while len(self._caches) > self._max_models:
                self._caches.popitem(last=False)
        self._caches.move_to_end(model_id)
        return cache

    async def read(self, cache: FeatureCache, ranges: tuple[OffsetRange, ...]) -> int:
        """Read into the cache what it lacks of the ranges' partitions from the start of the
        log to each range's end (a sample's first copy decides its job, so earlier offsets
        count too; the cache keeps them for the next job); returns records read."""
        from aiokafka.structs import TopicPartition

        assert self._reader is not None
        reader, topic = self._reader, self.topic
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
                        raise FeatureLogTimeout(
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
