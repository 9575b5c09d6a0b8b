"""Simulated mobile network tiers: how long a device's transfer of ``n`` bytes takes.

Devices in the fleet push to a real broker on loopback; what a phone would pay on its
network is *simulated* from the bytes actually sent, with a small latency model:

- one round trip for the request and its acknowledgement (Kafka produce with acks, an
  HTTP request and its response): ``rtt``;
- TCP slow start from an initial window of ``INITIAL_WINDOW`` segments of ``MSS`` bytes,
  doubling every round trip until the window covers the bandwidth-delay product
  (Cardwell, Savage and Anderson, "Modeling TCP latency", INFOCOM 2000);
- then the bottleneck rate: the tier's bandwidth, or the loss-limited rate of a Reno-style
  TCP (Mathis et al.: ``MSS / (rtt · sqrt(2p/3))``) when that is lower.

Connections are assumed warm (a device keeps its Kafka/HTTP connection), so no handshake
is charged. Tier numbers are typical medians in the spirit of FedScale's device traces
(bandwidth and availability per tier) and the paper's phone measurements; they are
configuration, not measurements of this machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipeline.errors import ConfigError

#: TCP maximum segment size (bytes) and initial congestion window (segments, RFC 6928).
MSS = 1460
INITIAL_WINDOW = 10


@dataclass(frozen=True, slots=True)
class NetworkTier:
    """One class of link: bandwidths in megabits per second, round trip, packet loss."""

    name: str
    up_mbps: float
    down_mbps: float
    rtt_ms: float
    loss: float

    def __post_init__(self) -> None:
        if self.up_mbps <= 0 or self.down_mbps <= 0:
            raise ConfigError(f"tier {self.name}: bandwidths must be > 0")
        if self.rtt_ms < 0 or not 0.0 <= self.loss < 1.0:
            raise ConfigError(f"tier {self.name}: need rtt ≥ 0 and loss in [0, 1)")

    def upload_seconds(self, nbytes: int) -> float:
        return float(transfer_seconds(nbytes, self.up_mbps, self.rtt_ms, self.loss))

    def download_seconds(self, nbytes: int) -> float:
        return float(transfer_seconds(nbytes, self.down_mbps, self.rtt_ms, self.loss))


TIERS: dict[str, NetworkTier] = {
    t.name: t
    for t in (
        NetworkTier("loopback", up_mbps=10_000.0, down_mbps=10_000.0, rtt_ms=0.05, loss=0.0),
        NetworkTier("wifi", up_mbps=20.0, down_mbps=50.0, rtt_ms=20.0, loss=0.001),
        NetworkTier("lte", up_mbps=8.0, down_mbps=20.0, rtt_ms=50.0, loss=0.005),
        NetworkTier("3g", up_mbps=0.5, down_mbps=2.0, rtt_ms=150.0, loss=0.01),
        NetworkTier("2g", up_mbps=0.1, down_mbps=0.2, rtt_ms=500.0, loss=0.02),
    )
}

#: Share of a fleet's devices per tier (mobile tiers only; loopback is for benchmarks).
DEFAULT_MIX: dict[str, float] = {"wifi": 0.5, "lte": 0.35, "3g": 0.12, "2g": 0.03}


def transfer_seconds(
    nbytes: npt.ArrayLike, mbps: npt.ArrayLike, rtt_ms: npt.ArrayLike, loss: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """Seconds to move ``nbytes`` over links of ``mbps`` / ``rtt_ms`` / ``loss``.

    Vectorised: every argument broadcasts, so one call prices a transfer for a whole
    fleet. Zero bytes still cost the request's round trip.
    """
    size = np.asarray(nbytes, dtype=np.float64)
    rtt = np.asarray(rtt_ms, dtype=np.float64) / 1000.0
    p = np.asarray(loss, dtype=np.float64)
    link_bps = np.asarray(mbps, dtype=np.float64) * 1e6
    if (size < 0).any() or (link_bps <= 0).any() or (rtt < 0).any():
        raise ConfigError("transfer_seconds needs bytes ≥ 0, bandwidth > 0 and rtt ≥ 0")
    if ((p < 0) | (p >= 1)).any():
        raise ConfigError("transfer_seconds needs loss in [0, 1)")
    with np.errstate(divide="ignore", invalid="ignore"):
        mathis_bps = np.where((p > 0) & (rtt > 0), MSS * 8 / (rtt * np.sqrt(2 * p / 3)), np.inf)
        rate_bps = np.minimum(link_bps, mathis_bps)
        segments = np.ceil(size / MSS)
        # Window (segments) that fills the pipe; slow start doubles until it does.
        bdp = rate_bps * rtt / (8 * MSS)
        ss_rounds = np.maximum(0.0, np.ceil(np.log2(np.maximum(bdp, 1e-12) / INITIAL_WINDOW)))
        ss_capacity = INITIAL_WINDOW * (2.0**ss_rounds - 1)
        in_slow_start = segments <= ss_capacity
        rounds_needed = np.ceil(np.log2(segments / INITIAL_WINDOW + 1))
        ss_only = rtt * rounds_needed
        steady = rtt * ss_rounds + (segments - ss_capacity) * MSS * 8 / rate_bps
        body = np.where(in_slow_start, ss_only, steady)
        # On a link with no delay the window never limits: pure serialisation.
        body = np.where(rtt > 0, body, size * 8 / rate_bps)
    return np.asarray(rtt + body, dtype=np.float64)


def tier_names(mix: Mapping[str, float] | None = None) -> list[str]:
    return list((mix or DEFAULT_MIX).keys())


def assign_tiers(
    count: int, rng: np.random.Generator, mix: Mapping[str, float] | None = None
) -> npt.NDArray[np.int8]:
    """Tier index (into ``tier_names(mix)``) per device, drawn by the mix's shares."""
    mix = mix or DEFAULT_MIX
    unknown = set(mix) - set(TIERS)
    if unknown:
        raise ConfigError(f"unknown network tiers {sorted(unknown)}; known: {sorted(TIERS)}")
    shares = np.asarray(list(mix.values()), dtype=np.float64)
    if (shares < 0).any() or not math.isclose(float(shares.sum()), 1.0, rel_tol=1e-6):
        raise ConfigError(f"tier shares must be ≥ 0 and sum to 1, got {dict(mix)}")
    return rng.choice(len(shares), size=count, p=shares).astype(np.int8)


@dataclass(frozen=True, slots=True)
class TierArrays:
    """Per-tier link parameters as arrays, for indexing with a fleet's tier column."""

    names: tuple[str, ...]
    up_mbps: npt.NDArray[np.float64]
    down_mbps: npt.NDArray[np.float64]
    rtt_ms: npt.NDArray[np.float64]
    loss: npt.NDArray[np.float64]

    @classmethod
    def of(cls, names: Sequence[str]) -> TierArrays:
        tiers = [TIERS[n] for n in names]
        return cls(
            names=tuple(names),
            up_mbps=np.asarray([t.up_mbps for t in tiers]),
            down_mbps=np.asarray([t.down_mbps for t in tiers]),
            rtt_ms=np.asarray([t.rtt_ms for t in tiers]),
            loss=np.asarray([t.loss for t in tiers]),
        )

    def upload_seconds(
        self, nbytes: npt.ArrayLike, tier: npt.NDArray[np.integer]
    ) -> npt.NDArray[np.float64]:
        return transfer_seconds(nbytes, self.up_mbps[tier], self.rtt_ms[tier], self.loss[tier])

    def download_seconds(
        self, nbytes: npt.ArrayLike, tier: npt.NDArray[np.integer]
    ) -> npt.NDArray[np.float64]:
        return transfer_seconds(nbytes, self.down_mbps[tier], self.rtt_ms[tier], self.loss[tier])
