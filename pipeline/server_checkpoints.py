"""Checkpoint downloads of the model server: the version a request names (an alias
resolved), then its blob from the checkpoint store with validators and one byte range.

``ETag`` is the quoted sha256 of the announcement; ``If-None-Match`` gives 304; one
``Range: bytes=a-b`` gives 206 (``If-Range`` with the ETag honoured; several ranges or a
malformed header give the whole blob, as RFC 9110 allows); a range past the end gives 416.
The aliases ``best`` and ``latest`` are resolved in place (no redirect), named by
``X-Fedex-Version`` and ``Content-Location``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from aiohttp import web

from pipeline.checkpoints import CheckpointError, CheckpointStore, checkpoint_uri
from pipeline.http_api import HttpFailure
from pipeline.http_ranges import RangeNotSatisfiable, parse_range
from pipeline.reasons import HttpReason
from pipeline.records import ModelUpdate
from pipeline.registry import ModelEntry

log = logging.getLogger("pipeline.server")

#: Versions resolved to the model's current best / latest.
ALIASES: Final = frozenset({"best", "latest"})
#: Blobs are streamed from the store in pieces of this size.
CHUNK_BYTES: Final = 1024 * 1024
CACHE_CONTROL: Final = "private, no-cache"


def resolve_version(entry: ModelEntry, version: str) -> ModelUpdate:
    """``version`` of the model, or an alias (best, latest) resolved; 404 if none."""
    update = (
        (entry.best if version == "best" else entry.latest)
        if version in ALIASES
        else entry.version(version)
    )
    if update is None:
        raise HttpFailure(
            404, HttpReason.UNKNOWN_VERSION, f"model {entry.model_id!r} has no version {version!r}"
        )
    return update


async def serve_checkpoint(
    request: web.Request,
    store: CheckpointStore,
    update: ModelUpdate,
    *,
    alias: bool,
    on_bytes: Callable[[int], None],
) -> web.StreamResponse:
    """The blob of ``update`` as the answer to ``request`` (GET or HEAD): 304 on a matching
    ``If-None-Match``, 206 for one satisfiable range, else 200; ``on_bytes`` counts what
    was sent."""
    model_id = update.model_id
    headers = {
        "ETag": f'"{update.sha256}"',
        "Accept-Ranges": "bytes",
        "Cache-Control": CACHE_CONTROL,
        "X-Fedex-Version": update.version,
    }
    if alias:
        headers["Content-Location"] = f"/v1/models/{model_id}/checkpoints/{update.version}"
    # If-None-Match uses the weak comparison (RFC 9110 13.1.2) and wins over Range.
    if any(tag.value in ("*", update.sha256) for tag in request.if_none_match or ()):
        return web.Response(status=304, headers=headers)
    try:
        uri = checkpoint_uri(model_id, update.version)
        size = await asyncio.to_thread(store.size, uri)
    except CheckpointError:
        raise HttpFailure(
            404,
            HttpReason.CHECKPOINT_MISSING,
            f"checkpoint of {model_id}/{update.version} is announced but not in the store",
        ) from None
    if size != update.size:
        log.warning(
            "stored checkpoint of %s/%s is %d bytes, its update says %d",
            model_id,
            update.version,
            size,
            update.size,
        )
    if_range = request.headers.get("If-Range")
    try:
        byte_range = (
            parse_range(request.headers.get("Range"), size)
            if if_range is None or if_range.strip() == headers["ETag"]
            else None
        )
    except RangeNotSatisfiable as exc:
        raise HttpFailure(
            416,
            HttpReason.RANGE_NOT_SATISFIABLE,
            str(exc),
            {**headers, "Content-Range": f"bytes */{size}"},
        ) from None
    start, end = (byte_range.start, byte_range.end) if byte_range else (0, size)
    if byte_range is not None:
        headers["Content-Range"] = byte_range.content_range
    response = web.StreamResponse(status=206 if byte_range else 200, headers=headers)
    response.content_type = "application/octet-stream"
    response.content_length = end - start
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    return await _stream(response, store, uri, start, end, on_bytes)


async def _stream(
    response: web.StreamResponse,
    store: CheckpointStore,
    uri: str,
    start: int,
    end: int,
    on_bytes: Callable[[int], None],
) -> web.StreamResponse:
    """Bytes ``[start, end)`` of the stored blob ``uri``, chunk by chunk."""
    position = start
    while position < end:
        try:
            chunk = await asyncio.to_thread(
                store.read_range, uri, position, min(end, position + CHUNK_BYTES)
            )
        except (CheckpointError, OSError) as exc:
            chunk = b""
            log.error("reading %s failed mid-response: %s", uri, exc)
        if not chunk:  # vanished or shrank under us: the client sees a short body
            response.force_close()
            return response
        await response.write(chunk)
        on_bytes(len(chunk))
        position += len(chunk)
    await response.write_eof()
    return response
