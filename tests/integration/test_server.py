"""The model server on the real broker: registry from the model topic, checkpoint
downloads (inline and by reference), the auth matrix, and HTTP pushes onto the feature log.
Real HTTP on 127.0.0.1 with a free port."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiokafka import TopicPartition
from safetensors.numpy import save as save_safetensors

from pipeline import codec
from pipeline.auth import issue_token
from pipeline.checkpoints import LocalCheckpointStore, sha256_hex
from pipeline.clients import make_consumer, make_producer
from pipeline.download import DownloadError, fetch_checkpoint, push_over_http
from pipeline.records import FeaturePush, ModelMetrics, ModelUpdate
from pipeline.server import ModelServer
from pipeline.server_process import serve
from pipeline.settings import Settings
from pipeline.topics import Topics
from tests import factories

SECRET = "integration-secret"
DEADLINE = 30.0


def blob_for(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return save_safetensors({"head.weight": rng.standard_normal((8, 512)).astype(np.float16)})


def update(
    model_id: str, version: str, blob: bytes, *, inline: bool, sha: str | None = None
) -> ModelUpdate:
    return factories.served_update(
        model_id,
        version,
        blob,
        sha=sha,
        inline=inline,
        trigger_id=None if version == "v0" else f"{model_id}:{version[1:]}",
        num_classes=8,
        metrics=ModelMetrics(0.5, None, 100, 10, 0.1, 1),
    )


def push(model_id: str, device_id: str, n: int = 5) -> FeaturePush:
    """``n`` samples (ids from 100) of one of the model's 8 classes each."""
    return factories.push(model_id, device=device_id, n=n, first_id=100, num_classes=8, seed=1)


async def announce(settings: Settings, *updates: ModelUpdate) -> None:
    producer = make_producer(bootstrap=settings.bootstrap)
    await producer.start()
    try:
        for u in updates:
            value = codec.encode_update(u)
            await producer.send_and_wait(
                Topics(settings.topic_prefix).models, value, key=codec.encode_key(u.model_id)
            )
    finally:
        await producer.stop()


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[ModelServer, aiohttp.ClientSession]]:
    server = ModelServer.from_settings(settings, secret=SECRET, port=0)
    async with server, aiohttp.ClientSession() as http:
        await server.wait_ready(DEADLINE)
        yield server, http


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.mark.usefixtures("kafka_topics")
async def test_registry_checkpoints_and_auth(settings: Settings) -> None:
    v0 = blob_for(0)
    sha0 = sha256_hex(v0)
    await announce(settings, update("faces-1", "v0", v0, inline=True))  # before the server starts
    async with running(settings) as (server, http):
        base = server.url
        token = issue_token(SECRET, "dev-1", ["faces-1"], 3600, time.time())
        auth = bearer(token)

        async with http.get(f"{base}/readyz") as r:
            assert r.status == 200
        async with http.get(f"{base}/v1/models/faces-1", headers=auth) as r:
            assert r.status == 200
            body = await r.json()
        assert body["best"]["version"] == "v0" and body["best"]["sha256"] == sha0

        # The inline blob traveled only on the topic; the server stored and serves it.
        got = await fetch_checkpoint(http, base, token, "faces-1", "v0", expected_sha256=sha0)
        assert got == v0
        path = f"{base}/v1/models/faces-1/checkpoints/v0"
        async with http.get(path, headers=auth) as r:
            assert r.headers["ETag"] == f'"{sha0}"' and await r.read() == v0
        async with http.get(path, headers={**auth, "If-None-Match": f'"{sha0}"'}) as r:
            assert r.status == 304
        assert (
            await fetch_checkpoint(
                http, base, token, "faces-1", "v0", expected_sha256=sha0, etag=sha0
            )
            is None
        )
        async with http.get(path, headers={**auth, "Range": "bytes=10-41"}) as r:
            assert r.status == 206 and await r.read() == v0[10:42]
            assert r.headers["Content-Range"] == f"bytes 10-41/{len(v0)}"

        # By reference: the trainer put the blob in the shared store, then announced it.
        v1 = blob_for(1)
        LocalCheckpointStore(settings.checkpoint_dir).put("faces-1", "v1", v1)
        await announce(settings, update("faces-1", "v1", v1, inline=False))
        await server.wait_for_version("faces-1", "v1", DEADLINE)
        got = await fetch_checkpoint(
            http, base, token, "faces-1", "best", expected_sha256=sha256_hex(v1)
        )
        assert got == v1

        # A blob whose bytes do not match the announced sha256 is detected by the client.
        v2 = blob_for(2)
        LocalCheckpointStore(settings.checkpoint_dir).put("faces-1", "v2", blob_for(3))
        await announce(
            settings, update("faces-1", "v2", blob_for(3), inline=False, sha=sha256_hex(v2))
        )
        await server.wait_for_version("faces-1", "v2", DEADLINE)
        with pytest.raises(DownloadError) as info:
            await fetch_checkpoint(
                http, base, token, "faces-1", "v2", expected_sha256=sha256_hex(v2)
            )
        assert info.value.reason == "sha256_mismatch"

        # The auth matrix over HTTP.
        await announce(settings, update("other", "v0", blob_for(4), inline=True))
        await server.wait_for_version("other", "v0", DEADLINE)
        matrix: list[tuple[str | None, int]] = [
            (None, 401),
            (issue_token("not-the-secret", "dev-1", ["faces-1"], 3600, time.time()), 401),
            (issue_token(SECRET, "dev-1", ["faces-1"], 60, time.time() - 3600), 401),
            (issue_token(SECRET, "dev-2", ["other"], 3600, time.time()), 403),
            (token, 200),
        ]
        for tok, status in matrix:
            async with http.get(path, headers=bearer(tok)) as r:
                await r.read()
                assert r.status == status, tok
                if status == 401:
                    assert "WWW-Authenticate" in r.headers

        async with http.get(f"{base}/metrics") as r:
            text = await r.text()
        assert "fedex_server_registry_models 2.0" in text
        assert "fedex_server_registry_versions 4.0" in text


@pytest.mark.usefixtures("kafka_topics")
async def test_http_pushes_reach_the_feature_log(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_push_bytes": 64 * 1024})
    await announce(settings, update("faces-1", "v0", blob_for(0), inline=True))
    async with running(settings) as (server, http):
        base = server.url
        token = issue_token(SECRET, "dev-7", ["faces-1"], 3600, time.time())
        good = push("faces-1", "dev-7")
        receipt = await push_over_http(http, base, token, good)
        assert receipt.samples == 5

        url = f"{base}/v1/models/faces-1/pushes"
        bad = codec.encode_push(push("faces-1", "dev-7"))
        bad = bad[:-2]  # a truncated body
        async with http.post(url, data=bad, headers=bearer(token)) as r:
            assert r.status == 400 and (await r.json())["reason"] == "truncated"
        async with http.post(url, data=b"\0" * (64 * 1024 + 1), headers=bearer(token)) as r:
            assert r.status == 413

    # The accepted push is on the feature log, keyed by model id, byte for byte.
    topic = Topics(settings.topic_prefix).features
    consumer = make_consumer(bootstrap=settings.bootstrap, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, receipt.partition)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        records: list[Any] = []
        deadline = time.monotonic() + DEADLINE
        while not records and time.monotonic() < deadline:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            records += batch.get(tp, [])
        assert len(records) == 1
        record = records[0]
        assert record.key == b"faces-1" and record.offset == receipt.offset
        assert codec.decode_push(record.value).same_as(good)
        end = await consumer.end_offsets(
            [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        )
        assert sum(end.values()) == 1  # the bad and oversized pushes were not produced
    finally:
        await consumer.stop()


async def test_serve_entry_point_stops_cleanly_on_sigterm(settings: Settings) -> None:
    """`fedex serve`: ensures the topics, serves, and stops on SIGTERM."""
    settings = settings.model_copy(update={"auth_secret": SECRET})
    started: asyncio.Future[ModelServer] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, port=0, on_started=started.set_result))
    waiting: list[asyncio.Future[Any]] = [started, task]
    done, _ = await asyncio.wait(waiting, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # serve() failed before it started: raise its error
    assert started in done, "serve() did not start in time"
    server = started.result()
    await server.wait_ready(DEADLINE)
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/readyz") as r:
        assert r.status == 200
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, DEADLINE)
    assert task.done() and task.exception() is None
