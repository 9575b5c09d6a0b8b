"""The simulated network: latency model and tier assignment."""

from __future__ import annotations

import numpy as np
import pytest

from device_sim.network import (
    DEFAULT_MIX,
    INITIAL_WINDOW,
    MSS,
    TIERS,
    NetworkTier,
    TierArrays,
    assign_tiers,
    tier_names,
    transfer_seconds,
)
from pipeline.errors import ConfigError


def test_empty_transfer_costs_one_round_trip() -> None:
    assert transfer_seconds(0, 10.0, 50.0, 0.0) == pytest.approx(0.05)


def test_small_transfer_is_slow_start_bound() -> None:
    # 3 windows' worth of segments: rounds of 10, 20 → 2 round trips of slow start + 1 for the ack.
    nbytes = 25 * MSS
    assert transfer_seconds(nbytes, 1000.0, 100.0, 0.0) == pytest.approx(0.3)


def test_large_transfer_approaches_the_bandwidth() -> None:
    nbytes = 100_000_000
    seconds = float(transfer_seconds(nbytes, 8.0, 50.0, 0.0))
    serialisation = nbytes * 8 / 8e6
    assert serialisation < seconds < serialisation * 1.02


def test_loss_caps_the_rate_below_the_link() -> None:
    nbytes = 10_000_000
    clean = float(transfer_seconds(nbytes, 100.0, 50.0, 0.0))
    lossy = float(transfer_seconds(nbytes, 100.0, 50.0, 0.02))
    mathis_bps = MSS * 8 / (0.05 * np.sqrt(2 * 0.02 / 3))
    assert lossy > 2 * clean
    assert lossy == pytest.approx(nbytes * 8 / mathis_bps, rel=0.05)


def test_zero_delay_link_is_pure_serialisation() -> None:
    assert transfer_seconds(1_000_000, 8.0, 0.0, 0.0) == pytest.approx(1.0)


def test_vectorised_matches_scalar_and_is_monotone() -> None:
    sizes = np.asarray([0, 1, MSS * INITIAL_WINDOW, 10**5, 10**6, 10**7])
    tier = TIERS["lte"]
    many = transfer_seconds(sizes, tier.up_mbps, tier.rtt_ms, tier.loss)
    assert many == pytest.approx([tier.upload_seconds(int(s)) for s in sizes])
    assert (np.diff(many) >= 0).all()


def test_slower_tiers_are_slower() -> None:
    order = ["loopback", "wifi", "lte", "3g", "2g"]
    up = [TIERS[n].upload_seconds(100_000) for n in order]
    down = [TIERS[n].download_seconds(100_000) for n in order]
    assert up == sorted(up) and down == sorted(down)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ConfigError, match="loss"):
        transfer_seconds(10, 1.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="bandwidth"):
        transfer_seconds(10, 0.0, 1.0, 0.0)
    with pytest.raises(ConfigError, match="bandwidths"):
        NetworkTier("x", up_mbps=0, down_mbps=1, rtt_ms=1, loss=0)


def test_assign_tiers_follows_the_mix() -> None:
    rng = np.random.default_rng(0)
    tiers = assign_tiers(100_000, rng)
    shares = np.bincount(tiers, minlength=len(DEFAULT_MIX)) / tiers.size
    assert shares == pytest.approx(list(DEFAULT_MIX.values()), abs=0.01)
    arrays = TierArrays.of(tier_names())
    assert arrays.rtt_ms[tiers[:5]].shape == (5,)
    seconds = arrays.upload_seconds(10_000, tiers[:1000])
    assert seconds.shape == (1000,) and (seconds > 0).all()


def test_assign_tiers_rejects_bad_mixes() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="unknown"):
        assign_tiers(3, rng, {"5g": 1.0})
    with pytest.raises(ConfigError, match="sum to 1"):
        assign_tiers(3, rng, {"wifi": 0.5})
