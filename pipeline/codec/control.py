"""The control records around training: training trigger (kind 2), model update (kind 3)
and dead letter (kind 4). Their metadata carries everything; only an inline checkpoint or
a dead letter's original message rides in the body."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final

from pipeline.codec import fields
from pipeline.codec.envelope import CodecError, Kind, Reject, frame, unframe
from pipeline.records import (
    Backbone,
    Cut,
    DeadLetter,
    ModelMetrics,
    ModelUpdate,
    OffsetRange,
    TrainingTrigger,
    TriggerReason,
)

_SHA256_PATTERN: Final = re.compile(r"[0-9a-f]{64}")


# -------------------------------------------------------------------- training trigger


def encode_trigger(trigger: TrainingTrigger) -> bytes:
    meta = {
        "model_id": trigger.model_id,
        "trigger_id": trigger.trigger_id,
        "ranges": _encode_ranges(trigger.ranges),
        "sample_count": trigger.sample_count,
        "reason": trigger.reason.value,
        "base_version": trigger.base_version,
        "attempt": trigger.attempt,
        "created_at_ms": trigger.created_at_ms,
    }
    return frame(Kind.TRAINING_TRIGGER, meta)


def decode_trigger(data: bytes | bytearray | memoryview) -> TrainingTrigger:
    _, meta, body = unframe(data, Kind.TRAINING_TRIGGER)
    _no_body(body, "a training trigger")
    ranges = _decode_ranges(fields.get(meta, "ranges", list, "a list of [partition, start, end]"))
    attempt = fields.nonneg_int(meta, "attempt")
    return TrainingTrigger(
        model_id=fields.ident(meta, "model_id"),
        trigger_id=fields.ident(meta, "trigger_id"),
        ranges=ranges,
        sample_count=fields.nonneg_int(meta, "sample_count"),
        reason=fields.choice(meta, "reason", TriggerReason, Reject.BAD_FIELD),
        base_version=fields.optional_ident(meta, "base_version"),
        attempt=attempt,
        created_at_ms=fields.nonneg_int(meta, "created_at_ms"),
    )


def _encode_ranges(ranges: tuple[OffsetRange, ...]) -> list[list[int]]:
    return [[r.partition, r.start, r.end] for r in ranges]


def _decode_ranges(raw: list[object]) -> tuple[OffsetRange, ...]:
    ranges = []
    for item in raw:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or any(not isinstance(v, int) or isinstance(v, bool) for v in item)
        ):
            raise CodecError(
                Reject.BAD_FIELD, f"range {item!r:.60} must be [partition, start, end]"
            )
        partition, start, end = item
        if partition < 0 or start < 0 or end < start:
            raise CodecError(
                Reject.BAD_FIELD, f"range {item} needs partition ≥ 0 and 0 ≤ start ≤ end"
            )
        ranges.append(OffsetRange(partition, start, end))
    return tuple(ranges)


# ------------------------------------------------------------------------ model update


def encode_update(update: ModelUpdate) -> bytes:
    m = update.metrics
    meta = {
        "model_id": update.model_id,
        "version": update.version,
        "parent_version": update.parent_version,
        "trigger_id": update.trigger_id,
        "backbone": update.backbone.value,
        "cut": update.cut.value,
        "num_classes": update.num_classes,
        "checkpoint_uri": update.checkpoint_uri,
        "sha256": update.sha256,
        "size": update.size,
        "encoding": update.encoding,
        "metrics": {
            "val_accuracy": m.val_accuracy,
            "champion_val_accuracy": m.champion_val_accuracy,
            "train_samples": m.train_samples,
            "val_samples": m.val_samples,
            "train_seconds": m.train_seconds,
            "epochs": m.epochs,
            "replay_samples": m.replay_samples,
            "eval_samples": m.eval_samples,
        },
        "is_best": update.is_best,
        "created_at_ms": update.created_at_ms,
        "inline": update.checkpoint is not None,
        "trigger_ranges": _encode_ranges(update.trigger_ranges),
    }
    if update.checkpoint is not None and len(update.checkpoint) != update.size:
        raise CodecError(
            Reject.SIZE_MISMATCH,
            f"inline checkpoint is {len(update.checkpoint)} bytes, update says {update.size}",
        )
    return frame(Kind.MODEL_UPDATE, meta, [update.checkpoint] if update.checkpoint else None)


def decode_update(data: bytes | bytearray | memoryview) -> ModelUpdate:
    """Decodes an update. The inline checkpoint's sha256 is the consumer's to verify."""
    _, meta, body = unframe(data, Kind.MODEL_UPDATE)
    size = fields.nonneg_int(meta, "size")
    inline = fields.get(meta, "inline", bool, "true or false")
    if inline and len(body) != size:
        raise CodecError(
            Reject.SIZE_MISMATCH, f"inline checkpoint is {len(body)} bytes, size says {size}"
        )
    if not inline:
        _no_body(body, "a by-reference model update")
    sha = fields.get(meta, "sha256", str, "64 lowercase hex digits")
    if not _SHA256_PATTERN.fullmatch(sha):
        raise CodecError(Reject.BAD_FIELD, f"sha256 {sha!r:.80} is not 64 lowercase hex digits")
    num_classes = fields.nonneg_int(meta, "num_classes")
    if num_classes == 0:
        raise CodecError(Reject.BAD_FIELD, "num_classes must be positive")
    raw = fields.get(meta, "metrics", dict, "an object")
    number = (int, float)
    metrics = ModelMetrics(
        val_accuracy=float(fields.get(raw, "val_accuracy", number, "a number")),
        champion_val_accuracy=fields.float_or_none(
            fields.optional(raw, "champion_val_accuracy", number, "a number")
        ),
        train_samples=fields.nonneg_int(raw, "train_samples"),
        val_samples=fields.nonneg_int(raw, "val_samples"),
        train_seconds=float(fields.get(raw, "train_seconds", number, "a number")),
        epochs=fields.nonneg_int(raw, "epochs"),
        # Absent from updates published before replay and the fixed validation set.
        replay_samples=fields.nonneg_int(raw, "replay_samples") if "replay_samples" in raw else 0,
        eval_samples=fields.nonneg_int(raw, "eval_samples") if "eval_samples" in raw else 0,
    )
    return ModelUpdate(
        model_id=fields.ident(meta, "model_id"),
        version=fields.ident(meta, "version"),
        parent_version=fields.optional_ident(meta, "parent_version"),
        trigger_id=fields.optional_ident(meta, "trigger_id"),
        backbone=fields.choice(meta, "backbone", Backbone, Reject.UNKNOWN_BACKBONE),
        cut=fields.choice(meta, "cut", Cut, Reject.UNKNOWN_CUT),
        num_classes=num_classes,
        checkpoint_uri=fields.get(meta, "checkpoint_uri", str, "a string"),
        sha256=sha,
        size=size,
        encoding=fields.get(meta, "encoding", str, "a string"),
        metrics=metrics,
        is_best=fields.get(meta, "is_best", bool, "true or false"),
        created_at_ms=fields.nonneg_int(meta, "created_at_ms"),
        checkpoint=bytes(body) if inline else None,
        trigger_ranges=_decode_ranges(
            fields.optional(meta, "trigger_ranges", list, "a list of [partition, start, end]") or []
        ),
    )


# ------------------------------------------------------------------------- dead letter


def encode_dead_letter(letter: DeadLetter) -> bytes:
    meta = {
        "topic": letter.topic,
        "partition": letter.partition,
        "offset": letter.offset,
        "reason": letter.reason,
        "message": letter.message,
        "key": None if letter.key is None else base64.b64encode(letter.key).decode("ascii"),
        "at_ms": letter.at_ms,
    }
    return frame(Kind.DEAD_LETTER, meta, [letter.original])


def decode_dead_letter(data: bytes | bytearray | memoryview) -> DeadLetter:
    _, meta, body = unframe(data, Kind.DEAD_LETTER)
    raw_key = fields.optional(meta, "key", str, "base64 text")
    try:
        key = None if raw_key is None else base64.b64decode(raw_key, validate=True)
    except binascii.Error:
        raise CodecError(Reject.BAD_FIELD, "key is not valid base64") from None
    partition: int = fields.get(meta, "partition", int, "an integer")
    offset: int = fields.get(meta, "offset", int, "an integer")
    return DeadLetter(
        original=bytes(body),
        topic=fields.get(meta, "topic", str, "a string"),
        partition=partition,
        offset=offset,
        reason=fields.get(meta, "reason", str, "a string"),
        message=fields.get(meta, "message", str, "a string"),
        key=key,
        at_ms=fields.nonneg_int(meta, "at_ms"),
    )


def _no_body(body: memoryview, what: str) -> None:
    if len(body):
        raise CodecError(Reject.SIZE_MISMATCH, f"{what} has no body, got {len(body)} bytes")
