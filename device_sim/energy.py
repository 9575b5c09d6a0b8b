"""The energy a simulated device spends: per inference, per byte sent, per byte received.

One documented, linear model, calibrated on the paper's measurement of **7.9 mAh per
minute of activity** on a phone. We read that figure as the battery drain of a phone that
is busy (screen off, SoC or radio working flat out) and take it as the power of *every*
kind of activity the simulator counts; what differs between activities is only how much
of it one unit of work needs at a reference speed:

=============  ==================================  =====================================
activity       reference speed                     energy of one unit
=============  ==================================  =====================================
inference      ``REFERENCE_INFERENCE_S`` = 0.1 s   7.9 / 60 x 0.1  = 0.01317 mAh
               per image (full forward, mid-tier)  (÷ the device's compute speed)
upload         ``REFERENCE_UP_MBPS`` = 8 Mbit/s    7.9 / 60 / 1e6   = 1.317e-7 mAh/byte
               (1 MB/s, the LTE tier's uplink)     = 0.1317 mAh per MB
download       ``REFERENCE_DOWN_MBPS`` = 20 Mbit/s 7.9 / 60 / 2.5e6 = 5.27e-8 mAh/byte
               (2.5 MB/s, the LTE tier's downlink) = 0.0527 mAh per MB
=============  ==================================  =====================================

So one minute of continuous inference, of uploading at 8 Mbit/s, or of downloading at
20 Mbit/s each costs exactly 7.9 mAh (the unit test checks this). Energy is charged per
byte, not per second of transfer: a slow link takes longer but a radio's energy per bit is
roughly what the bytes cost (tail energy and retransmissions are ignored; failed attempts
are charged, since their bytes were sent). Joules use the nominal Li-ion cell voltage
``NOMINAL_VOLTS`` = 3.85 V: 7.9 mAh/min = 109.5 J/min = 1.825 W.

A freeze6 push of 10 float16 features is ~10.6 kB: 0.0014 mAh; a 1.1 MB fp16 head
download (1,000 identities) 0.058 mAh; 100 inferences 1.32 mAh. Inference dominates, as
the paper argues: FedEx adds no on-device training, only the pushes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipeline.errors import ConfigError

#: The paper's battery drain per minute of on-device activity.
PAPER_MAH_PER_MINUTE = 7.9
#: Nominal voltage of a phone's Li-ion cell (mAh → J).
NOMINAL_VOLTS = 3.85
REFERENCE_INFERENCE_S = 0.1
REFERENCE_UP_MBPS = 8.0
REFERENCE_DOWN_MBPS = 20.0


@dataclass(frozen=True, slots=True)
class EnergyModel:
    """Linear energy model in mAh: per inference (at compute speed 1), per byte up, per
    byte down. Build it with :meth:`calibrated` unless you have your own measurements."""

    mah_per_inference: float
    mah_per_byte_up: float
    mah_per_byte_down: float
    volts: float = NOMINAL_VOLTS

    def __post_init__(self) -> None:
        if min(self.mah_per_inference, self.mah_per_byte_up, self.mah_per_byte_down) < 0:
            raise ConfigError("energy per inference and per byte must be ≥ 0")
        if self.volts <= 0:
            raise ConfigError("the cell voltage must be > 0")

    @classmethod
    def calibrated(
        cls,
        mah_per_minute: float = PAPER_MAH_PER_MINUTE,
        *,
        inference_s: float = REFERENCE_INFERENCE_S,
        up_mbps: float = REFERENCE_UP_MBPS,
        down_mbps: float = REFERENCE_DOWN_MBPS,
        volts: float = NOMINAL_VOLTS,
    ) -> EnergyModel:
        """Each activity at its reference speed drains ``mah_per_minute`` (module doc)."""
        if mah_per_minute < 0 or inference_s <= 0 or up_mbps <= 0 or down_mbps <= 0:
            raise ConfigError("calibration needs a drain ≥ 0 and reference speeds > 0")
        per_second = mah_per_minute / 60.0
        return cls(
            mah_per_inference=per_second * inference_s,
            mah_per_byte_up=per_second / (up_mbps * 1e6 / 8),
            mah_per_byte_down=per_second / (down_mbps * 1e6 / 8),
            volts=volts,
        )

    def mah(
        self,
        inferences: npt.ArrayLike,
        bytes_up: npt.ArrayLike,
        bytes_down: npt.ArrayLike,
        compute_speed: npt.ArrayLike = 1.0,
    ) -> npt.NDArray[np.float64]:
        """Energy in mAh (vectorised over devices). A device with compute speed ``s`` runs
        an inference in ``1/s`` of the reference time, at the same power."""
        speed = np.asarray(compute_speed, dtype=np.float64)
        if (speed <= 0).any():
            raise ConfigError("compute speed must be > 0")
        return np.asarray(
            np.asarray(inferences, dtype=np.float64) * self.mah_per_inference / speed
            + np.asarray(bytes_up, dtype=np.float64) * self.mah_per_byte_up
            + np.asarray(bytes_down, dtype=np.float64) * self.mah_per_byte_down,
            dtype=np.float64,
        )

    def joules(self, mah: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """mAh → J at the cell's nominal voltage (1 mAh = 3.6 C)."""
        return np.asarray(np.asarray(mah, dtype=np.float64) * 3.6 * self.volts)

    def as_dict(self) -> dict[str, float]:
        return {
            "mah_per_inference": self.mah_per_inference,
            "mah_per_mb_up": self.mah_per_byte_up * 1e6,
            "mah_per_mb_down": self.mah_per_byte_down * 1e6,
            "volts": self.volts,
            "calibration_mah_per_minute": PAPER_MAH_PER_MINUTE,
        }
