"""Value equality of records (``same_values``): the codec's round-trip tests rely on it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.records import same_values
from tests.factories import push


def test_equal_pushes_are_the_same_and_one_changed_value_is_not() -> None:
    a = push(n=4, seed=1)
    assert same_values(a, push(n=4, seed=1))
    assert a.same_as(push(n=4, seed=1))
    labels = a.labels.copy()
    labels[2] += 1
    assert not same_values(a, replace(a, labels=labels))
    assert not same_values(a, replace(a, device_id="other"))
    assert not same_values(a, push(n=5, seed=1))  # another shape


def test_nan_features_compare_equal_to_themselves() -> None:
    a = push(n=2, value=float("nan"))
    assert same_values(a, replace(a, features=a.features.copy()))


def test_only_records_of_one_type_compare() -> None:
    a = push(n=2)
    assert not same_values(a, object())
    with pytest.raises(TypeError, match="dataclass records"):
        same_values(np.zeros(2), a)
