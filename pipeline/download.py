"""The client side of the model server, for devices and tools: download a checkpoint
(conditional, sha256-verified) and push features over HTTP.

Both take an ``aiohttp.ClientSession`` the caller owns (one per process or fleet, so
connections are pooled) and a bearer token from ``fedex token issue``. Failures raise a
:class:`ServerCallError` subclass with the server's machine-readable ``reason`` and the
HTTP ``status``; a blob whose bytes do not hash to the announced sha256 raises
:class:`DownloadError` with reason ``sha256_mismatch`` and is never returned.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

import aiohttp
import orjson
from yarl import URL

from pipeline import codec
from pipeline.errors import FedexError
from pipeline.records import FeaturePush

#: Refuse to buffer more than this unless the caller says otherwise (a freeze6 head for
#: 8,631 identities in fp32 is 17.7 MB).
DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024


class ServerCallError(FedexError):
    """A call to the model server failed. ``reason`` is the server's (or this client's)
    machine-readable reason, ``status`` the HTTP status (None: no HTTP answer)."""

    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{reason}: {message}" + (f" (HTTP {status})" if status else ""))
        self.reason = reason
        self.message = message
        self.status = status


class DownloadError(ServerCallError):
    """A checkpoint could not be downloaded, or its bytes do not match the sha256."""


class PushError(ServerCallError):
    """The server refused a push (400 with the codec's reason, 401/403, 404, 413) or
    could not write it (503)."""


@dataclass(frozen=True, slots=True)
class PushReceipt:
    """An accepted push: its sample count and where it landed on the feature log."""

    samples: int
    partition: int | None
    offset: int | None


def checkpoint_url(base_url: str | URL, model_id: str, version: str) -> URL:
    return URL(str(base_url)) / "v1" / "models" / model_id / "checkpoints" / version


def pushes_url(base_url: str | URL, model_id: str) -> URL:
    return URL(str(base_url)) / "v1" / "models" / model_id / "pushes"


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _failure(response: aiohttp.ClientResponse) -> tuple[str, str]:
    """(reason, message) of an error response: the server's JSON, else the status."""
    text = await response.text(errors="replace")
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("reason"), str):
        return body["reason"], str(body.get("message", ""))
    return f"http_{response.status}", (text[:200] or response.reason or "no body")


async def fetch_checkpoint(
    session: aiohttp.ClientSession,
    base_url: str | URL,
    token: str,
    model_id: str,
    version: str,
    *,
    expected_sha256: str,
    etag: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes | None:
    """Downloads the checkpoint blob of ``model_id``/``version`` and verifies it.

    ``etag`` is the sha256 (or quoted ETag) of the blob the caller already has: the server
    answers 304 if it is still current, and this returns None. ``version`` may be ``best``
    or ``latest``; then ``expected_sha256`` must be that of the version the caller
    expects (from the registry), and a newer one is reported as a mismatch.
    """
    headers = _auth(token)
    if etag:
        headers["If-None-Match"] = etag if etag.startswith(('"', "W/")) else f'"{etag}"'
    url = checkpoint_url(base_url, model_id, version)
    try:
        async with session.get(url, headers=headers) as response:
            if response.status == 304:
                return None
            if response.status != 200:
                reason, message = await _failure(response)
                raise DownloadError(reason, f"GET {url}: {message}", response.status)
            if response.content_length is not None and response.content_length > max_bytes:
                raise DownloadError(
                    "too_large",
                    f"{url} is {response.content_length} bytes, over the limit of {max_bytes}",
                    response.status,
                )
            digest = hashlib.sha256()
            parts: list[bytes] = []
            received = 0
            async for chunk in response.content.iter_chunked(1024 * 1024):
                received += len(chunk)
                if received > max_bytes:
                    raise DownloadError(
                        "too_large", f"{url} sent over {max_bytes} bytes", response.status
                    )
                digest.update(chunk)
                parts.append(chunk)
            served_as = response.headers.get("X-Fedex-Version", version)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise DownloadError("connection", f"GET {url} failed: {exc!r}") from exc
    actual = digest.hexdigest()
    if actual != expected_sha256.lower():
        raise DownloadError(
            "sha256_mismatch",
            f"checkpoint {model_id}/{served_as} from {url} has sha256 {actual}, expected "
            f"{expected_sha256}: corrupted or tampered with; do not load it",
        )
    return b"".join(parts)


async def push_over_http(
    session: aiohttp.ClientSession,
    base_url: str | URL,
    token: str,
    push: FeaturePush | bytes,
    *,
    model_id: str | None = None,
) -> PushReceipt:
    """Posts one feature push (a record, or its wire bytes with ``model_id``) and returns
    once it is on the feature log. Raises :class:`PushError` with the server's reason."""
    if isinstance(push, FeaturePush):
        data = codec.encode_push(push)
        model_id = model_id or push.model_id
    else:
        data = bytes(push)
        if model_id is None:
            raise ValueError("pass model_id with a push given as bytes")
    url = pushes_url(base_url, model_id)
    headers = {**_auth(token), "Content-Type": "application/octet-stream"}
    try:
        async with session.post(url, data=data, headers=headers) as response:
            if response.status != 202:
                reason, message = await _failure(response)
                raise PushError(reason, f"POST {url}: {message}", response.status)
            body = orjson.loads(await response.read())
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise PushError("connection", f"POST {url} failed: {exc!r}") from exc
    return PushReceipt(
        samples=int(body["samples"]), partition=body.get("partition"), offset=body.get("offset")
    )
