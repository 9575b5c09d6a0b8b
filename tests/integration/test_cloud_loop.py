"""The whole cloud loop on the real broker: pushes over HTTP → agents → trigger → trainer
→ model update → the registry shows the new best → the blob downloads with its sha256 and
classifies the devices' data better than the base model did."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import torch

from agents.app import AppOptions
from agents.worker import AgentWorker
from pipeline.auth import issue_token
from pipeline.checkpoints import LocalCheckpointStore, decode_checkpoint, sha256_hex
from pipeline.download import fetch_checkpoint, push_over_http
from pipeline.publishing import register_model
from pipeline.records import Backbone, Cut, FeatureDType, FeaturePush
from pipeline.server import ModelServer
from pipeline.settings import Settings
from pipeline.zoo import build_backbone, load_head_state, split
from trainer.worker import Trainer

MODEL = "faces"
CLASSES = 6
SECRET = "cloud-loop-secret"


def device_data(seed: int, n: int, prototypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Separable 512-d features: a class prototype plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n).astype(np.int32)
    features = prototypes[labels] + 0.6 * rng.standard_normal((n, 512)).astype(np.float32)
    return features.astype(np.float16), labels


def push_of(device: int, first_id: int, features: np.ndarray, labels: np.ndarray) -> FeaturePush:
    n = len(labels)
    return FeaturePush(
        model_id=MODEL,
        device_id=f"dev-{device}",
        backbone=Backbone.INCEPTION_RESNET_V1,
        cut=Cut.FREEZE6,
        dtype=FeatureDType.FLOAT16,
        sample_ids=np.arange(first_id, first_id + n, dtype=np.uint64),
        labels=labels,
        timestamps_ms=np.full(n, int(time.time() * 1000), dtype=np.int64),
        features=features,
    )


def accuracy(blob: bytes, sha: str, features: np.ndarray, labels: np.ndarray) -> float:
    state, _ = decode_checkpoint(blob, expected_sha256=sha)
    head = split(
        build_backbone(Backbone.INCEPTION_RESNET_V1, num_classes=CLASSES),
        Backbone.INCEPTION_RESNET_V1,
        Cut.FREEZE6,
    ).head
    load_head_state(head, state)
    head.eval()
    with torch.no_grad():
        predicted = head(torch.from_numpy(features.astype(np.float32))).argmax(1).numpy()
    return float((predicted == labels).mean())


async def test_pushes_become_a_better_downloadable_model(settings: Settings) -> None:
    settings = settings.model_copy(
        update={"min_samples": 400, "train_epochs": 30, "train_batch_size": 64, "train_lr": 3e-3}
    )
    store = LocalCheckpointStore(settings.checkpoint_dir)
    prototypes = np.random.default_rng(7).standard_normal((CLASSES, 512)).astype(np.float32)
    held_out = device_data(999, 600, prototypes)

    from pipeline.stack import stack_for

    async with stack_for(settings) as live:
        base = await register_model(
            live, MODEL, Backbone.INCEPTION_RESNET_V1, Cut.FREEZE6, CLASSES, seed=1, store=store
        )
        worker = AgentWorker(live, AppOptions(store="memory://"))
        trainer = Trainer(live, device="cpu", store=store)
        server = ModelServer.from_settings(live, secret=SECRET, store=store, port=0)
        async with worker, trainer, server, aiohttp.ClientSession() as http:
            await worker.wait_ready()
            await server.wait_ready()
            training = asyncio.create_task(trainer.run(max_jobs=1, idle_timeout=120))

            # Ten devices push 50 samples each over HTTP; the eighth push brings the pending
            # count to min_samples (400) and fires the job, which covers exactly those 400.
            for device in range(10):
                token = issue_token(SECRET, f"dev-{device}", [MODEL], 600, time.time())
                features, labels = device_data(device, 50, prototypes)
                receipt = await push_over_http(
                    http, server.url, token, push_of(device, 0, features, labels)
                )
                assert receipt.samples == 50

            assert await asyncio.wait_for(training, 180) == 1
            update = await server.wait_for_version(MODEL, "v1", timeout=60)
            assert update.trigger_id == f"{MODEL}:1"
            assert update.parent_version == "v0"
            assert update.metrics.train_samples + update.metrics.val_samples == 400

            reader = issue_token(SECRET, "reader", [MODEL], 600, time.time())
            auth = {"Authorization": f"Bearer {reader}"}
            async with http.get(f"{server.url}/v1/models/{MODEL}", headers=auth) as response:
                assert response.status == 200
                body = await response.json()
            assert body["latest"]["version"] == "v1"
            assert body["best"]["version"] == "v1"
            assert [v["version"] for v in body["history"]] == ["v0", "v1"]

            blob = await fetch_checkpoint(
                http, server.url, reader, MODEL, "v1", expected_sha256=update.sha256
            )
            assert blob is not None
            assert sha256_hex(blob) == update.sha256
            base_blob = await fetch_checkpoint(
                http, server.url, reader, MODEL, "v0", expected_sha256=base.sha256
            )
            assert base_blob is not None

    before = accuracy(base_blob, base.sha256, *held_out)
    after = accuracy(blob, update.sha256, *held_out)
    assert after > 0.9, (before, after)
    assert after > before + 0.3, (before, after)
