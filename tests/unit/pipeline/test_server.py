"""The model server over real HTTP on 127.0.0.1, with the Kafka follower and producer
replaced by fakes fed by hand (tests/integration/test_server.py runs the real ones)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiokafka.errors import KafkaTimeoutError
from safetensors.numpy import save as save_safetensors
from yarl import URL

from pipeline import codec
from pipeline.auth import ANY_MODEL, issue_token
from pipeline.checkpoints import LocalCheckpointStore, sha256_hex
from pipeline.download import DownloadError, PushError, fetch_checkpoint, push_over_http
from pipeline.http_ranges import ByteRange, RangeNotSatisfiable, parse_range
from pipeline.records import ModelMetrics, ModelUpdate
from pipeline.server import ModelServer
from tests import factories

SECRET = "unit-secret"
FEATURES = "t.features"
MAX_PUSH = 64 * 1024


# ------------------------------------------------------------------------------ fakes


class FakeFollower:
    def __init__(self) -> None:
        self.caught_up = asyncio.Event()
        self.started = self.stopped = False
        self.crash: Exception | None = None

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def wait_caught_up(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self.caught_up.wait(), timeout)
        if self.crash is not None:
            raise self.crash


@dataclass
class Sent:
    topic: str
    value: bytes
    key: bytes


@dataclass
class Meta:
    partition: int
    offset: int


@dataclass
class FakeProducer:
    sent: list[Sent] = field(default_factory=list)
    fail: bool = False

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def send_and_wait(self, topic: str, value: bytes, key: bytes) -> Meta:
        if self.fail:
            raise KafkaTimeoutError()
        self.sent.append(Sent(topic, value, key))
        return Meta(0, len(self.sent) - 1)


# ---------------------------------------------------------------------------- helpers


def make_blob(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return save_safetensors({"weight": rng.standard_normal((10, 512)).astype(np.float16)})


def make_update(
    version: str,
    blob: bytes,
    *,
    model_id: str = "m1",
    inline: bool = True,
    best: bool = True,
    sha: str | None = None,
) -> ModelUpdate:
    return factories.served_update(
        model_id,
        version,
        blob,
        inline=inline,
        best=best,
        sha=sha,
        parent_version=None,
        metrics=ModelMetrics(0.8, None, 100, 10, 1.5, 2),
    )


def make_push(model_id: str = "m1", device_id: str = "dev-1", n: int = 4, label: int = 3) -> bytes:
    return codec.encode_push(
        factories.push(model_id, device=device_id, n=n, labels=[label] * n, value=1.0)
    )


def token(models: list[str] | str = ANY_MODEL, device: str = "dev-1", **kw: Any) -> str:
    ttl = kw.get("ttl", 3600)
    return issue_token(kw.get("secret", SECRET), device, models, ttl, kw.get("now", time.time()))


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


@dataclass
class Harness:
    server: ModelServer
    follower: FakeFollower
    producer: FakeProducer
    store: LocalCheckpointStore
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.server.url

    def get(self, path: str, tok: str | None = None, **headers: str) -> Any:
        hdrs = {**(bearer(tok) if tok else {}), **headers}
        return self.http.get(URL(self.url + path, encoded=True), headers=hdrs)

    def post(self, path: str, data: Any, tok: str | None = None) -> Any:
        return self.http.post(self.url + path, data=data, headers=bearer(tok) if tok else {})


@contextlib.asynccontextmanager
async def open_harness(tmp_path: Path, **server_options: Any) -> AsyncIterator[Harness]:
    """A started server on a free port with a fake follower and producer, a store under
    ``tmp_path`` and a client session; ``server_options`` go to :class:`ModelServer`."""
    follower, producer = FakeFollower(), FakeProducer()
    store = LocalCheckpointStore(tmp_path / "ckpt")
    server = ModelServer(
        secret=SECRET,
        store=store,
        features_topic=FEATURES,
        follower=follower,
        producer=producer,
        **server_options,
    )
    async with server, aiohttp.ClientSession() as http:
        yield Harness(server, follower, producer, store, http)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(tmp_path, max_push_bytes=MAX_PUSH, max_push_samples=16) as h:
        yield h
    assert h.follower.stopped


async def publish(h: Harness, *updates: ModelUpdate) -> None:
    for update in updates:
        await h.server.on_update(update)
    h.follower.caught_up.set()
    await h.server.wait_ready(5)


# ------------------------------------------------------------------------ byte ranges


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-9", ByteRange(0, 10, 100)),
        ("bytes=90-200", ByteRange(90, 100, 100)),
        ("bytes=95-", ByteRange(95, 100, 100)),
        ("bytes=-10", ByteRange(90, 100, 100)),
        ("bytes=-1000", ByteRange(0, 100, 100)),
        ("bytes=5-3", None),  # invalid: ignored
        ("bytes=0-1,5-6", None),  # several ranges: whole blob
        ("items=0-1", None),
        ("bytes=a-b", None),
        ("bytes=-", None),
    ],
)
def test_parse_range(header: str | None, expected: ByteRange | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize(
    ("header", "size"), [("bytes=100-", 100), ("bytes=-0", 100), ("bytes=0-", 0)]
)
def test_unsatisfiable_range(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


def test_content_range() -> None:
    assert ByteRange(90, 100, 100).content_range == "bytes 90-99/100"


# --------------------------------------------------------------------- health & ready


async def test_health_ready_and_metrics_are_open(harness: Harness) -> None:
    async with harness.get("/healthz") as r:
        assert r.status == 200
    async with harness.get("/readyz") as r:
        assert r.status == 503
        assert (await r.json())["checks"] == {"registry": False, "producer": True}
    await publish(harness, make_update("v0", make_blob()))
    async with harness.get("/readyz") as r:
        assert r.status == 200 and (await r.json())["ready"] is True
    async with harness.get("/metrics") as r:
        assert r.status == 200 and r.content_type == "text/plain"
        text = await r.text()
    assert "fedex_server_registry_models 1.0" in text
    assert "fedex_server_registry_versions 1.0" in text
    assert 'fedex_server_requests_total{method="GET",route="/readyz",status="503"} 1.0' in text
    assert 'fedex_server_inline_checkpoints_total{outcome="stored"} 1.0' in text


async def test_a_crashed_follower_makes_the_server_unready(harness: Harness) -> None:
    await publish(harness)
    harness.follower.crash = RuntimeError("consumer died")
    async with harness.get("/readyz") as r:
        assert r.status == 503
        assert "consumer died" in (await r.json())["error"]


# ------------------------------------------------------------------------------ auth


async def test_auth_matrix(harness: Harness) -> None:
    await publish(
        harness, make_update("v0", make_blob()), make_update("v0", make_blob(), model_id="m2")
    )
    cases: list[tuple[str | None, int, str | None]] = [
        (None, 401, "missing"),
        ("not-a-token", 401, "malformed"),
        (token(secret="forged"), 401, "bad_signature"),
        (token(now=time.time() - 7200, ttl=60), 401, "expired"),
        (token(["m2"]), 403, "forbidden_model"),
        (token(["m1"]), 200, None),
    ]
    for tok, status, reason in cases:
        for path in ("/v1/models/m1", "/v1/models/m1/checkpoints/v0"):
            async with harness.get(path, tok) as r:
                assert r.status == status, (tok, path)
                if status == 401:
                    assert r.headers["WWW-Authenticate"].startswith('Bearer realm="fedex"')
                if reason is not None:
                    assert (await r.json())["reason"] == reason
    async with harness.get("/v1/models") as r:
        assert r.status == 401
    async with harness.get("/v1/models", token(["m2"])) as r:
        assert [m["id"] for m in (await r.json())["models"]] == ["m2"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/bad!id",
        "/v1/models/...",
        "/v1/models/" + "a" * 129,
        "/v1/models/m1/checkpoints/..",
        "/v1/models/m1/checkpoints/%2E%2E",
        "/v1/models/m1/checkpoints/v0%2F..%2F..%2Fetc",
    ],
)
async def test_bad_path_parameters_are_400(harness: Harness, path: str) -> None:
    await publish(harness, make_update("v0", make_blob()))
    async with harness.get(path, token()) as r:
        assert r.status == 400, await r.text()
        assert (await r.json())["reason"] == "bad_id"


# ----------------------------------------------------------------------------- models


async def test_list_and_get_models(harness: Harness) -> None:
    blob = make_blob()
    await publish(harness, make_update("v0", blob), make_update("v1", make_blob(1), best=False))
    async with harness.get("/v1/models", token()) as r:
        assert (await r.json())["models"] == [
            {
                "id": "m1",
                "backbone": "inception_resnet_v1",
                "cut": "freeze6",
                "num_classes": 10,
                "latest": "v1",
                "best": "v0",
                "versions": 2,
            }
        ]
    async with harness.get("/v1/models/m1", token()) as r:
        body = await r.json()
    assert body["best"]["version"] == "v0" and body["latest"]["version"] == "v1"
    assert body["best"]["sha256"] == sha256_hex(blob)
    assert body["best"]["checkpoint_url"] == "/v1/models/m1/checkpoints/v0"
    assert [v["version"] for v in body["history"]] == ["v0", "v1"]
    assert body["history"][0]["metrics"]["val_accuracy"] == 0.8
    async with harness.get("/v1/models/nope", token()) as r:
        assert r.status == 404 and (await r.json())["reason"] == "unknown_model"


# ------------------------------------------------------------------------ checkpoints


async def test_checkpoint_download_etag_and_ranges(harness: Harness) -> None:
    blob = make_blob()
    sha = sha256_hex(blob)
    await publish(harness, make_update("v0", blob))
    assert harness.store.get("ckpt://m1/v0") == blob  # written from the inline update
    tok = token(["m1"])
    path = "/v1/models/m1/checkpoints/v0"
    async with harness.get(path, tok) as r:
        assert r.status == 200 and await r.read() == blob
        assert r.headers["ETag"] == f'"{sha}"'
        assert r.headers["Accept-Ranges"] == "bytes"
        assert r.headers["Content-Type"] == "application/octet-stream"
    async with harness.get(path, tok, **{"If-None-Match": f'W/"x", "{sha}"'}) as r:
        assert r.status == 304 and r.headers["ETag"] == f'"{sha}"'
    async with harness.get(path, tok, **{"If-None-Match": '"other"'}) as r:
        assert r.status == 200 and await r.read() == blob
    async with harness.get(path, tok, Range="bytes=8-99") as r:
        assert r.status == 206 and await r.read() == blob[8:100]
        assert r.headers["Content-Range"] == f"bytes 8-99/{len(blob)}"
    async with harness.get(path, tok, Range="bytes=-16") as r:
        assert r.status == 206 and await r.read() == blob[-16:]
    async with harness.get(path, tok, Range=f"bytes={len(blob)}-") as r:
        assert r.status == 416 and r.headers["Content-Range"] == f"bytes */{len(blob)}"
    async with harness.get(path, tok, Range="bytes=0-9", **{"If-Range": '"stale"'}) as r:
        assert r.status == 200 and await r.read() == blob
    async with harness.get(path, tok, Range="bytes=0-9", **{"If-Range": f'"{sha}"'}) as r:
        assert r.status == 206 and await r.read() == blob[:10]
    async with harness.http.head(harness.url + path, headers=bearer(tok)) as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) == len(blob)
    async with harness.get("/v1/models/m1/checkpoints/v9", tok) as r:
        assert r.status == 404 and (await r.json())["reason"] == "unknown_version"
    async with harness.get("/metrics") as r:
        text = await r.text()
    assert (
        f"fedex_server_checkpoint_bytes_served_total {float(3 * len(blob) + 92 + 16 + 10)}" in text
    )


async def test_best_and_latest_resolve_in_place(harness: Harness) -> None:
    v0, v1 = make_blob(0), make_blob(1)
    await publish(harness, make_update("v0", v0), make_update("v1", v1, best=False))
    async with harness.get("/v1/models/m1/checkpoints/best", token()) as r:
        assert await r.read() == v0 and r.headers["X-Fedex-Version"] == "v0"
        assert r.headers["Content-Location"] == "/v1/models/m1/checkpoints/v0"
    async with harness.get("/v1/models/m1/checkpoints/latest", token()) as r:
        assert await r.read() == v1 and r.headers["X-Fedex-Version"] == "v1"
    # A device that runs the best polls it with its sha: 304 until a better one exists.
    inm = {"If-None-Match": f'"{sha256_hex(v0)}"'}
    async with harness.get("/v1/models/m1/checkpoints/best", token(), **inm) as r:
        assert r.status == 304


async def test_by_reference_update_serves_the_stored_blob(harness: Harness) -> None:
    blob = make_blob(2)
    harness.store.put("m1", "v0", blob)
    await publish(harness, make_update("v0", blob, inline=False))
    async with harness.get("/v1/models/m1/checkpoints/v0", token()) as r:
        assert r.status == 200 and await r.read() == blob


async def test_missing_blob_and_bad_inline_sha(harness: Harness) -> None:
    blob = make_blob()
    await publish(
        harness,
        make_update("v0", blob, inline=False),  # announced, never stored
        make_update("v1", blob, sha="f" * 64),  # inline bytes do not match the sha
    )
    for version in ("v0", "v1"):
        async with harness.get(f"/v1/models/m1/checkpoints/{version}", token()) as r:
            assert r.status == 404 and (await r.json())["reason"] == "checkpoint_missing"
    assert not harness.store.exists("ckpt://m1/v1")
    async with harness.get("/metrics") as r:
        assert 'inline_checkpoints_total{outcome="sha256_mismatch"} 1.0' in await r.text()


# ------------------------------------------------------------------------------ pushes


async def test_push_is_produced_keyed_by_model(harness: Harness) -> None:
    await publish(harness, make_update("v0", make_blob()))
    data = make_push(n=4)
    async with harness.post("/v1/models/m1/pushes", data, token(["m1"])) as r:
        assert r.status == 202
        assert await r.json() == {"samples": 4, "partition": 0, "offset": 0}
    assert harness.producer.sent == [Sent(FEATURES, data, b"m1")]


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"nope", 400, "truncated"),
        (b"XXXX" + make_push()[4:], 400, "bad_magic"),
        (make_push(label=10), 400, "label_out_of_range"),  # the model has 10 classes
        (make_push(n=17), 400, "oversized_batch"),  # max_push_samples=16
        (make_push(model_id="m2"), 400, "model_mismatch"),  # body's model is not the path's
        (make_push(device_id="dev-2"), 403, "forbidden_device"),
        (b"\0" * (MAX_PUSH + 1), 413, "too_large"),
    ],
)
async def test_bad_pushes(harness: Harness, data: bytes, status: int, reason: str) -> None:
    await publish(harness, make_update("v0", make_blob()))
    async with harness.post("/v1/models/m1/pushes", data, token(["m1"])) as r:
        assert r.status == status
        assert (await r.json())["reason"] == reason
    assert harness.producer.sent == []
    async with harness.get("/metrics") as r:
        assert f'fedex_server_pushes_rejected_total{{reason="{reason}"}} 1.0' in await r.text()


async def test_chunked_oversized_push_is_413(harness: Harness) -> None:
    await publish(harness, make_update("v0", make_blob()))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b"\0" * (MAX_PUSH // 4)

    async with harness.post("/v1/models/m1/pushes", body(), token()) as r:
        assert r.status == 413


async def test_push_to_unknown_or_forbidden_model(harness: Harness) -> None:
    await publish(harness, make_update("v0", make_blob()))
    async with harness.post("/v1/models/m9/pushes", make_push("m9"), token()) as r:
        assert r.status == 404 and (await r.json())["reason"] == "unknown_model"
    async with harness.post("/v1/models/m1/pushes", make_push(), token(["m9"])) as r:
        assert r.status == 403
    async with harness.post("/v1/models/m1/pushes", make_push(), None) as r:
        assert r.status == 401


async def test_push_when_kafka_fails_is_503(harness: Harness) -> None:
    await publish(harness, make_update("v0", make_blob()))
    harness.producer.fail = True
    async with harness.post("/v1/models/m1/pushes", make_push(), token()) as r:
        assert r.status == 503 and (await r.json())["reason"] == "unavailable"


# --------------------------------------------------------------------- client helpers


async def test_fetch_checkpoint_helper(harness: Harness) -> None:
    blob = make_blob()
    sha = sha256_hex(blob)
    await publish(harness, make_update("v0", blob))
    tok = token(["m1"])
    got = await fetch_checkpoint(harness.http, harness.url, tok, "m1", "v0", expected_sha256=sha)
    assert got == blob
    assert (
        await fetch_checkpoint(
            harness.http, harness.url, tok, "m1", "v0", expected_sha256=sha, etag=sha
        )
        is None
    )
    with pytest.raises(DownloadError) as info:
        await fetch_checkpoint(harness.http, harness.url, tok, "m1", "v7", expected_sha256=sha)
    assert (info.value.reason, info.value.status) == ("unknown_version", 404)
    with pytest.raises(DownloadError) as info:
        await fetch_checkpoint(harness.http, harness.url, "bad", "m1", "v0", expected_sha256=sha)
    assert (info.value.reason, info.value.status) == ("malformed", 401)
    with pytest.raises(DownloadError, match="over the limit"):
        await fetch_checkpoint(
            harness.http, harness.url, tok, "m1", "v0", expected_sha256=sha, max_bytes=100
        )


async def test_fetch_checkpoint_detects_a_tampered_blob(harness: Harness) -> None:
    blob = make_blob()
    await publish(harness, make_update("v0", blob))
    tampered = bytearray(blob)
    tampered[-1] ^= 0xFF
    harness.store.put("m1", "v0", bytes(tampered))  # same size, different bytes
    with pytest.raises(DownloadError) as info:
        await fetch_checkpoint(
            harness.http, harness.url, token(), "m1", "v0", expected_sha256=sha256_hex(blob)
        )
    assert info.value.reason == "sha256_mismatch"


async def test_push_over_http_helper(harness: Harness) -> None:
    await publish(harness, make_update("v0", make_blob()))
    receipt = await push_over_http(harness.http, harness.url, token(), make_push(), model_id="m1")
    assert (receipt.samples, receipt.partition, receipt.offset) == (4, 0, 0)
    decoded = codec.decode_push(make_push())
    receipt = await push_over_http(harness.http, harness.url, token(), decoded)
    assert receipt.offset == 1
    with pytest.raises(PushError) as info:
        await push_over_http(harness.http, harness.url, token(), make_push(label=99), model_id="m1")
    assert (info.value.reason, info.value.status) == ("label_out_of_range", 400)


async def test_port_and_idempotent_stop(tmp_path: Path) -> None:
    server = ModelServer(
        secret=SECRET,
        store=LocalCheckpointStore(tmp_path),
        features_topic=FEATURES,
        follower=FakeFollower(),
        producer=FakeProducer(),
    )
    await server.start()
    port = server.port
    assert port > 0 and server.url.endswith(f":{port}")
    await server.stop()
    await server.stop()
    with pytest.raises(RuntimeError):
        _ = server.port
    with pytest.raises(RuntimeError, match="restarted"):
        await server.start()


# ------------------------------------------------------------------- client disconnects


async def wait_for_sample(
    h: Harness, name: str, labels: dict[str, str], value: float, timeout: float = 5.0
) -> None:
    """Waits until the server's metric ``name{labels}`` reads ``value``."""

    async def reached() -> None:
        while True:  # the metric is what an operator sees; poll it as they would
            if h.server.metrics.registry.get_sample_value(name, labels) == value:
                return
            await asyncio.sleep(0.01)

    await asyncio.wait_for(reached(), timeout)


async def test_a_client_dropping_mid_upload_is_client_closed_not_500(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await publish(harness, make_update("v0", make_blob()))
    data = make_push(n=4)
    head = (
        "POST /v1/models/m1/pushes HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token(['m1'])}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    route = {"route": "/v1/models/{id}/pushes"}
    _, writer = await asyncio.open_connection("127.0.0.1", harness.server.port)
    writer.write(head.encode() + data[: len(data) // 2])
    await writer.drain()
    # The handler is reading the body when the client goes away.
    await wait_for_sample(harness, "fedex_server_requests_in_progress", route, 1.0)
    writer.transport.abort()
    labels = {**route, "method": "POST", "status": "client_closed"}
    await wait_for_sample(harness, "fedex_server_requests_total", labels, 1.0)
    await wait_for_sample(harness, "fedex_server_requests_in_progress", route, 0.0)
    assert harness.producer.sent == []
    async with harness.get("/metrics") as r:
        assert 'status="500"' not in await r.text()
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [], [r.getMessage() for r in errors]


# -------------------------------------------------------------------- token schema


async def test_a_signed_token_off_the_schema_is_401_malformed(harness: Harness) -> None:
    """A bare ``"*"`` once granted every model (and a bare id none): now both are refused
    with what was wrong, as is any payload off the one schema."""
    import base64
    import hashlib
    import hmac

    import orjson

    def signed(payload: dict[str, object]) -> str:
        body = base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=").decode()
        sig = hmac.new(SECRET.encode(), f"fdx1.{body}".encode(), hashlib.sha256).digest()
        return f"fdx1.{body}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"

    await publish(harness, make_update("v0", make_blob()))
    now = int(time.time())
    good = {"d": "dev-1", "m": ["m1"], "iat": now, "exp": now + 60}
    async with harness.get("/v1/models/m1", signed(good)) as r:
        assert r.status == 200
    for change in ({"m": "*"}, {"m": "m1"}, {"exp": str(now + 60)}, {"role": "admin"}):
        async with harness.get("/v1/models/m1", signed({**good, **change})) as r:
            assert r.status == 401, change
            body = await r.json()
            assert body["reason"] == "malformed" and "token payload" in body["message"]
            assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]


async def test_a_request_aiohttp_cannot_parse_is_400_and_no_error_log(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """A broken chunked body is the client's fault: 400, an INFO line, no traceback."""
    await publish(harness, make_update("v0", make_blob()))
    head = (
        "POST /v1/models/m1/pushes HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token(['m1'])}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", harness.server.port)
    writer.write(head.encode() + b"5\r\nabcde\r\nZZZ\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.split(b" ")[1] == b"400", answer
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [], [r.getMessage() for r in errors]
    assert any("bad request" in r.getMessage() for r in caplog.records)
