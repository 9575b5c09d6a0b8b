"""The main job (``fedex demo`` / ``make demo``) on the embedded default stack.

Starts the local Kafka broker (or uses ``FEDEX_KAFKA_BOOTSTRAP``), ensures the topics,
registers two models (base version v0), runs the aggregation worker, a trainer and the
model server as supervised children (as ``fedex up`` does), and lets simulated devices
push feature+label batches to the feature log. Every model version that appears on the
model topic is pulled, verified and evaluated on held-out device data, so the report
shows the accuracy each version gained.

Until the device fleet lands (issue 4: synthetic world from the real backbone, network
tiers, energy), the devices here are a minimal stand-in: freeze6 features drawn around
per-identity prototypes with a per-device (sensor) offset, pushed straight to Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline import codec
from pipeline.records import Backbone, Cut, FeatureDType, FeaturePush, ModelUpdate
from pipeline.settings import Settings

if TYPE_CHECKING:
    from aiokafka import AIOKafkaProducer

MODELS = ("faces-a", "faces-b")
CLASSES = 40
DEVICES_PER_MODEL = 100
PUSH_SAMPLES = 20


@dataclass(slots=True)
class ModelReport:
    versions: list[tuple[str, float, float, float]] = field(default_factory=list)
    # (version, validation accuracy, held-out device accuracy, seconds since start)


class SyntheticDevices:
    """Stand-in devices: class prototypes + a per-device sensor offset + noise."""

    def __init__(self, model_index: int, devices: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed + model_index)
        self.prototypes = rng.standard_normal((CLASSES, 512)).astype(np.float32)
        self.offsets = 1.5 * rng.standard_normal((devices, 512)).astype(np.float32)
        self.rng = rng
        self.next_id = np.zeros(devices, dtype=np.uint64)

    def batch(self, device: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        labels = self.rng.integers(0, CLASSES, n).astype(np.int32)
        noise = 4.0 * self.rng.standard_normal((n, 512)).astype(np.float32)
        features = self.prototypes[labels] + self.offsets[device] + noise
        ids = self.next_id[device] + np.arange(n, dtype=np.uint64)
        self.next_id[device] += np.uint64(n)
        return ids, labels, features.astype(np.float16)

    def held_out(self, per_device: int = 5) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(12345)
        devices = np.repeat(np.arange(len(self.offsets)), per_device)
        labels = rng.integers(0, CLASSES, len(devices)).astype(np.int32)
        noise = 4.0 * rng.standard_normal((len(devices), 512)).astype(np.float32)
        return self.prototypes[labels] + self.offsets[devices] + noise, labels


def _accuracy(blob: bytes, sha256: str, features: np.ndarray, labels: np.ndarray) -> float:
    import torch

    from pipeline.checkpoints import decode_checkpoint
    from pipeline.records import Backbone, Cut
    from pipeline.zoo import build_backbone, load_head_state, split

    state, _ = decode_checkpoint(blob, expected_sha256=sha256)
    backbone = Backbone.INCEPTION_RESNET_V1
    head = split(build_backbone(backbone, num_classes=CLASSES), backbone, Cut.FREEZE6).head
    load_head_state(head, state)
    head.eval()
    with torch.no_grad():
        predicted = head(torch.from_numpy(features)).argmax(1).numpy()
    return float((predicted == labels).mean())


async def _demo(settings: Settings, console: Console, duration: float) -> None:
    from pipeline.checkpoints import LocalCheckpointStore
    from pipeline.clients import make_producer
    from pipeline.kafka_local import free_port
    from pipeline.publishing import register_model
    from pipeline.registry import RegistryFollower
    from pipeline.stack import stack_for
    from pipeline.supervisor import Supervisor, child_env, cloud_children
    from pipeline.topics import Topics

    start = time.monotonic()
    settings = settings.model_copy(
        update={"topic_prefix": f"demo-{int(time.time())}", "min_samples": 1500, "train_epochs": 10}
    )
    topics = Topics(settings.topic_prefix)
    worlds = {m: SyntheticDevices(i, DEVICES_PER_MODEL) for i, m in enumerate(MODELS)}
    held_out = {m: w.held_out() for m, w in worlds.items()}
    reports = {m: ModelReport() for m in MODELS}
    store = LocalCheckpointStore(settings.checkpoint_dir)

    every_model_trained = asyncio.Event()

    async def on_update(update: ModelUpdate) -> None:
        blob = (
            update.checkpoint if update.checkpoint is not None else store.get(update.checkpoint_uri)
        )
        acc = await asyncio.to_thread(_accuracy, blob, update.sha256, *held_out[update.model_id])
        elapsed = time.monotonic() - start
        reports[update.model_id].versions.append(
            (update.version, update.metrics.val_accuracy, acc, elapsed)
        )
        if all(len(r.versions) >= 2 for r in reports.values()):
            every_model_trained.set()
        console.print(
            f"[green]{update.model_id} {update.version}[/green] validation "
            f"{update.metrics.val_accuracy:.1%} "
            f"(champion {update.metrics.champion_val_accuracy or 0:.1%}), "
            f"held-out device accuracy {acc:.1%}, {update.metrics.train_samples:,} samples, "
            f"trained in {update.metrics.train_seconds:.2f} s",
            highlight=False,
        )

    async with stack_for(settings) as live:
        assert live.kafka_bootstrap is not None
        console.rule(f"FedEx Stream demo — Kafka at {live.kafka_bootstrap}")
        for model_id in MODELS:
            await register_model(
                live, model_id, Backbone.INCEPTION_RESNET_V1, Cut.FREEZE6, CLASSES, store=store
            )
        server_port = free_port()
        env = child_env(live, live.kafka_bootstrap)
        env.update(
            FEDEX_MIN_SAMPLES=str(live.min_samples),
            FEDEX_TRAIN_EPOCHS=str(live.train_epochs),
            FEDEX_AUTH_SECRET=secrets.token_hex(16),
            FEDEX_SERVER_PORT=str(server_port),
            FEDEX_SERVER_URL=f"http://127.0.0.1:{server_port}",
        )
        children = cloud_children(trainers=["auto"])
        supervisor = Supervisor(
            children,
            log_dir=settings.log_dir,
            env=env,
            on_event=lambda m: console.print(f"[dim]{m}[/dim]", highlight=False),
        )
        follower = RegistryFollower(
            bootstrap=live.kafka_bootstrap, topic=topics.models, on_update=on_update
        )
        producer = make_producer(bootstrap=live.kafka_bootstrap)
        async with supervisor, follower:
            await producer.start()
            try:
                pushed = await _push_loop(producer, topics.features, worlds, duration, console)
                # Let the last triggered jobs finish.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(every_model_trained.wait(), 60)
            finally:
                await producer.stop()
    _print_report(console, reports, pushed, time.monotonic() - start)


async def _push_loop(
    producer: AIOKafkaProducer,
    topic: str,
    worlds: dict[str, SyntheticDevices],
    duration: float,
    console: Console,
) -> int:
    """Each device pushes a batch in turn, paced to spread ``duration``; returns samples."""
    pushed, rounds = 0, 0
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        sends = []
        for model_id, world in worlds.items():
            for device in range(len(world.offsets)):
                ids, labels, features = world.batch(device, PUSH_SAMPLES)
                push = FeaturePush(
                    model_id=model_id,
                    device_id=f"{model_id}-dev-{device:04d}",
                    backbone=Backbone.INCEPTION_RESNET_V1,
                    cut=Cut.FREEZE6,
                    dtype=FeatureDType.FLOAT16,
                    sample_ids=ids,
                    labels=labels,
                    timestamps_ms=np.full(len(ids), int(time.time() * 1000), dtype=np.int64),
                    features=features,
                )
                sends.append(
                    await producer.send(
                        topic, codec.encode_push(push), key=codec.encode_key(model_id)
                    )
                )
                pushed += len(ids)
        await asyncio.gather(*sends)
        rounds += 1
        console.print(f"round {rounds}: {pushed:,} samples pushed", highlight=False)
        await asyncio.sleep(duration / 6)
    return pushed


def _print_report(
    console: Console, reports: dict[str, ModelReport], pushed: int, seconds: float
) -> None:
    table = Table(title="versions shipped")
    for col in ("model", "version", "validation acc.", "device held-out acc.", "at (s)"):
        table.add_column(col, justify="left" if col in ("model", "version") else "right")
    for model_id, report in reports.items():
        for version, val, acc, at in report.versions:
            table.add_row(model_id, version, f"{val:.1%}", f"{acc:.1%}", f"{at:.0f}")
    console.print(table)
    for model_id, report in reports.items():
        if len(report.versions) >= 2:
            gain = report.versions[-1][2] - report.versions[0][2]
            console.print(
                f"{model_id}: device accuracy {report.versions[0][2]:.1%} → "
                f"{report.versions[-1][2]:.1%} ({gain:+.1%}) "
                f"over {len(report.versions) - 1} new versions"
            )
    console.print(f"{pushed:,} samples pushed; wall time {seconds:.0f} s")


def run_demo(settings: Settings, duration: float = 60.0) -> None:
    asyncio.run(_demo(settings, Console(), duration))
