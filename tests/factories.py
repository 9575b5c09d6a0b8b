"""The records tests build, in one place: feature pushes, model updates, triggers.

Every builder returns a valid record by default, with the fields a test cares about as
keyword arguments; anything else stays a plain, deterministic value. Tests use these
instead of writing ``FeaturePush(...)``/``ModelUpdate(...)`` by hand, and never take
fixtures from benchmark modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from pipeline.checkpoints import sha256_hex
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
    sample_ids: Sequence[int] | np.ndarray | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    num_classes: int = 10,
    backbone: Backbone = Backbone.INCEPTION_RESNET_V1,
    cut: Cut = Cut.FREEZE6,
    dtype: FeatureDType = FeatureDType.FLOAT16,
    value: float | None = None,
    seed: int | None = None,
    timestamp_ms: int = T0_MS,
    timestamps_ms: Sequence[int] | np.ndarray | None = None,
) -> FeaturePush:
    """A valid push: ``n`` samples with ids from ``first_id`` (or ``sample_ids``), labels
    ``id % num_classes`` (or ``labels``), random features of the cut's shape (or all
    ``value``) seeded by ``seed`` (default: the first id), every sample taken at
    ``timestamp_ms`` (or at its own of ``timestamps_ms``)."""
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
        timestamps_ms=np.asarray(
            timestamps_ms if timestamps_ms is not None else np.full(count, timestamp_ms), np.int64
        ),
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
    parent_version: str | None = "v0",
    checkpoint_uri: str | None = None,
    encoding: str = "safetensors-fp16",
    metrics: ModelMetrics | None = None,
    created_at_ms: int | None = None,
) -> ModelUpdate:
    """A model update: ``v0`` (no trigger, no parent) unless told otherwise, any other
    version the child of ``parent_version``; ``blob`` rides inline when ``inline`` (its
    size is the update's either way). ``metrics`` default to the ``train``/``val`` counts
    at 50 % accuracy; ``created_at_ms`` to now."""
    made = ModelUpdate(
        model_id=model_id,
        version=version,
        parent_version=None if version == "v0" else parent_version,
        trigger_id=trigger_id,
        backbone=backbone,
        cut=cut,
        num_classes=num_classes,
        checkpoint_uri=checkpoint_uri
        or f"http://127.0.0.1:8080/v1/models/{model_id}/checkpoints/{version}",
        sha256=sha256,
        size=len(blob or b""),
        encoding=encoding,
        metrics=metrics or ModelMetrics(0.5, None, train, val, 0.0, 1),
        is_best=best,
        checkpoint=blob if inline else None,
        trigger_ranges=trigger_ranges,
    )
    return made if created_at_ms is None else replace(made, created_at_ms=created_at_ms)


def served_update(
    model_id: str, version: str, blob: bytes, *, sha: str | None = None, **changes: Any
) -> ModelUpdate:
    """An update as the model server stores and serves it: ``blob`` (safetensors) under
    ``ckpt://model/version``, announced by its sha256 (or by ``sha``, to lie about it);
    ``changes`` as :func:`update` takes them."""
    return update(
        model_id,
        version,
        blob=blob,
        sha256=sha or sha256_hex(blob),
        checkpoint_uri=f"ckpt://{model_id}/{version}",
        encoding="safetensors",
        **changes,
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
    """Trigger ``seq`` of ``model_id`` (id ``model:seq``) over ``ranges``."""
    return TrainingTrigger(
        model_id=model_id,
        trigger_id=f"{model_id}:{seq}",
        ranges=tuple(ranges),
        sample_count=samples,
        reason=reason,
        base_version=base_version,
        attempt=attempt,
    )
