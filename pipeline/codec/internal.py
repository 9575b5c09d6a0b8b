"""Records internal to the aggregation agents, never seen by devices or the trainer: the
per-model state in their changelog-backed table, and the batch summary (kind 5) their
ingest stage sends to their Faust agent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import orjson

from pipeline.codec import fields
from pipeline.codec.envelope import I32, I64, ID_PATTERN, CodecError, Kind, Reject, frame, unframe
from pipeline.records import BatchSummary

# ------------------------------------------------------------------ agent table value
#
# The aggregation agents keep one state per model in a changelog-backed table. Its value is
# internal to the agents (not a wire record): versioned orjson of plain fields, which the
# agents turn into their ``ModelState``.

MODEL_STATE_VERSION: Final = 1


def encode_model_state(fields: Mapping[str, Any]) -> bytes:
    """Encodes the plain fields of an agent's per-model state (JSON types only)."""
    return orjson.dumps({"v": MODEL_STATE_VERSION, **fields})


def decode_model_state(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decodes what :func:`encode_model_state` wrote; raises CodecError on anything else."""
    try:
        fields = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CodecError(Reject.BAD_METADATA, f"model state is not valid JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise CodecError(
            Reject.BAD_METADATA, f"model state must be a JSON object, got {type(fields).__name__}"
        )
    version = fields.pop("v", None)
    if version != MODEL_STATE_VERSION:
        raise CodecError(
            Reject.UNSUPPORTED_VERSION,
            f"model state version {version!r} is not supported "
            f"(this codec reads {MODEL_STATE_VERSION})",
        )
    if not isinstance(fields.get("model_id"), str):
        raise CodecError(Reject.MISSING_ID, "model state has no 'model_id'")
    return fields


# ---------------------------------------------------------------- agents' batch summary
#
# Internal to the aggregation agents: their ingest stage validates feature pushes and sends,
# per feature-log partition, one summary of a batch's valid pushes to the agents' summaries
# topic, which their Faust agent counts. Envelope kind 5; metadata names the partition, the
# column length and how many model and device ids follow; the body is five little-endian
# columns of ``n`` entries (offsets i64, log times i64 ms, samples i32, model index i32,
# device index i32) followed by the model ids then the device ids, UTF-8, newline-separated
# (an id never holds a newline).

#: Pushes in one summary at most (an ingest batch is far smaller).
MAX_SUMMARY_PUSHES: Final = 1 << 20
_SUMMARY_ENTRY_BYTES: Final = 28


def encode_summary(summary: BatchSummary) -> bytes:
    """Encodes a batch summary. Raises CodecError if its columns disagree."""
    n = summary.n
    columns = (summary.times_ms, summary.samples, summary.model_index, summary.device_index)
    if any(c.shape != (n,) for c in columns):
        raise CodecError(
            Reject.SIZE_MISMATCH,
            f"summary columns disagree: {n} offsets, then "
            f"{', '.join(str(c.shape[0]) for c in columns)} times, samples, models, devices",
        )
    names = "\n".join((*summary.models, *summary.devices)).encode("utf-8")
    meta = {
        "partition": summary.partition,
        "n": n,
        "models": len(summary.models),
        "devices": len(summary.devices),
    }
    return frame(
        Kind.BATCH_SUMMARY,
        meta,
        [
            np.ascontiguousarray(summary.offsets, dtype=I64).tobytes(),
            np.ascontiguousarray(summary.times_ms, dtype=I64).tobytes(),
            np.ascontiguousarray(summary.samples, dtype=I32).tobytes(),
            np.ascontiguousarray(summary.model_index, dtype=I32).tobytes(),
            np.ascontiguousarray(summary.device_index, dtype=I32).tobytes(),
            names,
        ],
    )


def decode_summary(data: bytes | bytearray | memoryview) -> BatchSummary:
    """Decodes and checks a batch summary; columns are read-only views into ``data``."""
    _, meta, body = unframe(data, Kind.BATCH_SUMMARY)
    partition = fields.nonneg_int(meta, "partition")
    n = fields.nonneg_int(meta, "n")
    if n == 0:
        raise CodecError(Reject.EMPTY_BATCH, "the summary holds no pushes")
    if n > MAX_SUMMARY_PUSHES:
        raise CodecError(
            Reject.OVERSIZED_BATCH,
            f"the summary holds {n} pushes, the limit is {MAX_SUMMARY_PUSHES}",
        )
    model_count = fields.nonneg_int(meta, "models")
    device_count = fields.nonneg_int(meta, "devices")
    size = _SUMMARY_ENTRY_BYTES * n
    if len(body) < size:
        raise CodecError(
            Reject.SIZE_MISMATCH, f"body is {len(body)} bytes; {n} pushes need at least {size}"
        )
    offsets = np.frombuffer(body, I64, n, 0)
    times_ms = np.frombuffer(body, I64, n, 8 * n)
    samples = np.frombuffer(body, I32, n, 16 * n)
    model_index = np.frombuffer(body, I32, n, 20 * n)
    device_index = np.frombuffer(body, I32, n, 24 * n)
    try:
        text = bytes(body[size:]).decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError(Reject.BAD_ID, "model and device ids are not valid UTF-8") from None
    names = text.split("\n") if text else []
    if len(names) != model_count + device_count:
        raise CodecError(
            Reject.SIZE_MISMATCH,
            f"metadata says {model_count} models and {device_count} devices, "
            f"the body holds {len(names)} ids",
        )
    for name in names:
        if not ID_PATTERN.fullmatch(name):
            raise CodecError(Reject.BAD_ID, f"id {name!r:.80} is not a valid model or device id")
    if int(offsets[0]) < 0 or (n > 1 and bool((np.diff(offsets) <= 0).any())):
        raise CodecError(Reject.BAD_FIELD, "offsets must be non-negative and strictly increasing")
    if int(samples.min()) < 1:
        raise CodecError(Reject.BAD_FIELD, "every push in a summary holds at least one sample")
    if int(times_ms.min()) < 0:
        raise CodecError(Reject.BAD_FIELD, "log times must be non-negative")
    for what, index, count in (
        ("model", model_index, model_count),
        ("device", device_index, device_count),
    ):
        if int(index.min()) < 0 or int(index.max()) >= count:
            raise CodecError(
                Reject.BAD_FIELD, f"{what} indexes must be in [0, {count}) for this summary"
            )
    return BatchSummary(
        partition=partition,
        models=tuple(names[:model_count]),
        model_index=model_index,
        offsets=offsets,
        samples=samples,
        times_ms=times_ms,
        device_index=device_index,
        devices=tuple(names[model_count:]),
    )
