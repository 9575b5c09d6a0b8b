"""The one place the harness builds a :class:`~pipeline.records.FeaturePush`.

Benchmarks push features of many origins (bank rows, fresh draws, random or prototype
features), but every push they build has the same form: one timestamp for all its
samples, labels as int32, ids as uint64 and features stored in the push's precision.
Keeping that form here means a change to the record touches one function, not every
bench.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from pipeline.records import Backbone, Cut, FeatureDType, FeaturePush


def feature_push(
    model_id: str,
    device_id: str,
    *,
    backbone: Backbone,
    cut: Cut,
    sample_ids: npt.ArrayLike | Sequence[int],
    labels: npt.ArrayLike,
    features: npt.ArrayLike,
    timestamp_ms: int,
    dtype: FeatureDType = FeatureDType.FLOAT16,
) -> FeaturePush:
    """A push of ``features`` (converted to ``dtype``, contiguous) with their ``labels``
    and ``sample_ids``, every sample taken at ``timestamp_ms``."""
    ids = np.asarray(sample_ids, dtype=np.uint64)
    return FeaturePush(
        model_id=model_id,
        device_id=device_id,
        backbone=backbone,
        cut=cut,
        dtype=dtype,
        sample_ids=ids,
        labels=np.asarray(labels, dtype=np.int32),
        timestamps_ms=np.full(ids.size, timestamp_ms, dtype=np.int64),
        features=np.ascontiguousarray(features, dtype=dtype.numpy),
    )
