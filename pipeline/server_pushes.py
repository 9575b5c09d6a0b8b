"""HTTP pushes of the model server: a wire-format feature push onto the feature log.

A push goes where a Kafka push goes (the feature topic, keyed by model id, acks=all) once
it is within the byte limit (413 ``too_large``), has arrived within the body timeout (408,
the connection closed: a client trickling its body must not hold it for ever), passes the
same checks as the agents' (``pipeline.http_api.check_push``) and comes from the device
its token was issued to (403). The answer is 202 with the push's partition and offset, or
503 while the feature log is unavailable.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from aiohttp import web

from pipeline import auth, codec
from pipeline.broker_health import BrokerHealth
from pipeline.http_api import HttpFailure, check_push, json_response
from pipeline.reasons import HttpReason, PushReason
from pipeline.registry import ModelEntry
from pipeline.server_connections import CUT_BODY_TIMEOUT
from pipeline.server_metrics import ServerMetrics

log = logging.getLogger("pipeline.server")

#: Bytes read from the request body at a time.
READ_CHUNK_BYTES = 64 * 1024


class Producer(Protocol):
    """What the server needs of a Kafka producer (aiokafka's, or a test double)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def send_and_wait(self, topic: str, value: bytes, key: bytes) -> Any: ...


class PushIntake:
    """Takes HTTP pushes onto the feature log for the server (which owns the producer's
    lifecycle, the token check and the registry lookup)."""

    def __init__(
        self,
        *,
        producer: Producer,
        features_topic: str,
        max_push_bytes: int,
        max_push_samples: int,
        body_timeout_s: float,
        metrics: ServerMetrics,
        health: BrokerHealth,
    ) -> None:
        self.producer = producer
        self._features_topic = features_topic
        self._max_push_bytes = max_push_bytes
        self._max_push_samples = max_push_samples
        self._body_timeout_s = body_timeout_s
        self._metrics = metrics
        self._health = health

    async def accept(
        self, request: web.Request, claims: auth.Claims, model_id: str, entry: ModelEntry
    ) -> web.Response:
        """The push in ``request``'s body for ``model_id`` (its token already verified as
        ``claims``), on the feature log: 202, or an :class:`HttpFailure`."""
        limit = self._max_push_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise HttpFailure(
                413, PushReason.TOO_LARGE, f"push is {declared} bytes, the limit is {limit}"
            )
        data = await self._read_body(request, limit)
        push = check_push(data, model_id, entry, max_samples=self._max_push_samples)
        try:
            claims.require_device(push.device_id)
        except auth.AuthError as exc:
            raise HttpFailure(403, exc.reason.value, exc.message) from None
        from aiokafka.errors import KafkaError

        try:
            meta = await self.producer.send_and_wait(
                self._features_topic, value=data, key=codec.encode_key(model_id)
            )
        except (KafkaError, TimeoutError) as exc:
            self._health.failed(exc)
            log.debug("producing a push of %s failed: %s", model_id, exc)
            raise HttpFailure(
                503, HttpReason.UNAVAILABLE, f"the feature log is unavailable ({exc}); retry later"
            ) from None
        self._metrics.pushes_accepted.inc()
        self._metrics.samples_accepted.inc(push.n)
        return json_response(
            {
                "samples": push.n,
                "partition": getattr(meta, "partition", None),
                "offset": getattr(meta, "offset", None),
            },
            status=202,
        )

    async def _read_body(self, request: web.Request, limit: int) -> bytes:
        """The request body, at most ``limit`` bytes (else 413) and within the body timeout
        (else 408)."""
        body = bytearray()
        timeout = self._body_timeout_s
        try:
            async with asyncio.timeout(timeout):
                async for chunk in request.content.iter_chunked(READ_CHUNK_BYTES):
                    body += chunk
                    if len(body) > limit:  # chunked or lying Content-Length
                        raise HttpFailure(
                            413, PushReason.TOO_LARGE, f"push is over the limit of {limit} bytes"
                        )
        except TimeoutError:
            self._metrics.connections_cut.labels(CUT_BODY_TIMEOUT).inc()
            log.info(
                "cut %s: push body not in within %g s (%d bytes read)",
                request.remote,
                timeout,
                len(body),
            )
            raise HttpFailure(
                408,
                HttpReason.TIMEOUT,
                f"the push body did not arrive within {timeout:g} s of its head "
                f"({len(body)} bytes came); send it faster, or smaller pushes",
            ) from None
        return bytes(body)
