"""The subscription side of a fleet process: model updates in, new heads on devices out.

One :class:`ModelSubscriber` per fleet process follows the model topic with one group-less
aiokafka consumer (from the start, so a late-joining process learns the current best) and
fans each new version out to the process's devices:

1. **Get the blob once per process.** Inline on the topic when it fits (its sha256 is still
   verified), else by reference from the model server with
   :func:`pipeline.download.fetch_checkpoint` (streams and verifies sha256). ``prefer_http``
   forces the HTTP download even for inline updates, so the model server carries the load.
   A failed download is retried ``download_attempts`` times with exponential backoff
   (the server may fold the update a moment after this process sees it: ``unknown_version``
   is retried) before the version is refused.
2. **Decode, load and evaluate once per process and version** in a worker thread
   (:func:`asyncio.to_thread`), so the event loop stays responsive: the head of the
   model is loaded with the checkpoint and :meth:`HeldOutSet.evaluate` measures every
   device's accuracy on its held-out rows with one batched forward pass.
3. **Report.** ``on_version(VersionEvent)`` for every version that verified and loaded;
   ``on_refused(RefusedVersion)`` for one that did not (the devices keep their head).

Which version a device runs: every version marked ``is_best`` (or the first version a
process sees of a model, as the registry does) is *activated*: it becomes
``subscriber.active[model_id]`` and its event says ``activated=True``. Other versions are
evaluated and reported (``activated=False``) but devices keep the best head. When a
process starts, the updates already on the topic are folded without downloading and only
each subscribed model's current best is fetched and reported (``replayed=True``); every
update produced after that is processed in topic order.

Freshness: the subscriber also follows the triggers topic (a second group-less consumer,
tiny records) and attaches to each event the feature-log ranges its trigger covered
(``covers``). A push acked at (partition, offset) is included by the first version for
which :func:`covers_offset` is true.

Device-side timing is the fleet's: :func:`activation_times` adds per-device simulated
transfer seconds (``device_sim.network``) to ``ready_at``; :func:`fanout_seconds` reads the
time until a quantile of devices runs the new head.

Optionally ``real_pull_fraction`` of each model's devices make real conditional HTTP pulls
of every activated version (``If-None-Match`` with the sha256 they ran before: 200 and the
blob; then the new sha256: 304), in the background, to load the model server; the
outcomes are counted in :attr:`ModelSubscriber.stats`.

API (the pure parts live in :mod:`device_sim.evaluation`, re-exported here)::

    HeldOutSet.for_devices(bank, model_id, vendors, identities) -> HeldOutSet
    ModelSubscriber(*, bootstrap, models_topic, held_out, on_version=None, on_refused=None,
                    triggers_topic=None, server_url=None, token=None, prefer_http=False,
                    real_pull_fraction=0.0, ...)        # start()/stop()/async with
      .wait_caught_up(timeout) / .wait_version(model_id, version, timeout) / .wait_pulls()
      .active: dict[model_id, VersionEvent]   .stats: SubscriberStats
    VersionEvent, RefusedVersion, RefusalReason
    activation_times(ready_at, transfer_s=None, devices=None) -> float64[devices]
    fanout_seconds(produced_at, activation_at, quantile=0.99) -> float
    covers_offset(covers, partition, offset) -> bool
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from device_sim.evaluation import (
    HeldOutSet,
    RefusalReason,
    Refused,
    RefusedVersion,
    TriggerIndex,
    VersionEvent,
    load_checkpoint,
    mean_accuracy,
    verify_blob,
)
from pipeline import codec
from pipeline.errors import FedexError
from pipeline.lifecycle import Service
from pipeline.records import ModelUpdate, OffsetRange
from pipeline.tail import TopicTail, wait_until

if TYPE_CHECKING:
    import aiohttp
    from aiokafka import ConsumerRecord, TopicPartition
    from torch import Tensor, nn


log = logging.getLogger(__name__)

#: Server reasons worth another attempt: the server has not folded the update yet, or
#: the failure is transient (no HTTP answer, a 5xx, bytes that did not hash right).
RETRYABLE: Final = frozenset({"unknown_model", "unknown_version", "connection", "sha256_mismatch"})


#: Long-poll of the triggers consumer (see ``ModelSubscriber.__init__``).
TRIGGER_FETCH_WAIT_MS: Final = 100

#: Outcomes :meth:`ModelSubscriber.wait_version` remembers (the oldest are forgotten).
MAX_OUTCOMES: Final = 1024


@dataclass(slots=True)
class SubscriberStats:
    """Counters of one subscriber (read them any time; they only grow)."""

    updates_seen: int = 0
    ignored: int = 0  # updates of models this process does not subscribe to
    duplicates: int = 0
    bad_records: int = 0
    versions: int = 0  # verified, loaded and evaluated
    activated: int = 0
    refused: int = 0
    inline_bytes: int = 0
    http_downloads: int = 0
    bytes_downloaded: int = 0
    download_retries: int = 0
    eval_seconds: float = 0.0
    triggers_seen: int = 0
    pulls_200: int = 0
    pulls_304: int = 0
    pull_errors: int = 0


VersionCallback = Callable[[VersionEvent], Awaitable[None] | None]
RefusedCallback = Callable[[RefusedVersion], Awaitable[None] | None]


class ModelSubscriber(Service):
    """Follows the model topic for the models of ``held_out`` and fans versions out to the
    process's devices (module docstring). ``start()`` / idempotent ``stop()`` / ``async
    with``; a crash of the follow loop (an exception raised by a callback included) fails
    whoever waits on it.

    ``server_url`` (and ``token``, a bearer token granting the models) are needed for
    by-reference updates, ``prefer_http`` and real pulls. ``real_pull_fraction`` of each
    model's devices (picked with ``seed``) make real conditional pulls of activated
    versions, ``pull_concurrency`` at a time.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        models_topic: str,
        held_out: Mapping[str, HeldOutSet],
        on_version: VersionCallback | None = None,
        on_refused: RefusedCallback | None = None,
        triggers_topic: str | None = None,
        server_url: str | None = None,
        token: str | None = None,
        prefer_http: bool = False,
        real_pull_fraction: float = 0.0,
        pull_concurrency: int = 8,
        download_attempts: int = 6,
        retry_delay: float = 0.05,
        trigger_wait: float = 2.0,
        seed: int = 0,
        client_id: str = "fedex-fleet",
    ) -> None:
        if not 0.0 <= real_pull_fraction <= 1.0:
            raise ValueError(f"real_pull_fraction must be in [0, 1], got {real_pull_fraction}")
        if (prefer_http or real_pull_fraction > 0) and not server_url:
            raise ValueError("prefer_http and real pulls need server_url")
        if download_attempts < 1:
            raise ValueError("download_attempts must be ≥ 1")
        self.held_out = dict(held_out)
        self.stats = SubscriberStats()
        self.triggers = TriggerIndex()
        #: The version each model's devices run (the last activated one).
        self.active: dict[str, VersionEvent] = {}
        self._on_version = on_version
        self._on_refused = on_refused
        self._server_url = server_url
        self._token = token or ""
        self._prefer_http = prefer_http
        self._attempts = download_attempts
        self._retry_delay = retry_delay
        self._trigger_wait = trigger_wait
        self._pull_concurrency = max(1, pull_concurrency)
        rng = np.random.default_rng(seed)
        self._pullers = {
            m: np.sort(rng.choice(h.devices, round(real_pull_fraction * h.devices), replace=False))
            for m, h in sorted(self.held_out.items())
        }
        self._models = TopicTail(bootstrap=bootstrap, topic=models_topic, client_id=client_id)
        self._trigger_tail = (
            TopicTail(
                bootstrap=bootstrap,
                topic=triggers_topic,
                client_id=f"{client_id}-triggers",
                # Short long-polls: a sync() for a trigger not yet folded asks for end
                # offsets on this connection, and the broker answers it only after the
                # fetch in flight.
                fetch_max_wait_ms=TRIGGER_FETCH_WAIT_MS,
            )
            if triggers_topic
            else None
        )
        self._heads: dict[str, nn.Module] = {}
        self._seen: set[tuple[str, str]] = set()
        self._outcomes: dict[tuple[str, str], VersionEvent | RefusedVersion] = {}
        self._news = asyncio.Event()
        self._pending: dict[str, tuple[ModelUpdate, float, TopicPartition]] = {}
        self._caught_up = False
        self._task: asyncio.Task[None] | None = None
        self._trigger_task: asyncio.Task[None] | None = None
        self._pulls: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None

    # ---------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._task is not None:
            return
        try:
            # The head templates (one per model) are built once, off the event loop.
            self._heads = await asyncio.to_thread(self._build_heads)
            if self._server_url:
                import aiohttp

                self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
            if self._trigger_tail is not None:
                await self._trigger_tail.open()
                self._trigger_task = asyncio.create_task(
                    self._follow_triggers(self._trigger_tail), name="subscriber-triggers"
                )
            await self._models.open()
            self._caught_up = self._models.caught_up_with(self._models.start_ends)
        except BaseException:
            await self.stop()
            raise
        self._task = asyncio.create_task(self._follow_models(), name="subscriber-models")

    async def stop(self) -> None:
        tasks = [self._task, self._trigger_task, *self._pulls]
        self._task = self._trigger_task = None
        self._pulls.clear()
        for task in tasks:
            if task is not None:
                task.cancel()
        for task in tasks:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self._models.close()
        if self._trigger_tail is not None:
            await self._trigger_tail.close()
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    def _build_heads(self) -> dict[str, nn.Module]:
        from device_sim.heads import new_head

        return {
            m: new_head(h.backbone, h.cut, h.num_classes).eval()
            for m, h in sorted(self.held_out.items())
        }

    # ---------------------------------------------------------------------- waiting

    def _running(self) -> asyncio.Task[None]:
        if self._task is None:
            raise FedexError("the model subscriber is not started")
        return self._task

    def _notify(self) -> None:
        self._news.set()
        self._news = asyncio.Event()

    async def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Returns once the updates on the topic at start-up are folded and each subscribed
        model's best of them is activated (or refused)."""
        task = self._running()
        await wait_until(
            lambda: self._caught_up,
            lambda: self._news,
            task,
            timeout,
            f"caught up with {self._models.topic!r}",
        )

    async def wait_version(
        self, model_id: str, version: str, timeout: float = 30.0
    ) -> VersionEvent | RefusedVersion:
        """The outcome of ``model_id``/``version`` once this process has processed it (an
        event without ``state_dict``: :attr:`active` holds the weights devices run)."""
        key = (model_id, version)
        await wait_until(
            lambda: key in self._outcomes,
            lambda: self._news,
            self._running(),
            timeout,
            f"{model_id}/{version} processed",
        )
        return self._outcomes[key]

    async def wait_pulls(self) -> None:
        """Returns once the real pulls started so far are done."""
        while self._pulls:
            await asyncio.gather(*list(self._pulls), return_exceptions=True)

    # ---------------------------------------------------------------------- the loops

    async def _follow_triggers(self, tail: TopicTail) -> None:
        while True:
            for records in (await tail.fetch()).values():
                for record in records:
                    self._fold_trigger(record.value)
            await tail.advance()

    def _fold_trigger(self, value: bytes | None) -> None:
        if value is None:
            return
        try:
            trigger = codec.decode_trigger(value)
        except codec.CodecError as exc:
            self.stats.bad_records += 1
            log.warning("skipping a bad trigger: %s", exc)
            return
        if trigger.model_id in self.held_out:
            self.stats.triggers_seen += 1
            self.triggers.add(trigger)

    async def _follow_models(self) -> None:
        tail = self._models
        while True:
            for tp, records in (await tail.fetch()).items():
                for record in records:
                    await self._on_record(tp, record)
            await tail.advance()
            if not self._caught_up:
                await self._flush_caught_up()
            self._notify()

    async def _flush_caught_up(self) -> None:
        """After start-up, once a partition's history is folded, process the current best
        of each of its models; the subscriber is caught up when all partitions are."""
        tail = self._models
        for model_id, (update, produced_at, tp) in list(self._pending.items()):
            if tail.folded.get(tp, 0) >= tail.start_ends.get(tp, 0):
                del self._pending[model_id]
                await self._process(update, produced_at, time.time(), replayed=True)
        if not self._pending and tail.caught_up_with(tail.start_ends):
            self._caught_up = True

    async def _on_record(self, tp: TopicPartition, record: ConsumerRecord[Any, Any]) -> None:
        if record.value is None:  # a compaction tombstone
            return
        received_at = time.time()
        try:
            update = codec.decode_update(record.value)
        except codec.CodecError as exc:
            self.stats.bad_records += 1
            log.warning("skipping a bad model update at %s@%d: %s", tp, record.offset, exc)
            return
        self.stats.updates_seen += 1
        if update.model_id not in self.held_out:
            self.stats.ignored += 1
            return
        key = (update.model_id, update.version)
        if key in self._seen:
            self.stats.duplicates += 1
            return
        self._seen.add(key)
        produced_at = record.timestamp / 1000.0
        if record.offset < self._models.start_ends.get(tp, 0):
            # History: remember only the best; it is fetched once the partition is folded.
            pending = self._pending.get(update.model_id)
            if update.is_best or pending is None:
                self._pending[update.model_id] = (update, produced_at, tp)
            return
        pending = self._pending.pop(update.model_id, None)
        if pending is not None:  # the model's history ended on this very partition
            await self._process(pending[0], pending[1], received_at, replayed=True)
        await self._process(update, produced_at, received_at, replayed=False)

    # ---------------------------------------------------------------------- one version

    async def _process(
        self, update: ModelUpdate, produced_at: float, received_at: float, *, replayed: bool
    ) -> None:
        held_out = self.held_out[update.model_id]
        previous = self.active.get(update.model_id)
        activate = update.is_best or previous is None
        # The trigger's ranges are looked up while the blob is fetched and evaluated.
        covers_task = asyncio.ensure_future(self._covers(update.trigger_id))
        try:
            if update.checkpoint is not None and not self._prefer_http:
                blob, source, verified = update.checkpoint, "inline", False
                self.stats.inline_bytes += len(blob)
            else:
                blob, source, verified = await self._download(update), "http", True
            head = self._heads[update.model_id]
            started = time.perf_counter()
            state, accuracy = await asyncio.to_thread(
                self._load_and_evaluate, head, held_out, update, blob, verified
            )
            eval_seconds = time.perf_counter() - started
            covers = await covers_task
        except Refused as exc:
            await self._refuse(update, exc, produced_at)
            return
        finally:
            covers_task.cancel()
        self.stats.versions += 1
        self.stats.eval_seconds += eval_seconds
        event = VersionEvent(
            activated=activate,
            replayed=replayed,
            update=replace(update, checkpoint=None),
            source=source,
            accuracy=accuracy,
            mean_accuracy=mean_accuracy(accuracy),
            produced_at=produced_at,
            received_at=received_at,
            ready_at=time.time(),
            eval_seconds=eval_seconds,
            covers=covers,
            state_dict=state,
        )
        if activate:
            self.active[update.model_id] = event
            self.stats.activated += 1
            self._start_pulls(event, previous)
        await _call(self._on_version, event)
        self._record(event)

    @staticmethod
    def _load_and_evaluate(
        head: nn.Module, held_out: HeldOutSet, update: ModelUpdate, blob: bytes, verified: bool
    ) -> tuple[dict[str, Tensor], npt.NDArray[np.float32]]:
        if not verified:
            verify_blob(update, blob)
        state = load_checkpoint(head, held_out, update, blob)
        return state, held_out.evaluate(head)

    async def _covers(self, trigger_id: str | None) -> tuple[OffsetRange, ...]:
        if trigger_id is None or self._trigger_tail is None:
            return ()
        covers = self.triggers.covers(trigger_id)
        if covers is None:
            # The trigger was produced before its version: catch up with the topic now.
            try:
                await self._trigger_tail.sync(self._trigger_task, self._trigger_wait)
            except Exception as exc:  # best effort: covers stay empty, the version goes on
                log.warning(
                    "trigger %s not found on %s: %s", trigger_id, self._trigger_tail.topic, exc
                )
            covers = self.triggers.covers(trigger_id)
        return covers or ()

    async def _download(self, update: ModelUpdate) -> bytes:
        from pipeline.download import DownloadError, fetch_checkpoint

        if self._http is None or not self._server_url:
            raise Refused(
                RefusalReason.DOWNLOAD_FAILED,
                f"{update.model_id}/{update.version} is by reference and the subscriber has "
                "no server_url",
            )
        delay = self._retry_delay
        for attempt in range(1, self._attempts + 1):
            try:
                blob = await fetch_checkpoint(
                    self._http,
                    self._server_url,
                    self._token,
                    update.model_id,
                    update.version,
                    expected_sha256=update.sha256,
                )
            except DownloadError as exc:
                retry = exc.reason in RETRYABLE or (exc.status or 0) >= 500
                if attempt < self._attempts and retry:
                    self.stats.download_retries += 1
                    log.info(
                        "download of %s/%s failed (%s), retrying in %.2f s",
                        update.model_id,
                        update.version,
                        exc.reason,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                reason = (
                    RefusalReason.SHA256_MISMATCH
                    if exc.reason == "sha256_mismatch"
                    else RefusalReason.DOWNLOAD_FAILED
                )
                raise Refused(reason, f"after {attempt} attempt(s): {exc}") from None
            if blob is None:  # only an If-None-Match request may get a 304
                raise Refused(RefusalReason.DOWNLOAD_FAILED, "unexpected 304 without a validator")
            self.stats.http_downloads += 1
            self.stats.bytes_downloaded += len(blob)
            return blob
        raise AssertionError("unreachable")

    async def _refuse(self, update: ModelUpdate, exc: Refused, produced_at: float) -> None:
        self.stats.refused += 1
        log.error("refused %s/%s: %s", update.model_id, update.version, exc)
        refused = RefusedVersion.of(update, exc, produced_at)
        await _call(self._on_refused, refused)
        self._record(refused)

    def _record(self, outcome: VersionEvent | RefusedVersion) -> None:
        # Kept slim (no weights) and bounded: the active version holds the weights.
        if isinstance(outcome, VersionEvent):
            outcome = replace(outcome, state_dict={})
        self._outcomes[(outcome.model_id, outcome.version)] = outcome
        while len(self._outcomes) > MAX_OUTCOMES:
            del self._outcomes[next(iter(self._outcomes))]
        self._notify()

    # ---------------------------------------------------------------------- real pulls

    def _start_pulls(self, event: VersionEvent, previous: VersionEvent | None) -> None:
        devices = self._pullers.get(event.model_id)
        if devices is None or devices.size == 0:
            return
        before = previous.update.sha256 if previous is not None else None
        task = asyncio.create_task(
            self._pull_all(event.update, before, int(devices.size)),
            name=f"pulls-{event.model_id}-{event.version}",
        )
        self._pulls.add(task)
        task.add_done_callback(self._pulls.discard)

    async def _pull_all(self, update: ModelUpdate, before: str | None, devices: int) -> None:
        gate = asyncio.Semaphore(self._pull_concurrency)

        async def one() -> None:
            async with gate:
                await self._pull(update, before)

        await asyncio.gather(*(one() for _ in range(devices)))

    async def _pull(self, update: ModelUpdate, before: str | None) -> None:
        """One device: a conditional GET with the sha it ran (expects 200 and the blob),
        then again with the new sha (expects 304)."""
        from pipeline.download import DownloadError, fetch_checkpoint

        assert self._http is not None and self._server_url
        args = (self._http, self._server_url, self._token, update.model_id, update.version)
        try:
            blob = await fetch_checkpoint(*args, expected_sha256=update.sha256, etag=before)
            if blob is None:
                self.stats.pull_errors += 1
                return
            self.stats.pulls_200 += 1
            again = await fetch_checkpoint(*args, expected_sha256=update.sha256, etag=update.sha256)
            if again is None:
                self.stats.pulls_304 += 1
            else:
                self.stats.pull_errors += 1
        except DownloadError as exc:
            self.stats.pull_errors += 1
            log.debug("real pull of %s/%s failed: %s", update.model_id, update.version, exc)


async def _call(callback: Callable[[Any], Awaitable[None] | None] | None, value: object) -> None:
    if callback is not None:
        result = callback(value)
        if result is not None:
            await result
