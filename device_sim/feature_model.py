"""Feature-space expansion: a generative model of backbone features, fitted on real ones.

Rendering a face and running it through the real backbone costs ~0.17 s on this CPU, and
the paper's Figure 4 needs 437,855 features of 8,631 identities. So the bank's real
features (rendered images through the pretrained backbone) are used to *fit* a model of
how features vary, and paper-scale worlds are *sampled* from it. A feature at one cut is

    x = μ + a_k + b_v + c_kv + s_v · w

- ``a_k`` the identity's offset (a fitted identity keeps its own; a new identity draws one
  from the between-identity model),
- ``b_v`` the camera's shift (domain 0, the clean studio camera, has none),
- ``c_kv`` how this camera moves this face (cameras do not move every face alike), fixed
  per (identity, domain),
- ``w`` the within-cell variation of one image (pose, light, expression, occlusion), and
  ``s_v`` the camera's scale of it (a noisy sensor spreads features more). How an image
  varies depends on the face (a turned head moves one face's features unlike another's), so
  ``w`` has a covariance per fitted identity, shrunk toward the pooled one; a new identity
  borrows a fitted identity's (:meth:`FeatureModel.borrow_within`).

Each of ``a``, ``c`` and ``w`` is Gaussian with a covariance fitted by the method of
moments (the spread of cell means minus what within-cell noise contributes), kept as a
low-rank factor plus an isotropic rest (:class:`Gaussian`). Everything here is numpy and
pure: fit from arrays, sample with a generator.

What it cannot show: structure of real faces beyond the fitted identities (new identities
live in the span the fitted ones vary in, plus isotropic noise), non-Gaussian clusters
(a cell is one ellipsoid), and camera effects that are not a shift plus a scale.
:func:`fidelity` (used by ``fedex bench expansion``) measures how much that matters: a head
trained on sampled features of the fitted identities against one trained on their real
features, both tested on held-out real features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipeline.errors import FedexError

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

#: Rank of each fitted covariance's low-rank factor (the rest is isotropic).
DEFAULT_RANK = 48


class FeatureModelError(FedexError):
    """A feature model could not be fitted or sampled; the message says what was missing."""


@dataclass(frozen=True, slots=True)
class Gaussian:
    """A zero-mean Gaussian in R^d with covariance ``L Lᵀ + σ² I``."""

    factor: F32  # [d, r]
    sigma: float

    @classmethod
    def from_covariance(cls, cov: npt.NDArray[np.float64], rank: int) -> Gaussian:
        """The top-``rank`` eigen-directions exactly, the rest as their mean variance
        (negative eigenvalues of a moment estimate clipped to 0)."""
        d = cov.shape[0]
        values, vectors = np.linalg.eigh((cov + cov.T) / 2)
        values = np.clip(values[::-1], 0.0, None)
        vectors = vectors[:, ::-1]
        r = max(0, min(rank, d - 1))
        rest = float(values[r:].mean()) if r < d else 0.0
        top = np.clip(values[:r] - rest, 0.0, None)
        factor = (vectors[:, :r] * np.sqrt(top)[None, :]).astype(np.float32)
        return cls(factor, float(np.sqrt(rest)))

    @property
    def dim(self) -> int:
        return int(self.factor.shape[0])

    @property
    def total_variance(self) -> float:
        return float((self.factor.astype(np.float64) ** 2).sum() + self.dim * self.sigma**2)

    def sample(self, n: int, rng: np.random.Generator) -> F32:
        """``n`` draws, [n, d] float32."""
        r = self.factor.shape[1]
        z = rng.standard_normal((n, r), dtype=np.float32)
        eps = rng.standard_normal((n, self.dim), dtype=np.float32)
        return np.asarray(z @ self.factor.T + self.sigma * eps, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class FeatureModel:
    """The fitted model (see the module docstring). ``identity_offsets[k]`` are the
    fitted identities' own ``a_k`` (row order of ``identities``)."""

    mean: F32  # μ [d]
    identities: I64  # fitted identity labels
    identity_offsets: F32  # a_k of the fitted identities [k, d]
    domain_shift: F32  # b_v [domains, d], row 0 zero
    domain_scale: F32  # s_v [domains]
    between: Gaussian  # a_k of a new identity
    interaction: Gaussian  # c_kv
    within: Gaussian  # w, pooled over identities
    cell_means: F32  # empirical μ + a_k + b_v + c_kv of the fitted cells [k, domains, d]
    cell_counts: I64  # features each fitted cell was estimated from [k, domains]
    within_factors: F32  # each fitted identity's w: factors [k, d, r] ...
    within_sigmas: F32  # ... and isotropic rests [k]

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def num_domains(self) -> int:
        return int(self.domain_shift.shape[0])

    def summary(self) -> dict[str, float | int]:
        """Variance per component (trace), what the world's difficulty comes from."""
        shift = float((self.domain_shift.astype(np.float64) ** 2).sum(axis=1)[1:].mean())
        return {
            "dim": self.dim,
            "fitted_identities": int(self.identities.size),
            "domains": self.num_domains,
            "between_variance": round(self.between.total_variance, 4),
            "interaction_variance": round(self.interaction.total_variance, 4),
            "within_variance": round(self.within.total_variance, 4),
            "mean_camera_shift_sq": round(shift, 4),
        }

    def new_identities(self, n: int, rng: np.random.Generator) -> F32:
        """Offsets ``a_k`` of ``n`` new identities."""
        return self.between.sample(n, rng)

    def cell_centres(self, offsets: F32, rng: np.random.Generator) -> F32:
        """``μ + a_k + b_v + c_kv`` for every identity of ``offsets`` and every domain:
        [k, domains, d]."""
        k, v = offsets.shape[0], self.num_domains
        c = self.interaction.sample(k * v, rng).reshape(k, v, self.dim)
        c[:, 0] = 0.0  # the clean camera defines a_k: it moves no face
        return np.asarray(
            self.mean[None, None] + offsets[:, None] + self.domain_shift[None] + c,
            dtype=np.float32,
        )

    def fitted_centres(self, rng: np.random.Generator) -> F32:
        """Centres of the fitted identities [k, domains, d]: the empirical mean of every
        fitted cell, and ``μ + a_k + b_v + c_kv`` (``c`` drawn) of cells the data lacked."""
        drawn = self.cell_centres(self.identity_offsets, rng)
        present = self.cell_counts > 0
        return np.asarray(np.where(present[..., None], self.cell_means, drawn), dtype=np.float32)

    def borrow_within(self, n: int, rng: np.random.Generator) -> I64:
        """For ``n`` new identities, the fitted identity whose within-cell variation each
        takes (uniform)."""
        return rng.integers(0, self.within_factors.shape[0], n).astype(np.int64)

    def sample(
        self,
        centres: F32,
        domains: I64,
        rng: np.random.Generator,
        within: I64 | None = None,
    ) -> F32:
        """One image each: ``centres`` [n, d] (rows of :meth:`cell_centres`) plus within-cell
        variation at each row's camera scale, of fitted identity ``within[i]`` (the pooled
        variation where ``within`` is None)."""
        n = centres.shape[0]
        if within is None:
            w = self.within.sample(n, rng)
        else:
            w = np.empty((n, self.dim), dtype=np.float32)
            r = self.within_factors.shape[2]
            for start in range(0, n, _BLOCK):
                stop = min(n, start + _BLOCK)
                k = within[start:stop]
                z = rng.standard_normal((stop - start, r), dtype=np.float32)
                eps = rng.standard_normal((stop - start, self.dim), dtype=np.float32)
                w[start:stop] = np.einsum("ndr,nr->nd", self.within_factors[k], z)
                w[start:stop] += self.within_sigmas[k][:, None] * eps
        return np.asarray(centres + self.domain_scale[domains][:, None] * w, dtype=np.float32)


#: Rows per block when each row has its own within-cell factor (bounds the gathered
#: factors to ~100 MB at 512 × 48).
_BLOCK = 1024
#: Prior weight (in features) of the pooled within-cell covariance in each identity's.
WITHIN_SHRINKAGE = 16.0


# --------------------------------------------------------------------------- fitting


def fit(
    features: npt.ArrayLike,
    labels: npt.ArrayLike,
    domains: npt.ArrayLike,
    *,
    rank: int = DEFAULT_RANK,
) -> FeatureModel:
    """Fit the model on real features [n, d] with their identities and camera domains.

    Needs domain 0 (clean) and at least one identity seen in two domains, so camera
    shifts and identity offsets can be told apart.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    dom = np.asarray(domains, dtype=np.int64)
    if x.ndim != 2 or x.shape[0] != y.shape[0] or y.shape != dom.shape:
        raise FeatureModelError(f"need features [n, d] and n labels/domains, got {x.shape}")
    ids, y_index = np.unique(y, return_inverse=True)
    num_domains = int(dom.max()) + 1 if dom.size else 0
    if ids.size < 3 or num_domains < 2 or not (dom == 0).any():
        raise FeatureModelError(
            "a feature model needs ≥ 3 identities and the clean domain 0 plus a camera"
        )
    cells = y_index * num_domains + dom
    counts = np.bincount(cells, minlength=ids.size * num_domains).reshape(ids.size, num_domains)
    sums = np.zeros((ids.size * num_domains, x.shape[1]))
    np.add.at(sums, cells, x)
    present = counts > 0
    cell_mean = np.where(
        present[..., None],
        sums.reshape(ids.size, num_domains, -1) / np.maximum(counts, 1)[..., None],
        0.0,
    )
    resid = x - cell_mean[y_index, dom]
    within_cov, scale = _within(resid, dom, counts, num_domains)
    per_identity = [
        Gaussian.from_covariance(cov, rank)
        for cov in _identity_within(resid / scale[dom][:, None], y_index, counts, within_cov)
    ]
    mu, a, b = _anchored(cell_mean, present)
    inter_cov = _interaction(cell_mean, counts, mu, a, b, scale, within_cov)
    between_cov = _between(a, counts, scale, within_cov, inter_cov)
    return FeatureModel(
        mean=mu.astype(np.float32),
        identities=ids.astype(np.int64),
        identity_offsets=a.astype(np.float32),
        domain_shift=b.astype(np.float32),
        domain_scale=scale.astype(np.float32),
        between=Gaussian.from_covariance(between_cov, rank),
        interaction=Gaussian.from_covariance(inter_cov, rank),
        within=Gaussian.from_covariance(within_cov, rank),
        cell_means=cell_mean.astype(np.float32),
        cell_counts=counts.astype(np.int64),
        within_factors=np.stack([g.factor for g in per_identity]),
        within_sigmas=np.asarray([g.sigma for g in per_identity], dtype=np.float32),
    )


def _within(
    resid: npt.NDArray[np.float64], dom: I64, counts: npt.NDArray[np.int64], num_domains: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Pooled within-cell covariance (unbiased: each cell loses one degree of freedom) and
    each domain's scale of it (root of its share of the pooled trace), both expressed
    relative to the clean domain (its scale is 1)."""
    dof = max(1, int((counts - (counts > 0)).sum()))
    cov = resid.T @ resid / dof
    trace = float(np.trace(cov)) or 1.0
    scale = np.ones(num_domains)
    for v in range(num_domains):
        rows = dom == v
        dof_v = int((counts[:, v] - (counts[:, v] > 0)).sum())
        if dof_v > 0:
            scale[v] = np.sqrt(float((resid[rows] ** 2).sum()) / dof_v / trace)
    clean = scale[0] if scale[0] > 0 else 1.0
    return cov * clean**2, scale / clean


def _identity_within(
    resid: npt.NDArray[np.float64],
    y_index: I64,
    counts: npt.NDArray[np.int64],
    pooled: npt.NDArray[np.float64],
) -> list[npt.NDArray[np.float64]]:
    """Each identity's within-cell covariance (residuals already divided by their camera's
    scale), shrunk toward the pooled one with :data:`WITHIN_SHRINKAGE` features' weight."""
    out = []
    for k in range(counts.shape[0]):
        r = resid[y_index == k]
        dof = float(max(0, int(counts[k].sum()) - int((counts[k] > 0).sum())))
        own = r.T @ r if dof > 0 else np.zeros_like(pooled)
        out.append((own + WITHIN_SHRINKAGE * pooled) / (dof + WITHIN_SHRINKAGE))
    return out


def _anchored(
    cell_mean: npt.NDArray[np.float64], present: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """μ, a_k, b_v with the clean camera as the anchor (``c_k0 = 0``, ``b_0 = 0``).

    ``b_v`` is the mean of ``cell_kv - cell_k0`` over identities seen in both; an identity
    with a clean cell is ``μ + a_k = cell_k0``, one without is the mean of its camera cells
    less their shifts; ``a`` is centred over identities.
    """
    anchored = present[:, 0]
    _, v, d = cell_mean.shape
    b = np.zeros((v, d))
    for domain in range(1, v):
        both = anchored & present[:, domain]
        if not both.any():
            raise FeatureModelError(
                f"camera domain {domain} needs an identity seen there and in the clean domain 0"
            )
        b[domain] = (cell_mean[both, domain] - cell_mean[both, 0]).mean(axis=0)
    camera = present.copy()
    camera[:, 0] = False
    unanchored = (cell_mean - b[None]) * camera[..., None]
    centre = np.where(
        anchored[:, None],
        cell_mean[:, 0],
        unanchored.sum(axis=1) / np.maximum(camera.sum(axis=1), 1)[:, None],
    )
    mu = centre.mean(axis=0)
    return mu, centre - mu, b


def _interaction(
    cell_mean: npt.NDArray[np.float64],
    counts: npt.NDArray[np.int64],
    mu: npt.NDArray[np.float64],
    a: npt.NDArray[np.float64],
    b: npt.NDArray[np.float64],
    scale: npt.NDArray[np.float64],
    within: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Covariance of ``c_kv`` from the camera cells' residuals, less what within-cell noise
    puts there. A residual of an anchored identity carries its cell's and its clean cell's
    noise; one of an identity with ``m`` camera cells and no clean one lost ``1/m`` of its
    variance to ``a_k``."""
    present = counts > 0
    anchored = present[:, 0]
    camera = present.copy()
    camera[:, 0] = False
    m = camera.sum(axis=1)
    resid = cell_mean - mu - a[:, None] - b[None]
    noise_of_cell = scale[None, :] ** 2 / np.maximum(counts, 1)
    clean_noise = 1.0 / np.maximum(counts[:, 0], 1)
    keep = np.where(anchored, 1.0, 1.0 - 1.0 / np.maximum(m, 1))[:, None] * camera
    noise = np.where(anchored[:, None], noise_of_cell + clean_noise[:, None], keep * noise_of_cell)
    rows = resid[camera]
    dof = float(keep.sum())
    if dof <= 0:
        return np.zeros_like(within)
    cov = rows.T @ rows / dof - float((noise * camera).sum()) / dof * within
    return np.asarray(cov)


def _between(
    a: npt.NDArray[np.float64],
    counts: npt.NDArray[np.int64],
    scale: npt.NDArray[np.float64],
    within: npt.NDArray[np.float64],
    interaction: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Covariance of ``a_k`` less its estimation noise: an anchored identity's clean-cell
    noise, an unanchored one's noise and interaction averaged over its camera cells."""
    anchored = counts[:, 0] > 0
    camera = counts[:, 1:]
    m = np.maximum((camera > 0).sum(axis=1), 1)
    cam_noise = (scale[None, 1:] ** 2 / np.maximum(camera, 1) * (camera > 0)).sum(axis=1) / m**2
    w_within = np.where(anchored, 1.0 / np.maximum(counts[:, 0], 1), cam_noise)
    w_inter = np.where(anchored, 0.0, 1.0 / m)
    centred = a - a.mean(axis=0)
    n = max(1, a.shape[0] - 1)
    cov = (
        centred.T @ centred / n
        - float(w_within.mean()) * within
        - float(w_inter.mean()) * interaction
    )
    return np.asarray(cov)
