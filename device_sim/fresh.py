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
of draw ``t`` of identity ``k`` is ``L_k z + s_k e`` (the identity's fitted within-cell
factor and rest) with standard normals ``z = (Z1[i] + Z2[j] + Z3[l]) / √3`` and ``e`` alike:
three of ``3 × pool`` pre-drawn normals, picked by the digits of a bijective scramble of
``t``. That has exactly the fitted within-cell distribution; distinct draw numbers give
distinct triples, so no two samples are alike for the first 2^36 draws (pool 4,096). Two
samples share one of the three parts with probability ≈ 3 / pool, and are then correlated
(1/3): that is what this costs.
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
#: Rows a features call gathers per-identity factors for at once (~100 MB at 512 × 48).
_BLOCK = 1024
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
        pool, third = 1 << pool_bits, np.float32(1.0 / math.sqrt(3.0))
        rng = rng_for(seed, _POOLS)
        r, d = self.models[0].within_factors.shape[2], self.models[0].dim
        #: Standard normal draws of the factor loadings and the isotropic rest, 3 parts.
        self.z_pools = rng.standard_normal((3, pool, r), dtype=np.float32) * third
        self.eps_pools = rng.standard_normal((3, pool, d), dtype=np.float32) * third
        self.centres = np.stack(
            [m.fitted_centres(rng_for(seed, _CENTRES, i)) for i, m in enumerate(self.models)]
        )  # [models, classes, domains, d]
        self.factors = np.stack([m.within_factors for m in self.models])  # [models, k, d, r]
        self.sigmas = np.stack([m.within_sigmas for m in self.models])  # [models, k]
        self.scales = np.stack([m.domain_scale for m in self.models])  # [models, domains]
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
        out = np.empty((rows.size, self.centres.shape[-1]), dtype=np.float16)
        for start in range(0, rows.size, _BLOCK):
            s = slice(start, start + _BLOCK)
            m, ident, dom = model[s], identity[s], domain[s]
            z = self.z_pools[0, i[s]] + self.z_pools[1, j[s]] + self.z_pools[2, k[s]]
            eps = self.eps_pools[0, i[s]] + self.eps_pools[1, j[s]] + self.eps_pools[2, k[s]]
            w = np.einsum("ndr,nr->nd", self.factors[m, ident], z)
            w += self.sigmas[m, ident][:, None] * eps
            x = self.centres[m, ident, dom] + self.scales[m, dom][:, None] * w
            out[s] = np.clip(x, -65504.0, 65504.0)
        return out
