"""Slow and greedy clients against the real model server on 127.0.0.1: a head or a body
trickled a byte at a time is cut at its timeout, one address cannot hold more than its
share of connections, and every cut shows in ``/metrics``. Timeouts are a fraction of a
second here so each test ends in about a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from pipeline.server import ModelServer
from pipeline.server_connections import ConnectionLimits
from pipeline.settings import Settings
from tests.unit.pipeline.test_server import (
    FakeFollower,
    FakeProducer,
    Harness,
    make_blob,
    make_push,
    make_update,
    open_harness,
    publish,
    token,
    wait_for_sample,
)

HEAD_TIMEOUT = 0.4
BODY_TIMEOUT = 0.4
PER_IP = 3
#: A cut must come within this of its timeout (a loaded 2-core machine included).
SLACK = 2.0


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_harness(
        tmp_path,
        header_timeout_s=HEAD_TIMEOUT,
        body_timeout_s=BODY_TIMEOUT,
        max_connections_per_ip=PER_IP,
    ) as h:
        await publish(h, make_update("v0", make_blob()))
        yield h


def push_head(length: int) -> bytes:
    return (
        "POST /v1/models/m1/pushes HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token(['m1'])}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


class Client(asyncio.Protocol):
    """A raw client connection that keeps every byte the server sends, whatever way the
    connection ends (a reset after a cut must not hide the 408 that came before it)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    @classmethod
    async def open(cls, h: Harness) -> Client:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(cls, "127.0.0.1", h.server.port)
        return client

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def trickle(self, data: bytes, every: float = 0.05) -> None:
        """Writes ``data`` a byte at a time until the server closes the connection."""
        for i in range(len(data)):
            if self.closed.done():
                return
            self.send(data[i : i + 1])
            await asyncio.sleep(every)  # the client's pace, not a wait for the server


async def cut_after(h: Harness, prefix: bytes, rest: bytes) -> tuple[bytes, float]:
    """Sends ``prefix`` at once then trickles ``rest``; returns what the server answered
    before closing the connection and how long that took."""
    client = await Client.open(h)
    started = time.monotonic()
    client.send(prefix)
    sender = asyncio.create_task(client.trickle(rest))
    try:
        await asyncio.wait_for(asyncio.shield(client.closed), HEAD_TIMEOUT + BODY_TIMEOUT + SLACK)
    finally:
        sender.cancel()
        if client.transport is not None:
            client.transport.close()
    return bytes(client.received), time.monotonic() - started


def cuts(h: Harness, reason: str) -> float | None:
    return h.server.metrics.registry.get_sample_value(
        "fedex_server_connections_cut_total", {"reason": reason}
    )


async def test_a_trickled_head_is_cut_with_408(harness: Harness) -> None:
    data = make_push()
    answer, took = await cut_after(harness, b"", push_head(len(data)) + data)
    assert HEAD_TIMEOUT * 0.9 <= took < HEAD_TIMEOUT + SLACK
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["reason"] == "timeout"
    assert cuts(harness, "header_timeout") == 1.0
    assert harness.producer.sent == []


async def test_a_silent_connection_is_cut(harness: Harness) -> None:
    answer, took = await cut_after(harness, b"", b"")
    assert HEAD_TIMEOUT * 0.9 <= took < HEAD_TIMEOUT + SLACK
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert cuts(harness, "header_timeout") == 1.0


async def test_a_trickled_body_is_cut_with_408(harness: Harness) -> None:
    data = make_push()
    answer, took = await cut_after(harness, push_head(len(data)), data)
    assert BODY_TIMEOUT * 0.9 <= took < BODY_TIMEOUT + SLACK
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    body = orjson.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["reason"] == "timeout" and "body" in body["message"]
    assert cuts(harness, "body_timeout") == 1.0
    labels = {"route": "/v1/models/{id}/pushes", "method": "POST", "status": "408"}
    assert (
        harness.server.metrics.registry.get_sample_value("fedex_server_requests_total", labels)
        == 1.0
    )
    assert harness.producer.sent == []


async def test_fifty_tricklers_are_all_cut_and_the_server_still_serves(harness: Harness) -> None:
    """The issue's attack: 50 connections trickling heads and bodies (over the per-address
    limit, so most are refused at once); none outlives its timeout, a fast client then
    gets its push through."""
    data = make_push()
    heads = [cut_after(harness, b"", push_head(len(data)) + data) for _ in range(25)]
    bodies = [cut_after(harness, push_head(len(data)), data) for _ in range(25)]
    started = time.monotonic()
    results = await asyncio.gather(*heads, *bodies)
    assert time.monotonic() - started < HEAD_TIMEOUT + BODY_TIMEOUT + SLACK
    # Each got its 408 or 429, or (a refused one still writing) a reset after the close.
    assert all(answer[9:12] in (b"408", b"429", b"") for answer, _ in results)
    assert sum(answer[9:12] == b"408" for answer, _ in results) >= PER_IP
    await wait_for_sample(harness, "fedex_server_connections_open", {}, 0.0)
    async with harness.post("/v1/models/m1/pushes", data, token(["m1"])) as r:
        assert r.status == 202


async def test_connections_per_address_are_bounded(harness: Harness) -> None:
    held = [await Client.open(harness) for _ in range(PER_IP)]
    await wait_for_sample(harness, "fedex_server_connections_open", {}, float(PER_IP))
    refused = await Client.open(harness)
    await asyncio.wait_for(refused.closed, SLACK)
    answer = bytes(refused.received)
    assert answer.startswith(b"HTTP/1.1 429 "), answer
    assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["reason"] == "too_many_connections"
    assert cuts(harness, "too_many_connections") == 1.0
    for client in held:
        assert client.transport is not None
        client.transport.close()
    await wait_for_sample(harness, "fedex_server_connections_open", {}, 0.0)
    async with harness.get("/healthz") as r:  # the address may connect again
        assert r.status == 200


async def test_a_fast_client_keeps_its_connection_across_requests(harness: Harness) -> None:
    """The head timeout runs from a request's first byte: a kept-alive connection that
    sits idle between requests (longer than the head timeout) is not cut."""
    data = make_push()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
        for _ in range(2):
            async with http.post(
                harness.url + "/v1/models/m1/pushes",
                data=data,
                headers={"Authorization": f"Bearer {token(['m1'])}"},
            ) as r:
                assert r.status == 202
            await asyncio.sleep(HEAD_TIMEOUT * 1.5)  # idle, as a device between pushes
    assert cuts(harness, "header_timeout") is None
    assert (
        harness.server.metrics.registry.get_sample_value("fedex_server_connections_total", {})
        == 1.0
    )


def test_settings_carry_the_limits_to_the_server(tmp_path: Path) -> None:
    settings = Settings(
        auth_secret="s",
        home=tmp_path,
        server_header_timeout_s=1.5,
        server_body_timeout_s=7.0,
        server_max_connections_per_ip=9,
    )
    server = ModelServer.from_settings(settings, follower=FakeFollower(), producer=FakeProducer())
    assert server.connection_limits == ConnectionLimits(1.5, 7.0, 9)
    defaults = Settings()
    for name in ("server_header_timeout_s", "server_body_timeout_s"):
        assert Settings.model_fields[name].description
    assert (defaults.server_header_timeout_s, defaults.server_body_timeout_s) == (10.0, 60.0)
    assert defaults.server_max_connections_per_ip == 128
