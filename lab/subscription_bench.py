"""Fan-out benchmark of the subscription side: a model update produced → the new head
active on ``quantile`` of the devices of one fleet process.

:func:`measure_fanout` runs on a real broker (its own uuid topics, deleted afterwards):
one :class:`~device_sim.subscription.ModelSubscriber` with ``devices`` devices of one
model, ``updates`` versions published one after the other (each waits for the previous
to be active). Per update it records the time from the producer's ack (and from the
record's CreateTime) to the moment ``quantile`` of the devices run the new head: the
``on_version`` callback swaps the head of every device (one vectorised assignment) and
stamps the time; with ``transfer_s`` (per-device simulated download seconds, e.g. from
``device_sim.network``) each device activates that much later. It also reports the
evaluation seconds per version and the event loop's lag while it ran.

:func:`device_sim.synthetic.synthetic_bank` builds an in-memory feature bank with the
layout of a built one (Gaussian identity prototypes plus a per-vendor shift), for timing
fan-out when no bank is at hand and for tests; accuracy numbers on it mean nothing beyond
that.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from device_sim.bank import FeatureBank
from device_sim.evaluation import (
    HeldOutSet,
    RefusedVersion,
    VersionEvent,
    activation_times,
    fanout_seconds,
)
from device_sim.heads import new_head
from device_sim.subscription import ModelSubscriber
from device_sim.synthetic import random_devices
from lab.bench_broker import single_partition_topics
from lab.measure import Distribution
from pipeline import codec
from pipeline.auth import issue_token
from pipeline.checkpoints import LocalCheckpointStore
from pipeline.clients import make_admin
from pipeline.publishing import (
    PublishTarget,
    VersionSpec,
    build_update,
    make_update_producer,
    publish_update,
)
from pipeline.records import (
    ModelMetrics,
    ModelUpdate,
    OffsetRange,
    TrainingTrigger,
    TriggerReason,
)
from pipeline.server import ModelServer
from pipeline.settings import Settings
from pipeline.topics import Topics

BENCH_SECRET = "fanout-bench-secret"


class _LoopLag:
    """Samples how late the event loop wakes a 10 ms timer."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.period)
            self.samples.append(max(0.0, loop.time() - before - self.period))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def measure_fanout(
    *,
    bootstrap: str,
    bank: FeatureBank,
    model_id: str | None = None,
    devices: int = 10_000,
    updates: int = 10,
    quantile: float = 0.99,
    prefer_http: bool = False,
    real_pull_fraction: float = 0.0,
    transfer_s: npt.ArrayLike | None = None,
    network: bool = False,
    seed: int = 0,
    timeout: float = 60.0,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Publish ``updates`` versions of one model to a subscriber with ``devices`` devices
    and return fan-out latencies (seconds): ``fanout_from_ack`` (producer ack → the
    ``quantile`` of devices active; the headline), ``fanout_from_create`` (record
    CreateTime → the same), the evaluation seconds per version, the event-loop lag and the
    subscriber's counters. ``prefer_http`` starts a model server in-process and downloads
    every version from it; ``real_pull_fraction`` of the devices also pull every version
    from it for real (200, then 304). ``network`` draws each device a network tier
    (:mod:`device_sim.network`'s default mix) and adds its simulated download of each
    version's checkpoint; ``per_device_from_ack_s`` is then the distribution over every
    device of every version. A warm-up version ``v0`` is not counted."""
    model_id = model_id or bank.model_ids[0]
    with contextlib.ExitStack() as stack:
        home = work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        prefix = f"bench-fanout-{uuid.uuid4().hex[:10]}"
        settings = await single_partition_topics(bootstrap, prefix, home)
        topics = Topics(settings.topic_prefix)
        spec = FanoutSpec(
            devices, updates, quantile, prefer_http, real_pull_fraction, transfer_s, network, seed
        )
        try:
            return await _run(settings, topics, bank, model_id, spec, timeout)
        finally:
            admin = make_admin(bootstrap=bootstrap)
            await admin.start()
            try:
                names = [topics.features, topics.triggers, topics.models, topics.deadletter]
                with contextlib.suppress(Exception):
                    await admin.delete_topics(names)
            finally:
                await admin.close()
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class FanoutSpec:
    devices: int
    updates: int
    quantile: float
    prefer_http: bool
    real_pull_fraction: float
    transfer_s: npt.ArrayLike | None
    network: bool
    seed: int

    @property
    def uses_server(self) -> bool:
        return self.prefer_http or self.real_pull_fraction > 0


@dataclass
class Timings:
    """What one fan-out run measured, version by version."""

    from_ack: list[float] = field(default_factory=list)
    from_create: list[float] = field(default_factory=list)
    per_device: list[npt.NDArray[np.float64]] = field(default_factory=list)
    evals: list[float] = field(default_factory=list)
    covered: int = 0
    size: int = 0


class Activations:
    """Stamps when a version became active (every device of the process swaps its head in
    one vectorised step), and which version each device runs."""

    def __init__(self, devices: int) -> None:
        self.active = np.full(devices, -1, dtype=np.int64)
        self.at: dict[str, float] = {}

    def on_version(self, event: VersionEvent) -> None:
        if event.activated:
            self.active[:] = int(event.version[1:])
            self.at[event.version] = time.time()

    @staticmethod
    def on_refused(refused: RefusedVersion) -> None:
        raise RuntimeError(f"bench version refused: {refused}")


async def _start_subscriber(
    stack: contextlib.AsyncExitStack,
    settings: Settings,
    topics: Topics,
    model_id: str,
    held_out: HeldOutSet,
    spec: FanoutSpec,
    activations: Activations,
    store: LocalCheckpointStore,
    timeout: float,
) -> tuple[ModelSubscriber, str]:
    """The subscriber (and a model server, when the spec pulls over HTTP); its server URL."""
    server_url, token = settings.server_url, None
    if spec.uses_server:
        server = ModelServer.from_settings(settings, secret=BENCH_SECRET, port=0, store=store)
        await stack.enter_async_context(server)
        await server.wait_ready(timeout)
        server_url = server.url
        token = issue_token(BENCH_SECRET, "fanout-bench", [model_id], 3600, time.time())
    subscriber = ModelSubscriber(
        bootstrap=settings.bootstrap,
        models_topic=topics.models,
        triggers_topic=topics.triggers,
        held_out={model_id: held_out},
        on_version=activations.on_version,
        on_refused=activations.on_refused,
        server_url=server_url if spec.uses_server else None,
        token=token,
        prefer_http=spec.prefer_http,
        real_pull_fraction=spec.real_pull_fraction,
        client_id="fanout-bench",
    )
    await stack.enter_async_context(subscriber)
    await subscriber.wait_caught_up(timeout)
    return subscriber, server_url


def _version_update(
    store: LocalCheckpointStore,
    settings: Settings,
    bank: FeatureBank,
    model_id: str,
    n: int,
    state: dict[str, Any],
    server_url: str,
) -> ModelUpdate:
    spec = VersionSpec.in_chain(model_id, n, bank.backbone, bank.cut, bank.num_classes)
    target = PublishTarget(store, server_url, settings.max_message_bytes)
    return build_update(
        spec, target, state, metrics=ModelMetrics(0.0, None, 0, 0, 0.0, 0), is_best=True
    )


async def _publish_versions(
    producer: Any,
    subscriber: ModelSubscriber,
    settings: Settings,
    topics: Topics,
    bank: FeatureBank,
    model_id: str,
    spec: FanoutSpec,
    activations: Activations,
    store: LocalCheckpointStore,
    server_url: str,
    timeout: float,
) -> Timings:
    """Publishes v0 (warm-up, not counted) … v<updates>, each after the last is active."""
    import torch

    from device_sim.network import TierArrays, assign_tiers, tier_names

    tiers = assign_tiers(spec.devices, np.random.default_rng(spec.seed)) if spec.network else None
    links = TierArrays.of(tier_names())
    generator = torch.Generator().manual_seed(spec.seed)
    base = {
        k: v.float()
        for k, v in new_head(bank.backbone, bank.cut, bank.num_classes).state_dict().items()
    }
    timings = Timings()
    for n in range(spec.updates + 1):
        state = {
            k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in base.items()
        }
        update = _version_update(store, settings, bank, model_id, n, state, server_url)
        timings.size = update.size
        if n:  # as in the product: the trigger is on its topic before its version
            ranges = (OffsetRange(0, 100 * (n - 1), 100 * n),)
            trigger = TrainingTrigger(model_id, f"{model_id}:{n}", ranges, 100, TriggerReason.COUNT)
            await producer.send_and_wait(
                topics.triggers, codec.encode_trigger(trigger), key=codec.encode_key(model_id)
            )
        await publish_update(producer, topics.models, update)
        acked = time.time()
        outcome = await subscriber.wait_version(model_id, update.version, timeout)
        assert isinstance(outcome, VersionEvent)
        if n == 0:
            continue  # warm-up
        timings.covered += bool(outcome.covers)
        transfer = (
            links.download_seconds(update.size, tiers) if tiers is not None else spec.transfer_s
        )
        times = activation_times(activations.at[update.version], transfer, spec.devices)
        timings.per_device.append(times - acked)
        timings.from_ack.append(fanout_seconds(acked, times, spec.quantile))
        timings.from_create.append(fanout_seconds(outcome.produced_at, times, spec.quantile))
        timings.evals.append(outcome.eval_seconds)
    return timings


async def _run(
    settings: Settings,
    topics: Topics,
    bank: FeatureBank,
    model_id: str,
    spec: FanoutSpec,
    timeout: float,
) -> dict[str, Any]:
    store = LocalCheckpointStore(settings.checkpoint_dir)
    started = time.perf_counter()
    vendors, identities = random_devices(bank, model_id, spec.devices, seed=spec.seed)
    held_out = HeldOutSet.for_devices(bank, model_id, vendors, identities)
    held_out_seconds = time.perf_counter() - started
    activations = Activations(spec.devices)
    async with contextlib.AsyncExitStack() as stack:
        subscriber, server_url = await _start_subscriber(
            stack, settings, topics, model_id, held_out, spec, activations, store, timeout
        )
        producer = make_update_producer(settings, client_id="fanout-bench")
        await producer.start()
        stack.push_async_callback(producer.stop)
        lag = _LoopLag()
        lag.start()
        stack.push_async_callback(lag.stop)
        timings = await _publish_versions(
            producer,
            subscriber,
            settings,
            topics,
            bank,
            model_id,
            spec,
            activations,
            store,
            server_url,
            timeout,
        )
        await subscriber.wait_pulls()
        stats = subscriber.stats
        transfer = "off" if spec.transfer_s is None else "on"
        return {
            "devices": spec.devices,
            "updates": spec.updates,
            "quantile": spec.quantile,
            "model_id": model_id,
            "transfer": "network tiers" if spec.network else transfer,
            "source": "http" if spec.prefer_http else "inline",
            "checkpoint_bytes": timings.size,
            "held_out_rows": held_out.rows,
            "held_out_cells": held_out.cells,
            "held_out_build_s": held_out_seconds,
            "per_device_from_ack_s": Distribution.of(
                np.concatenate(timings.per_device).tolist() if timings.per_device else []
            ).as_dict(),
            "fanout_from_ack_s": Distribution.of(timings.from_ack).as_dict(),
            "fanout_from_create_s": Distribution.of(timings.from_create).as_dict(),
            "eval_s": Distribution.of(timings.evals).as_dict(),
            "loop_lag_s": Distribution.of(lag.samples).as_dict(),
            "all_devices_active": bool((activations.active == spec.updates).all()),
            "versions_with_covers": timings.covered,
            "stats": {
                "versions": stats.versions,
                "refused": stats.refused,
                "http_downloads": stats.http_downloads,
                "bytes_downloaded": stats.bytes_downloaded,
                "download_retries": stats.download_retries,
                "pulls_200": stats.pulls_200,
                "pulls_304": stats.pulls_304,
                "pull_errors": stats.pull_errors,
            },
        }
