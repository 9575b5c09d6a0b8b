"""Per-vendor accuracy in the fleet summary: the spread, variance and worst vendor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from device_sim.report import vendor_names, vendor_spread


def test_vendor_spread_names_the_worst_vendor_with_the_base_model_and_at_the_end() -> None:
    per_vendor = {
        "vendor-1": {"first_accuracy": 0.6, "accuracy": 0.8},
        "vendor-2": {"first_accuracy": 0.4, "accuracy": 0.75},
        "vendor-3": {"first_accuracy": math.nan, "accuracy": 0.7},
    }
    out = vendor_spread(per_vendor)
    assert out["first"]["spread"] == pytest.approx(0.2)
    assert out["first"]["worst_vendor"] == "vendor-2"  # NaN (never activated) is left out
    assert out["final"] == {
        "spread": pytest.approx(0.1),
        "variance": pytest.approx(float(np.var([0.8, 0.75, 0.7]))),
        "worst_vendor": "vendor-3",
        "worst_accuracy": 0.7,
    }
    assert vendor_spread({}) == {}


def test_vendor_names_start_with_the_clean_camera() -> None:
    assert vendor_names(np.asarray([2, 1, 3])) == ["clean", "vendor-1", "vendor-2", "vendor-3"]
