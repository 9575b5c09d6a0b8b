"""The fleet runner: the I/O shell around :class:`device_sim.devices.DeviceFleet`.

One process simulates ``count`` devices (or its shard of them) with **one** event-loop
task: every ``tick_s`` of wall time it advances the simulated clock by ``tick_s x
time_scale`` and, with vectorised calls on the device arrays,

1. applies what happened since the last tick: acknowledgements and failures of sends
   (aiokafka futures only append to a list; all state changes happen here), and model
   versions from the :class:`~device_sim.subscription.ModelSubscriber`;
2. runs inference and feedback, fills the caches;
3. starts the pushes the push policy asks for: one :class:`~pipeline.records.FeaturePush`
   per device push (``pipeline.codec.encode_push``, features from the bank), sent with
   the process's one aiokafka producer (keyed by model id, ``acks=all``);
4. settles acknowledged pushes whose simulated transfer has finished (their samples
   leave the caches) and activates downloaded versions;
5. reports progress, and stops on ``duration_s``, ``max_pushes`` or the stop event.

A send that fails (broker unreachable, request timeout) is retried by its device after
backoff with the same samples: delivery is at-least-once, deduplicated downstream by
(device id, sample id). On stop, in-flight sends are flushed (``drain_timeout_s``);
what is still unacknowledged stays cached and is reported as unsent.

``run_fleet(settings, config)`` is the importable entry (the lead's ``fedex demo`` calls
it); ``fedex devices`` wraps it with a live display, and ``--processes P`` runs P shards
(:mod:`device_sim.shards`) and merges their reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_sim.accounting import VersionLedger
from device_sim.devices import DeviceFleet, PushState
from device_sim.fleet_config import FleetConfig
from device_sim.fleet_setup import attach_features, build_fleet, ensure_models, load_bank
from device_sim.report import FleetProgress, ProcessSampler, summarize
from pipeline import codec
from pipeline.errors import ConfigError
from pipeline.lifecycle import Service
from pipeline.processes import trim_memory
from pipeline.records import FeatureDType, FeaturePush
from pipeline.settings import Settings

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

    from device_sim.bank import FeatureBank
    from device_sim.evaluation import RefusedVersion, VersionEvent
    from device_sim.subscription import ModelSubscriber

log = logging.getLogger(__name__)


ProgressCallback = Callable[[FleetProgress], Awaitable[None] | None]


@dataclass
class FleetReport:
    """What a run did: the JSON summary (see docs/fleet.md) and where it was written."""

    summary: dict[str, Any]
    path: Path | None = None

    @property
    def totals(self) -> dict[str, Any]:
        totals = self.summary["totals"]
        assert isinstance(totals, dict)
        return totals


# --------------------------------------------------------------------------- the runner


class FleetRunner(Service):
    """One process's fleet: ``start()`` prepares (bank, models, devices, producer,
    subscriber), ``run()`` simulates until a stop condition, ``stop()`` releases."""

    def __init__(
        self,
        settings: Settings,
        config: FleetConfig,
        *,
        on_progress: ProgressCallback | None = None,
        stop_event: asyncio.Event | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.on_progress = on_progress
        self.stop_event = stop_event or asyncio.Event()
        self.fleet: DeviceFleet | None = None
        self.ledger = VersionLedger()
        self.refused: list[dict[str, Any]] = []
        self.subscriber: ModelSubscriber | None = None
        self._producer: AIOKafkaProducer | None = None
        self._completions: list[tuple[int, asyncio.Future[Any]]] = []
        self._events: list[VersionEvent] = []
        self._features: Callable[[Any], Any] | None = None
        self._rng = np.random.default_rng([config.seed, config.shard_index, 0x666C74])
        self._in_flight = 0
        self._started_pushes = 0
        self._wall0 = 0.0
        self._last_progress = 0.0
        self._epoch_ms = 0
        self.now = 0.0
        self.stop_reason = "not started"
        #: Mean device accuracy once the fleet's first versions were active.
        self.initial_accuracy = math.nan
        self.live: Any = None
        self.process = ProcessSampler()
        #: device index → sample ids of each settled push (with ``config.audit``).
        self.pushed: dict[int, list[np.ndarray]] = {}

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()  # a half-started runner releases its clients
            raise

    async def _start(self) -> None:
        from device_sim.world import World
        from pipeline.clients import make_producer

        cfg, settings = self.config, self.settings
        bank = await asyncio.to_thread(load_bank, settings, cfg)
        world = World(cfg.world_config())
        if cfg.register:
            await ensure_models(settings, bank, list(world.model_ids))
        fleet = await asyncio.to_thread(build_fleet, world, cfg, bank.num_classes)
        self.fleet = fleet
        self.bank = bank
        source = await asyncio.to_thread(attach_features, cfg, world, bank, fleet, self._rng)
        self.live, self._draw, self._features = source.live, source.draw, source.features
        from pipeline.topics import Topics

        self.topics = Topics(settings.topic_prefix)
        self._keys = [codec.encode_key(m) for m in fleet.model_ids]
        self._producer = make_producer(
            bootstrap=settings.bootstrap,
            client_id=f"fedex-fleet-{cfg.shard_index}",
            linger_ms=20,
            compression_type=cfg.sending.compression,
            request_timeout_ms=int(cfg.sending.send_timeout_s * 1000),
            max_request_size=settings.max_push_bytes + 64 * 1024,
        )
        await self._producer.start()
        if cfg.subscribe:
            await self._start_subscriber(bank)
        trim_memory()

    async def _start_subscriber(self, bank: FeatureBank) -> None:
        from device_sim.evaluation import HeldOutSet
        from device_sim.subscription import ModelSubscriber

        fleet = self.fleet
        assert fleet is not None

        def held_out() -> dict[str, HeldOutSet]:
            sets = {}
            for m, model_id in enumerate(fleet.model_ids):
                devs = fleet.devices_of(m)
                ids = [fleet.identity_table[k, : fleet.identity_count[k]] for k in devs]
                sets[model_id] = HeldOutSet.for_devices(bank, model_id, fleet.vendor[devs], ids)
            return sets

        token = None
        if self.settings.auth_secret:
            from pipeline.auth import issue_token

            token = issue_token(
                self.settings.auth_secret,
                f"fleet-{self.config.shard_index}",
                list(fleet.model_ids),
                self.settings.token_ttl_s,
                time.time(),
            )
        self.subscriber = ModelSubscriber(
            bootstrap=self.settings.bootstrap,
            models_topic=self.topics.models,
            triggers_topic=self.topics.triggers,
            held_out=await asyncio.to_thread(held_out),
            on_version=self._on_version,
            on_refused=self._on_refused,
            server_url=self.settings.server_url,
            token=token,
            client_id=f"fedex-fleet-{self.config.shard_index}",
        )
        await self.subscriber.start()
        # Devices start with the current best of each model installed (replayed events).
        await self.subscriber.wait_caught_up(timeout=120)

    def _on_version(self, event: VersionEvent) -> None:
        self._events.append(event)  # applied by the next tick, like every state change

    def _on_refused(self, refused: RefusedVersion) -> None:
        log.warning("refused %s/%s: %s", refused.model_id, refused.version, refused.message)
        self.refused.append(refused.as_row())

    async def stop(self) -> None:
        subscriber, self.subscriber = self.subscriber, None
        if subscriber is not None:
            await subscriber.stop()
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), self.config.sending.drain_timeout_s)

    # ---------------------------------------------------------------- the loop

    async def run(self) -> FleetReport:
        """Simulate until ``duration_s``, ``max_pushes`` or the stop event; then drain
        in-flight sends and return the report."""
        sampler = asyncio.create_task(self.process.sample(), name="fleet-lag-sampler")
        try:
            return await self._run()
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler

    async def _run(self) -> FleetReport:
        schedule, fleet = self.config.schedule, self.fleet
        if fleet is None or self._producer is None:
            raise ConfigError("start the fleet runner before run()")
        loop = asyncio.get_running_loop()
        self._wall0 = loop.time()
        self._epoch_ms = int(time.time() * 1000)
        last, next_progress = self._wall0, self._wall0
        last_totals = fleet.counters.totals()
        self._last_progress = self._wall0
        while True:
            wall = loop.time()
            elapsed = wall - self._wall0
            self.now = elapsed * schedule.time_scale
            dt = (wall - last) * schedule.time_scale
            last = wall
            await self._tick(dt)
            if wall >= next_progress:
                last_totals = await self._progress(elapsed, last_totals)
                next_progress = wall + schedule.progress_s
            reason = self._should_stop(elapsed)
            if reason:
                self.stop_reason = reason
                break
            await asyncio.sleep(max(0.0, schedule.tick_s - (loop.time() - wall)))
        await self._drain()
        await self._progress(loop.time() - self._wall0, last_totals)
        return FleetReport(self.summary())

    def _should_stop(self, elapsed: float) -> str | None:
        fleet = self.fleet
        assert fleet is not None
        if self.stop_event.is_set():
            return "stopped"
        return self.config.schedule.stop_reason(elapsed, int(fleet.counters["pushes"].sum()))

    async def _tick(self, dt: float) -> None:
        fleet, now = self.fleet, self.now
        assert fleet is not None
        self._apply_completions()
        self._apply_versions()
        if self.live is not None:
            await asyncio.to_thread(fleet.infer, now, dt, self._draw, self._rng)
        else:
            fleet.infer(now, dt, self._draw, self._rng)
        await self._send_due()
        self._settle(now)
        self._activate()
        if math.isnan(self.initial_accuracy):
            acc = fleet.accuracy[np.isfinite(fleet.accuracy)]
            if acc.size:
                self.initial_accuracy = float(acc.mean())

    def _apply_completions(self) -> None:
        fleet = self.fleet
        assert fleet is not None
        done, self._completions = self._completions, []
        acked, partitions, offsets, failed = [], [], [], []
        for k, fut in done:
            self._in_flight -= 1
            exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
            if exc is None:
                meta = fut.result()
                acked.append(k)
                partitions.append(meta.partition)
                offsets.append(meta.offset)
            else:
                failed.append(k)
        if acked:
            fleet.acked(np.asarray(acked), np.asarray(partitions), np.asarray(offsets))
        if failed:
            log.debug("%d sends failed; retrying after backoff", len(failed))
            fleet.failed(np.asarray(failed, dtype=np.int64), self.now, self._rng)

    async def _send_due(self, *, allow: bool = True) -> None:
        fleet, producer = self.fleet, self._producer
        sending, max_pushes = self.config.sending, self.config.schedule.max_pushes
        assert fleet is not None and producer is not None
        due = fleet.due(self.now)
        room = min(sending.max_sends_per_tick, sending.max_in_flight - self._in_flight)
        if max_pushes is not None:
            # Pushes started and not yet settled (sending, acked, backing off) count too.
            pinned = int(np.count_nonzero(fleet.push_state != PushState.IDLE))
            room = min(room, max_pushes - int(fleet.counters["pushes"].sum()) - pinned)
        if due.size == 0 or room <= 0:
            return
        if due.size > room:
            due = self._rng.choice(due, room, replace=False)
        fleet.begin(due)
        topic = self.topics.features
        sent: list[int] = []
        nbytes: list[int] = []
        failed: list[int] = []
        from aiokafka.errors import KafkaError

        for i, k in enumerate(due.tolist()):
            if failed:  # the broker refused a send outright: defer the rest of the tick
                failed.append(k)
                continue
            data = self._encode(k)
            try:
                fut = await producer.send(topic, data, key=self._keys[fleet.model_of[k]])
            except KafkaError as exc:
                log.debug("send failed before queueing: %s", exc)
                failed.append(k)
                continue
            self._in_flight += 1
            fut.add_done_callback(lambda f, k=k: self._completions.append((k, f)))
            sent.append(k)
            nbytes.append(len(data))
            if i % 256 == 255:
                await asyncio.sleep(0)  # keep the loop responsive while sending a burst
        if sent:
            fleet.sent(np.asarray(sent), np.asarray(nbytes), self.now)
            self._started_pushes += len(sent)
        if failed:
            fleet.failed(np.asarray(failed, dtype=np.int64), self.now, self._rng)

    def _encode(self, k: int) -> bytes:
        fleet = self.fleet
        assert fleet is not None and self._features is not None
        rows, labels, ids, ts = fleet.pushed(k)
        scale = self.config.schedule.time_scale
        push = FeaturePush(
            model_id=fleet.model_ids[fleet.model_of[k]],
            device_id=fleet.device_ids[k],
            backbone=self.config.backbone,
            cut=self.config.cut,
            dtype=FeatureDType.FLOAT16,
            sample_ids=ids,
            labels=labels,
            # Label times on the wall clock (simulated seconds compressed by time_scale).
            timestamps_ms=(self._epoch_ms + ts * 1000.0 / scale).astype(np.int64),
            features=self._features(rows),
        )
        return codec.encode_push(push)

    def _settle(self, now: float, *, ignore_transfer: bool = False) -> None:
        fleet = self.fleet
        assert fleet is not None
        settled = fleet.settle(now, ignore_transfer=ignore_transfer, keep_ids=self.config.audit)
        if settled.sample_ids is not None:
            for k, ids in zip(settled.devices.tolist(), settled.sample_ids, strict=True):
                self.pushed.setdefault(k, []).append(ids)

    def _apply_versions(self) -> None:
        fleet = self.fleet
        assert fleet is not None
        events, self._events = self._events, []
        for ev in events:
            m = fleet.model_ids.index(ev.model_id)
            record = self.ledger.add(
                ev.model_id,
                ev.version,
                is_best=ev.is_best,
                size_bytes=ev.size_bytes,
                devices=int(ev.accuracy.shape[0]),
                mean_accuracy=ev.mean_accuracy,
                received_sim_s=self.now,
                # Fan-out is timed from production for new versions only: a replayed one
                # was produced before this fleet existed.
                produced_at=math.nan if ev.replayed else ev.produced_at,
            )
            if ev.covers:
                fleet.freshness.cover(
                    [(r.partition, r.start, r.end) for r in ev.covers],
                    record.index,
                    fleet.model_of == m,
                    is_best=ev.activated,
                )
            if ev.activated:
                # A version already current when the fleet starts came installed.
                fleet.offer(
                    m, record.index, ev.accuracy, ev.size_bytes, self.now, download=not ev.replayed
                )

    def _activate(self) -> None:
        fleet = self.fleet
        assert fleet is not None
        ready, versions, before = fleet.activate(self.now)
        if ready.size == 0:
            return
        wall = time.time()
        for v in np.unique(versions).tolist():
            sel = versions == v
            record = self.ledger.records[v]
            record.apply(before[sel], fleet.accuracy[ready[sel]], wall - record.produced_at)

    async def _drain(self) -> None:
        """Stop starting pushes; flush what is in flight and settle what was acked."""
        fleet, producer = self.fleet, self._producer
        assert fleet is not None and producer is not None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.flush(), self.config.sending.drain_timeout_s)
        # Completion callbacks run on the loop: give them their turn.
        await asyncio.sleep(0)
        self._apply_completions()
        self._apply_versions()
        self._settle(self.now, ignore_transfer=True)
        self._activate()

    async def _progress(self, elapsed: float, last: dict[str, int]) -> dict[str, int]:
        fleet = self.fleet
        assert fleet is not None
        totals = fleet.counters.totals()
        wall = self._wall0 + elapsed
        span = max(wall - self._last_progress, 1e-3)
        self._last_progress = wall
        acc = fleet.accuracy[np.isfinite(fleet.accuracy)]
        progress = FleetProgress(
            shard=self.config.shard_index,
            wall_s=elapsed,
            sim_s=self.now,
            devices=fleet.n,
            online=int(fleet.available(self.now).sum()),
            pushes=totals["pushes"],
            samples=totals["samples_pushed"],
            pushes_per_s=(totals["pushes"] - last["pushes"]) / span,
            samples_per_s=(totals["samples_pushed"] - last["samples_pushed"]) / span,
            retries=totals["retries"],
            evicted=totals["evicted"],
            in_flight=self._in_flight,
            versions=len(self.ledger),
            mean_accuracy=float(acc.mean()) if acc.size else math.nan,
        )
        if self.on_progress is not None:
            result = self.on_progress(progress)
            if result is not None:
                await result
        return totals

    def summary(self) -> dict[str, Any]:
        fleet = self.fleet
        assert fleet is not None
        stats = self.subscriber.stats if self.subscriber is not None else None
        return summarize(
            fleet,
            self.ledger,
            self.config,
            wall_s=asyncio.get_running_loop().time() - self._wall0,
            sim_s=self.now,
            stop_reason=self.stop_reason,
            in_flight=self._in_flight,
            refused=self.refused,
            subscriber=stats,
            initial_accuracy=self.initial_accuracy,
            process=self.process.summary(),
        )


async def run_fleet(
    settings: Settings,
    config: FleetConfig,
    *,
    on_progress: ProgressCallback | None = None,
    stop_event: asyncio.Event | None = None,
    out: Path | None = None,
) -> FleetReport:
    """Run one fleet process to its end and return its report (written to ``out`` as
    JSON when given). ``stop_event`` ends it early, as Ctrl-C does, with a flush."""
    async with FleetRunner(
        settings, config, on_progress=on_progress, stop_event=stop_event
    ) as runner:
        report = await runner.run()
    if out is not None:
        from device_sim.report import write_json

        report.path = write_json(report.summary, out)
    return report
