"""Fresh features: every labelled inference of a simulated device is a new observation.

A bank holds a few dozen real backbone features per (identity, camera) cell; a fleet
labels hundreds of thousands of samples. Redrawing bank rows would push the same vectors
again and again (and the trainer would validate on copies of what it trained on). So
``fedex devices --features fresh`` (the default) fits a :class:`FeatureModel` on each
model's bank rows (train side only: the held-out rows devices are evaluated on stay unseen)
and gives each sample its cell's fitted centre plus its own within-cell variation.

A sample is a 64-bit *row*: its cell (model, camera, identity) and a draw number. Its
feature is a pure function of the row, so a re-sent push carries the same bytes, and a
fleet of any size keeps 8 bytes per cached sample instead of a 1 KB vector. The variation
of draw ``t`` is ``(A[i] + B[j] + C[k]) / √3``: three of ``3 × pool`` pre-drawn within-cell
draws, picked by the digits of a bijective scramble of ``t``. That sum has exactly the
fitted within-cell distribution; distinct draw numbers give distinct triples, so no two
samples are alike for the first 2^36 draws (pool 4,096). Two samples share a pool draw with
probability ≈ 3 / pool, and are then correlated (1/3): that is what this costs.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from device_sim.bank import FeatureBank
from device_sim.feature_model import DEFAULT_RANK, FeatureModel, fit
from device_sim.images import rng_for, stable_key
from pipeline.errors import ConfigError

I64 = npt.NDArray[np.int64]

#: Bits of a row that number the draw; the cell is above them.
DRAW_BITS = 36
_DRAW_MASK = (1 << DRAW_BITS) - 1
_POOLS = stable_key("fresh/pools")
_CENTRES = stable_key("fresh/centres")


def scramble(t: I64) -> I64:
    """A bijection of ``[0, 2^36)``: multiply by an odd constant, then xor-shift."""
    x = (np.asarray(t, dtype=np.uint64) * np.uint64(0x9E3779B97)) & np.uint64(_DRAW_MASK)
    x ^= x >> np.uint64(18)
    return x.astype(np.int64)


def pool_digits(code: I64, pool_bits: int) -> tuple[I64, I64, I64]:
    """The three pool indices of a scrambled draw number."""
    mask = (1 << pool_bits) - 1
    return code & mask, (code >> pool_bits) & mask, (code >> (2 * pool_bits)) & mask


class FreshFeatures:
    """Fresh feature source of a fleet; ``draw`` matches :data:`device_sim.devices.DrawRows`."""

    def __init__(
        self,
        bank: FeatureBank,
        *,
        vendors: npt.ArrayLike,
        seed: int = 0,
        pool_bits: int = 12,
        rank: int = DEFAULT_RANK,
    ) -> None:
        if not 1 <= pool_bits <= DRAW_BITS // 3:
            raise ConfigError(f"pool_bits must be in [1, {DRAW_BITS // 3}], got {pool_bits}")
        self.vendor = np.asarray(vendors, dtype=np.int64)
        self.pool_bits = pool_bits
        self.num_domains, self.num_classes = bank.num_domains, bank.num_classes
        cells = len(bank.model_ids) * self.num_domains * self.num_classes
        if cells >= 1 << (63 - DRAW_BITS):
            raise ConfigError(f"{cells} cells do not fit a fresh row's {63 - DRAW_BITS} bits")
        self.models = [self._fit(bank, m, rank) for m in bank.model_ids]
        pool = 1 << pool_bits
        centres, pools, scales = [], [], []
        for index, model in enumerate(self.models):
            centres.append(model.fitted_centres(rng_for(seed, _CENTRES, index)))
            drawn = model.within.sample(3 * pool, rng_for(seed, _POOLS, index))
            pools.append(drawn.reshape(3, pool, model.dim) / np.float32(math.sqrt(3.0)))
            scales.append(model.domain_scale)
        self.centres = np.stack(centres)  # [models, classes, domains, d]
        self.pools = np.stack(pools)  # [models, 3, pool, d]
        self.scales = np.stack(scales)  # [models, domains]
        self._next = 0
        self.drawn = 0

    @staticmethod
    def _fit(bank: FeatureBank, model_id: str, rank: int) -> FeatureModel:
        rows = bank.select(model_id, holdout=False)
        model = fit(bank.features[rows], bank.labels[rows], bank.domains[rows], rank=rank)
        if not np.array_equal(model.identities, np.arange(bank.num_classes)):
            raise ConfigError(f"bank has train rows of only {model.identities.size} identities")
        return model

    def draw(
        self,
        model_index: int,
        devices: I64,
        identities: I64,
        rng: np.random.Generator,
    ) -> I64:
        """One new sample of each (device, identity): its row."""
        del rng  # the draw number, not the fleet's generator, makes a sample new
        n = int(np.asarray(devices).size)
        if self._next + n > _DRAW_MASK:
            raise ConfigError("fresh feature source exhausted (2^36 draws)")
        domain = self.vendor[devices]
        cell = (model_index * self.num_domains + domain) * self.num_classes + identities
        numbers = np.arange(self._next, self._next + n, dtype=np.int64)
        self._next += n
        self.drawn += n
        return np.asarray((cell << DRAW_BITS) | scramble(numbers), dtype=np.int64)

    def features(self, rows: I64) -> npt.NDArray[np.float16]:
        """The float16 features of ``rows`` (a pure function of each row)."""
        rows = np.asarray(rows, dtype=np.int64)
        cell, code = rows >> DRAW_BITS, rows & _DRAW_MASK
        identity = cell % self.num_classes
        domain = (cell // self.num_classes) % self.num_domains
        model = cell // (self.num_classes * self.num_domains)
        i, j, k = pool_digits(code, self.pool_bits)
        w = self.pools[model, 0, i] + self.pools[model, 1, j] + self.pools[model, 2, k]
        x = self.centres[model, identity, domain] + self.scales[model, domain][..., None] * w
        return np.clip(x, -65504.0, 65504.0).astype(np.float16)
