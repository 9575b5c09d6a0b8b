"""Envelope v1: the header, record kinds, rejection reasons, the error, and the metadata
field helpers every record's codec shares.

Every message is an envelope: a 16-byte little-endian header, orjson metadata padded to
8 bytes, then a body (see :mod:`pipeline.codec`). The underscore helpers here are the
codec package's own: its record modules build on them, nothing outside the package should.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import orjson

from pipeline.errors import FedexError
from pipeline.records import FeatureDType

MAGIC: Final = b"FDXS"
VERSION: Final = 1
HEADER: Final = struct.Struct("<4sBBHII")  # magic, version, kind, flags, meta_len, body_len
HEADER_SIZE: Final = HEADER.size  # 16
ALIGN: Final = 8

MAX_META_BYTES: Final = 64 * 1024

ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:@-]{1,128}")

EXPONENT_BITS: Final[dict[FeatureDType, tuple[np.dtype[np.unsignedinteger], int]]] = {
    FeatureDType.FLOAT16: (np.dtype("<u2"), 0x7C00),
    FeatureDType.FLOAT32: (np.dtype("<u4"), 0x7F800000),
}

U64 = np.dtype("<u8")
I64 = np.dtype("<i8")
I32 = np.dtype("<i4")


class Kind(enum.IntEnum):
    """Record kind, byte 5 of the header."""

    FEATURE_PUSH = 1
    TRAINING_TRIGGER = 2
    MODEL_UPDATE = 3
    DEAD_LETTER = 4
    #: Internal to the aggregation agents (ingest stage → Faust agent).
    BATCH_SUMMARY = 5
    #: FedAvg baseline (issue 5): server → devices, device → server.
    ROUND_BROADCAST = 6
    ROUND_UPDATE = 7


class Reject(enum.StrEnum):
    """Why a message was rejected. Stable strings: dead letters and HTTP 400s carry them."""

    TRUNCATED = "truncated"
    BAD_MAGIC = "bad_magic"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_KIND = "unknown_kind"
    WRONG_KIND = "wrong_kind"
    BAD_FLAGS = "bad_flags"
    SIZE_MISMATCH = "size_mismatch"
    BAD_METADATA = "bad_metadata"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"
    MISSING_ID = "missing_id"
    BAD_ID = "bad_id"
    UNKNOWN_CUT = "unknown_cut"
    UNKNOWN_BACKBONE = "unknown_backbone"
    UNKNOWN_DTYPE = "unknown_dtype"
    SHAPE_MISMATCH = "shape_mismatch"
    EMPTY_BATCH = "empty_batch"
    OVERSIZED_BATCH = "oversized_batch"
    NON_FINITE = "non_finite"
    LABEL_OUT_OF_RANGE = "label_out_of_range"
    DUPLICATE_SAMPLE_ID = "duplicate_sample_id"
    # Raised by the agents, which know the registry (the codec alone cannot tell).
    UNKNOWN_MODEL = "unknown_model"
    MODEL_MISMATCH = "model_mismatch"
    # Raised by the trainer: a trigger id it has seen with other offset ranges.
    TRIGGER_CONFLICT = "trigger_conflict"


class CodecError(FedexError):
    """A message could not be encoded or decoded. ``reason`` is machine-readable."""

    def __init__(self, reason: Reject, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------- envelope


def align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def frame(kind: Kind, meta: Mapping[str, Any], body_parts: list[bytes] | None = None) -> bytes:
    meta_bytes = orjson.dumps(meta)
    if len(meta_bytes) > MAX_META_BYTES:
        raise CodecError(
            Reject.BAD_METADATA, f"metadata is {len(meta_bytes)} bytes, over {MAX_META_BYTES}"
        )
    parts = body_parts or []
    body_len = sum(len(p) for p in parts)
    pad = align(HEADER_SIZE + len(meta_bytes)) - HEADER_SIZE - len(meta_bytes)
    header = HEADER.pack(MAGIC, VERSION, kind, 0, len(meta_bytes), body_len)
    return b"".join([header, meta_bytes, b"\0" * pad, *parts])


def unframe(
    data: bytes | bytearray | memoryview, expected: Kind | None
) -> tuple[Kind, dict[str, Any], memoryview]:
    """Checks the header and returns (kind, metadata, body view)."""
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if len(view) < HEADER_SIZE:
        raise CodecError(
            Reject.TRUNCATED,
            f"message is {len(view)} bytes, shorter than the {HEADER_SIZE}-byte header",
        )
    magic, version, kind_byte, flags, meta_len, body_len = HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise CodecError(
            Reject.BAD_MAGIC,
            f"starts with {bytes(magic)!r}, expected {MAGIC!r}: not a FedEx record",
        )
    if version != VERSION:
        raise CodecError(
            Reject.UNSUPPORTED_VERSION,
            f"wire version {version} is not supported (this codec reads version {VERSION})",
        )
    try:
        kind = Kind(kind_byte)
    except ValueError:
        raise CodecError(Reject.UNKNOWN_KIND, f"record kind {kind_byte} is unknown") from None
    if expected is not None and kind is not expected:
        raise CodecError(
            Reject.WRONG_KIND, f"expected a {expected.name.lower()}, got a {kind.name.lower()}"
        )
    if flags != 0:
        raise CodecError(
            Reject.BAD_FLAGS, f"flags must be 0 in version {VERSION}, got {flags:#06x}"
        )
    if meta_len > MAX_META_BYTES:
        raise CodecError(
            Reject.BAD_METADATA, f"metadata length {meta_len} is over {MAX_META_BYTES}"
        )
    body_at = align(HEADER_SIZE + meta_len)
    end = body_at + body_len
    if len(view) < end:
        raise CodecError(
            Reject.TRUNCATED,
            f"header declares {end} bytes (metadata {meta_len}, body {body_len}), "
            f"message has {len(view)}",
        )
    if len(view) > end:
        raise CodecError(
            Reject.SIZE_MISMATCH, f"{len(view) - end} trailing bytes after the declared body"
        )
    try:
        meta = orjson.loads(view[HEADER_SIZE : HEADER_SIZE + meta_len])
    except orjson.JSONDecodeError as exc:
        raise CodecError(Reject.BAD_METADATA, f"metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise CodecError(
            Reject.BAD_METADATA, f"metadata must be a JSON object, got {type(meta).__name__}"
        )
    return kind, meta, view[body_at:end]


def peek_kind(data: bytes | bytearray | memoryview) -> Kind:
    """The kind of a record, checking only the header."""
    return unframe(data, None)[0]
