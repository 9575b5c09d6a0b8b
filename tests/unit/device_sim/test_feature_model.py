"""The feature model: a fit recovers the parts of the features it was generated from."""

from __future__ import annotations

import numpy as np
import pytest

from device_sim.feature_model import FeatureModel, FeatureModelError, Gaussian, fit

D, K, DOMAINS, PER_CELL = 24, 60, 3, 40


def known_model(rng: np.random.Generator) -> FeatureModel:
    """A model with clearly different variance in each part, to generate data from."""

    def gaussian(scale: float, rank: int) -> Gaussian:
        return Gaussian((rng.standard_normal((D, rank)) * scale).astype(np.float32), scale / 4)

    shift = (rng.standard_normal((DOMAINS, D)) * 0.8).astype(np.float32)
    shift[0] = 0.0
    empty = np.zeros((0, DOMAINS, D), dtype=np.float32)
    return FeatureModel(
        mean=rng.standard_normal(D).astype(np.float32),
        identities=np.zeros(0, dtype=np.int64),
        identity_offsets=np.zeros((0, D), dtype=np.float32),
        domain_shift=shift,
        domain_scale=np.asarray([1.0, 1.3, 0.8], dtype=np.float32),
        between=gaussian(1.0, 6),
        interaction=gaussian(0.3, 4),
        within=gaussian(0.6, 8),
        cell_means=empty,
        cell_counts=np.zeros((0, DOMAINS), dtype=np.int64),
        within_factors=np.zeros((0, D, 8), dtype=np.float32),
        within_sigmas=np.zeros(0, dtype=np.float32),
    )


def generate(model: FeatureModel, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    centres = model.cell_centres(model.new_identities(K, rng), rng)
    labels = np.repeat(np.arange(K), DOMAINS * PER_CELL)
    domains = np.tile(np.repeat(np.arange(DOMAINS), PER_CELL), K)
    features = model.sample(centres[labels, domains], domains, rng)
    return features, labels, domains


@pytest.mark.parametrize("novel", [0, K // 4], ids=["all-clean", "quarter-never-clean"])
def test_a_fit_recovers_the_variance_of_every_part_and_the_camera_shifts(novel: int) -> None:
    """As in the world, identities may lack clean images (the base model never saw them)."""
    rng = np.random.default_rng(0)
    truth = known_model(rng)
    features, labels, domains = generate(truth, rng)
    keep = ~((labels < novel) & (domains == 0))
    features, labels, domains = features[keep], labels[keep], domains[keep]
    fitted = fit(features, labels, domains, rank=12)

    assert fitted.dim == D and fitted.num_domains == DOMAINS
    assert np.array_equal(fitted.identities, np.arange(K))
    assert fitted.within.total_variance == pytest.approx(truth.within.total_variance, rel=0.1)
    assert fitted.between.total_variance == pytest.approx(truth.between.total_variance, rel=0.3)
    assert fitted.interaction.total_variance == pytest.approx(
        truth.interaction.total_variance, rel=0.3
    )
    np.testing.assert_allclose(fitted.domain_scale, truth.domain_scale, rtol=0.05)
    # Shifts are estimated from the identities' cell means: error ≈ interaction / √K, a
    # tenth of the shift itself (RMS over dimensions ≈ 0.8).
    error = fitted.domain_shift[1:] - truth.domain_shift[1:]
    assert float(np.sqrt((error**2).mean())) < 0.15
    assert np.array_equal(fitted.domain_shift[0], np.zeros(D))


def test_fitted_centres_are_the_cell_means_and_samples_spread_like_the_data() -> None:
    rng = np.random.default_rng(1)
    features, labels, domains = generate(known_model(rng), rng)
    fitted = fit(features, labels, domains, rank=12)
    centres = fitted.fitted_centres(rng)
    rows = (labels == 5) & (domains == 2)
    np.testing.assert_allclose(centres[5, 2], features[rows].mean(axis=0), atol=1e-4)

    cell = np.full(PER_CELL * 50, 2, dtype=np.int64)
    drawn = fitted.sample(np.repeat(centres[5:6, 2], cell.size, axis=0), cell, rng)
    real_spread = ((features[rows] - features[rows].mean(axis=0)) ** 2).sum(axis=1).mean()
    drawn_spread = ((drawn - centres[5, 2]) ** 2).sum(axis=1).mean()
    assert drawn_spread == pytest.approx(real_spread, rel=0.25)
    assert not np.isin(drawn.view(np.uint32).ravel()[:100], features.view(np.uint32)).all()


def test_a_gaussian_keeps_its_top_directions_and_the_trace() -> None:
    rng = np.random.default_rng(2)
    basis = rng.standard_normal((D, D))
    cov = basis @ np.diag(np.linspace(3.0, 0.01, D)) @ basis.T / D
    g = Gaussian.from_covariance(cov, rank=5)
    assert g.factor.shape == (D, 5)
    assert g.total_variance == pytest.approx(float(np.trace(cov)), rel=1e-4)
    empirical = np.cov(g.sample(20_000, rng).T)
    assert float(np.trace(empirical)) == pytest.approx(float(np.trace(cov)), rel=0.05)


def test_a_fit_without_the_clean_domain_or_enough_identities_says_what_is_missing() -> None:
    x = np.zeros((6, D), dtype=np.float32)
    with pytest.raises(FeatureModelError, match="clean domain 0"):
        fit(x, [0, 1, 2, 0, 1, 2], [1, 1, 1, 2, 2, 2])
    with pytest.raises(FeatureModelError, match="≥ 3 identities"):
        fit(x, [0, 1, 0, 1, 0, 1], [0, 1, 0, 1, 0, 1])
    with pytest.raises(FeatureModelError, match=r"features \[n, d\]"):
        fit(x, [0, 1], [0, 1])


def test_each_identity_keeps_its_own_within_cell_variation() -> None:
    rng = np.random.default_rng(3)
    truth = known_model(rng)
    features, labels, domains = generate(truth, rng)
    centre = features.copy()
    for k in range(K):
        for v in range(DOMAINS):
            rows = (labels == k) & (domains == v)
            centre[rows] = features[rows].mean(axis=0)
    wide = labels < K // 2  # these identities vary twice as much (four times the variance)
    features = np.where(wide[:, None], centre + 2.0 * (features - centre), features)
    fitted = fit(features, labels, domains, rank=12)
    variance = (fitted.within_factors.astype(np.float64) ** 2).sum(axis=(1, 2))
    variance += D * fitted.within_sigmas.astype(np.float64) ** 2
    assert fitted.within_factors.shape == (K, D, 12)
    assert variance[: K // 2].mean() > 2.5 * variance[K // 2 :].mean()
    borrowed = fitted.borrow_within(1000, rng)
    assert borrowed.min() >= 0 and borrowed.max() < K
    draws = fitted.sample(
        np.zeros((2000, D), np.float32), np.ones(2000, np.int64), rng, borrowed[:1].repeat(2000)
    )
    assert draws.shape == (2000, D)
