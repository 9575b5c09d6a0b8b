"""The energy model's calibration on the paper's 7.9 mAh per minute of activity."""

from __future__ import annotations

import numpy as np
import pytest

from device_sim.energy import PAPER_MAH_PER_MINUTE, EnergyModel
from pipeline.errors import ConfigError


def test_a_minute_of_each_activity_costs_the_papers_drain() -> None:
    model = EnergyModel.calibrated()
    minute_of_inference = 60 / 0.1  # reference phone: 0.1 s an image
    minute_up = 8e6 / 8 * 60  # 8 Mbit/s for 60 s
    minute_down = 20e6 / 8 * 60
    assert model.mah(minute_of_inference, 0, 0)[()] == pytest.approx(PAPER_MAH_PER_MINUTE)
    assert model.mah(0, minute_up, 0)[()] == pytest.approx(PAPER_MAH_PER_MINUTE)
    assert model.mah(0, 0, minute_down)[()] == pytest.approx(PAPER_MAH_PER_MINUTE)
    # 7.9 mAh/min at 3.85 V is 109.5 J a minute (1.825 W).
    assert model.joules(PAPER_MAH_PER_MINUTE)[()] == pytest.approx(109.494, rel=1e-4)


def test_energy_is_linear_and_faster_phones_spend_less_per_inference() -> None:
    model = EnergyModel.calibrated()
    a = model.mah([10, 20], [1000, 2000], [0, 0], compute_speed=[1.0, 1.0])
    assert a[1] == pytest.approx(2 * a[0])
    fast, slow = model.mah([100, 100], 0, 0, compute_speed=[2.0, 0.5])
    assert slow == pytest.approx(4 * fast)
    push_10_freeze6 = model.mah(0, 10_600, 0)[()]
    assert push_10_freeze6 == pytest.approx(0.0014, rel=0.01)
    assert np.isfinite(model.mah(np.arange(5), np.arange(5), np.arange(5))).all()


def test_invalid_energy_models_are_refused() -> None:
    with pytest.raises(ConfigError):
        EnergyModel(-1.0, 0.0, 0.0)
    with pytest.raises(ConfigError):
        EnergyModel.calibrated(up_mbps=0)
    with pytest.raises(ConfigError):
        EnergyModel.calibrated().mah(1, 0, 0, compute_speed=0.0)
