"""Checkpoints: the head's weights as safetensors bytes, and the store that keeps them.

A checkpoint holds the thawed layers only (what the cloud trained; the device already has
the frozen prefix). It is safetensors: a length-prefixed JSON header and raw little-endian
tensor bytes, so decoding never unpickles anything and any language can read it. Its
sha256 travels in the model update; :func:`decode_checkpoint` verifies it before anything
else, and every problem is a :class:`CheckpointError`.

The store is a tiny protocol (:class:`CheckpointStore`) with a local implementation that
writes atomically. Importing this module needs torch and safetensors, nothing of Kafka.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from pipeline.errors import FedexError
from pipeline.records import ModelUpdate

log = logging.getLogger(__name__)


class CheckpointError(FedexError):
    """A checkpoint blob is invalid, tampered with, or cannot be stored or found."""


class CheckpointDType(enum.StrEnum):
    """Element type of a checkpoint's floating tensors. fp16 halves the download; integer
    buffers (BatchNorm's ``num_batches_tracked``) are stored as they are."""

    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def torch(self) -> torch.dtype:
        return torch.float16 if self is CheckpointDType.FP16 else torch.float32

    @property
    def encoding(self) -> str:
        """The ``encoding`` field of a model update carrying such a checkpoint."""
        return f"safetensors-{self.value}"


#: Metadata key the encoder sets to the checkpoint's dtype.
DTYPE_KEY = "fedex.dtype"

#: Largest safetensors header accepted (a head has at most a few thousand tensors).
MAX_HEADER_BYTES = 16 * 1024 * 1024


def sha256_hex(blob: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(blob).hexdigest()


def encode_checkpoint(
    state_dict: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
    dtype: CheckpointDType | str = CheckpointDType.FP16,
) -> bytes:
    """Encode a head's state dict (thawed layers only) as safetensors bytes.

    Floating tensors are cast to ``dtype``; ``metadata`` (string → string) rides in the
    header, plus ``fedex.dtype``.
    """
    dtype = CheckpointDType(dtype)
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(
                f"state dict entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        tensor = value.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(dtype.torch)
        # clone: safetensors refuses tensors sharing storage (tied or sliced weights)
        tensors[key] = tensor.contiguous().clone()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[DTYPE_KEY] = dtype.value
    return save(tensors, metadata=meta)


def read_header(blob: bytes | bytearray | memoryview) -> tuple[dict[str, object], dict[str, str]]:
    """Parse and check a safetensors header without touching tensor data: returns
    (tensor entries, metadata). Raises :class:`CheckpointError` on anything malformed."""
    view = memoryview(blob)
    if len(view) < 8:
        raise CheckpointError(f"checkpoint is {len(view)} bytes: too short to be safetensors")
    (length,) = struct.unpack_from("<Q", view, 0)
    if length < 2 or length > MAX_HEADER_BYTES or 8 + length > len(view):
        raise CheckpointError(
            f"checkpoint header length {length} does not fit a {len(view)}-byte blob: "
            "truncated or not a safetensors file"
        )
    try:
        header = json.loads(bytes(view[8 : 8 + length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError("checkpoint header is not a JSON object")
    raw_meta = header.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise CheckpointError("checkpoint metadata must map strings to strings")
    data_len = len(view) - 8 - length
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise CheckpointError(f"checkpoint tensor {name!r} has invalid data offsets")
    return header, dict(raw_meta)


def decode_checkpoint(
    blob: bytes | bytearray | memoryview, *, expected_sha256: str | None = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Decode safetensors bytes into (state dict, metadata).

    With ``expected_sha256`` the digest is checked first: a mismatch means the blob was
    corrupted or tampered with in transit, and nothing of it is parsed. Tensors come back
    in their stored dtype on the CPU; ``load_state_dict`` casts them to the model's.
    """
    data = bytes(blob)
    if expected_sha256 is not None:
        actual = sha256_hex(data)
        if actual != expected_sha256.lower():
            raise CheckpointError(
                f"checkpoint sha256 mismatch: expected {expected_sha256}, got {actual}; "
                "the blob was corrupted or tampered with: fetch it again"
            )
    _, metadata = read_header(data)
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint is not valid safetensors: {exc}") from exc
    return tensors, metadata


# --------------------------------------------------------------------------- the store

_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
URI_SCHEME = "ckpt"


def validate_name(value: str, what: str) -> str:
    """A model id or version usable as one path segment: ``[A-Za-z0-9._-]``, not ``.``/``..``."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or set(value) <= {"."}:
        raise CheckpointError(
            f"invalid {what} {value!r}: use 1-200 characters of [A-Za-z0-9._-], not '.' or '..'"
        )
    return value


def checkpoint_uri(model_id: str, version: str) -> str:
    """The store-relative URI of a checkpoint: ``ckpt://<model_id>/<version>``."""
    return (
        f"{URI_SCHEME}://{validate_name(model_id, 'model id')}/{validate_name(version, 'version')}"
    )


def parse_checkpoint_uri(uri: str) -> tuple[str, str]:
    """``ckpt://<model_id>/<version>`` → (model_id, version), validated."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != URI_SCHEME or parsed.query or parsed.fragment:
        raise CheckpointError(f"not a checkpoint URI: {uri!r} (expected ckpt://<model>/<version>)")
    parts = parsed.path.split("/")
    if len(parts) != 2 or parts[0] != "":
        raise CheckpointError(f"not a checkpoint URI: {uri!r} (expected ckpt://<model>/<version>)")
    return validate_name(parsed.netloc, "model id"), validate_name(parts[1], "version")


@runtime_checkable
class CheckpointStore(Protocol):
    """Where checkpoint blobs live, addressed by ``ckpt://<model_id>/<version>`` URIs.

    ``put`` must be atomic (a reader sees the whole blob or none) and may overwrite: a
    retried training job rewrites the version it owns, and the model update carries the
    sha256 of what was put. The range reads serve HTTP ``Range`` requests without loading
    a blob whole: ``read_range(uri, start, end)`` returns bytes ``[start, end)``.

    An S3-compatible store implements it with four calls and no extra state: ``put`` →
    ``PutObject`` of key ``<prefix>/<model_id>/<version>.safetensors`` (atomic by S3's
    semantics; send ``x-amz-checksum-sha256`` so the service verifies the upload);
    ``get`` → ``GetObject``; ``exists`` / ``size`` → ``HeadObject`` (404 → False /
    :class:`CheckpointError`; ``ContentLength``); ``read_range`` → ``GetObject`` with
    ``Range: bytes=<start>-<end-1>``. URIs stay ``ckpt://…`` so records do not name the
    bucket; the model server may instead redirect to a presigned URL.
    """

    def put(self, model_id: str, version: str, blob: bytes) -> str: ...

    def get(self, uri: str) -> bytes: ...

    def exists(self, uri: str) -> bool: ...

    def size(self, uri: str) -> int: ...

    def read_range(self, uri: str, start: int, end: int) -> bytes: ...


class LocalCheckpointStore:
    """Checkpoints as files: ``<root>/<model_id>/<version>.safetensors``.

    Writes go to a temporary file in the same directory, are fsynced, then renamed over
    the target, so readers never see a partial blob. ``get`` accepts ``ckpt://`` URIs and
    ``file:`` URIs that point inside the root (anything else is refused).
    """

    suffix = ".safetensors"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    def path_for(self, model_id: str, version: str) -> Path:
        model_id = validate_name(model_id, "model id")
        version = validate_name(version, "version")
        return self.root / model_id / f"{version}{self.suffix}"

    def put(self, model_id: str, version: str, blob: bytes) -> str:
        path = self.path_for(model_id, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return checkpoint_uri(model_id, version)

    def _resolve(self, uri: str) -> Path:
        if uri.startswith("file:"):
            path = Path(urllib.parse.unquote(urllib.parse.urlsplit(uri).path)).resolve()
            if path.parent.parent != self.root or path.suffix != self.suffix:
                raise CheckpointError(f"{uri!r} is not a checkpoint of the store at {self.root}")
            return self.path_for(path.parent.name, path.name[: -len(self.suffix)])
        return self.path_for(*parse_checkpoint_uri(uri))

    def file_uri(self, uri: str) -> str:
        """The ``file:`` URI of a checkpoint (for processes sharing this filesystem)."""
        return self._resolve(uri).as_uri()

    def get(self, uri: str) -> bytes:
        path = self._resolve(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint at {uri} ({path})") from None

    def exists(self, uri: str) -> bool:
        return self._resolve(uri).is_file()

    def size(self, uri: str) -> int:
        path = self._resolve(uri)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint at {uri} ({path})") from None

    def read_range(self, uri: str, start: int, end: int) -> bytes:
        if start < 0 or end < start:
            raise CheckpointError(f"invalid byte range [{start}, {end})")
        path = self._resolve(uri)
        try:
            with path.open("rb") as f:
                f.seek(start)
                return f.read(end - start)
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint at {uri} ({path})") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def store_inline(store: CheckpointStore, update: ModelUpdate, blob: bytes) -> str:
    """Put an update's inline checkpoint in ``store`` unless it is there; the outcome
    (stored, present, sha256_mismatch, unstorable, error) for the caller's metrics."""
    name = f"{update.model_id}/{update.version}"
    actual = sha256_hex(blob)
    if actual != update.sha256:
        log.error(
            "inline checkpoint of %s has sha256 %s, the update says %s: not stored",
            name,
            actual,
            update.sha256,
        )
        return "sha256_mismatch"
    try:
        uri = checkpoint_uri(update.model_id, update.version)
    except CheckpointError as exc:
        log.error("inline checkpoint of %s cannot be stored: %s", name, exc)
        return "unstorable"
    try:
        if store.exists(uri) and store.size(uri) == len(blob):
            return "present"
        store.put(update.model_id, update.version, blob)
    except (CheckpointError, OSError) as exc:
        log.error("writing the inline checkpoint of %s failed: %s", name, exc)
        return "error"
    log.info("stored the inline checkpoint of %s (%d bytes)", name, len(blob))
    return "stored"
