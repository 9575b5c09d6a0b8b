"""The records tests build, in one place: feature pushes, model updates, triggers.

Every builder returns a valid record by default, with the fields a test cares about as
keyword arguments; anything else stays a plain, deterministic value. Tests use these
instead of writing ``FeaturePush(...)``/``ModelUpdate(...)`` by hand, and never take
fixtures from benchmark modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.records import (
    FEATURE_SHAPES,
    Backbone,
    Cut,
    FeatureDType,
    FeaturePush,
    ModelMetrics,
    ModelUpdate,
    OffsetRange,
    TrainingTrigger,
    TriggerReason,
)

T0_MS = 1_700_000_000_000


def push(
    model_id: str = "faces-1",
    *,
    device: str | int = 0,
    n: int = 10,
    first_id: int = 0,
    sample_ids: Sequence[int] | None = None,
    labels: Sequence[int] | None = None,
    num_classes: int = 10,
    backbone: Backbone = Backbone.INCEPTION_RESNET_V1,
    cut: Cut = Cut.FREEZE6,
    dtype: FeatureDType = FeatureDType.FLOAT16,
    value: float | None = None,
    seed: int | None = None,
    timestamp_ms: int = T0_MS,
) -> FeaturePush:
    """A valid push: ``n`` samples with ids from ``first_id`` (or ``sample_ids``), labels
    ``id % num_classes`` (or ``labels``), random features of the cut's shape (or all
    ``value``) seeded by ``seed`` (default: the first id)."""
    ids = np.asarray(
        sample_ids if sample_ids is not None else range(first_id, first_id + n), np.uint64
    )
    count = int(ids.shape[0])
    shape = FEATURE_SHAPES[backbone][cut]
    rng = np.random.default_rng(int(ids[0]) if seed is None and count else (seed or 0))
    features = (
        rng.standard_normal((count, *shape), dtype=np.float32)
        if value is None
        else np.full((count, *shape), value, np.float32)
    )
    return FeaturePush(
        model_id=model_id,
        device_id=device if isinstance(device, str) else f"dev-{device:06d}",
        backbone=backbone,
        cut=cut,
        dtype=dtype,
        sample_ids=ids,
        labels=np.asarray(labels if labels is not None else ids % num_classes, np.int32),
        timestamps_ms=np.full(count, timestamp_ms, np.int64),
        features=features.astype(dtype.numpy),
    )


def update(
    model_id: str = "faces-1",
    version: str = "v0",
    *,
    trigger_id: str | None = None,
    trigger_ranges: tuple[OffsetRange, ...] = (),
    num_classes: int = 10,
    best: bool = True,
    train: int = 0,
    val: int = 0,
    blob: bytes | None = None,
    inline: bool = True,
    sha256: str = "0" * 64,
    backbone: Backbone = Backbone.INCEPTION_RESNET_V1,
    cut: Cut = Cut.FREEZE6,
) -> ModelUpdate:
    """A model update: ``v0`` (no trigger) unless told otherwise; ``blob`` rides inline
    when ``inline`` (its size is the update's either way)."""
    return ModelUpdate(
        model_id=model_id,
        version=version,
        parent_version=None if version == "v0" else "v0",
        trigger_id=trigger_id,
        backbone=backbone,
        cut=cut,
        num_classes=num_classes,
        checkpoint_uri=f"http://127.0.0.1:8080/v1/models/{model_id}/checkpoints/{version}",
        sha256=sha256,
        size=len(blob or b""),
        encoding="safetensors-fp16",
        metrics=ModelMetrics(0.5, None, train, val, 0.0, 1),
        is_best=best,
        checkpoint=blob if inline else None,
        trigger_ranges=trigger_ranges,
    )


def trigger(
    model_id: str = "faces-1",
    seq: int = 1,
    ranges: Sequence[OffsetRange] = (),
    samples: int = 0,
    *,
    attempt: int = 1,
    reason: TriggerReason = TriggerReason.COUNT,
    base_version: str | None = "v0",
) -> TrainingTrigger:
    return TrainingTrigger(
        model_id=model_id,
        trigger_id=f"{model_id}:{seq}",
        ranges=tuple(ranges),
        sample_count=samples,
        reason=reason,
        base_version=base_version,
        attempt=attempt,
    )
