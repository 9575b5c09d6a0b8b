"""Camera pipelines: how each vendor / sensor tier distorts a rendered face.

A :class:`CameraProfile` is one vendor's image pipeline (system-induced heterogeneity, as
in HeteroSwitch): optics blur and vignetting, sensor noise, white balance and colour
matrix, tone curve, and JPEG-like block-DCT quantisation. :func:`camera_profiles` draws
them from the seed, mildest first; :func:`apply_camera` runs one over a batch. Split from
:mod:`device_sim.images` (which renders the faces) because the two change for different
reasons: the renderer owns identity, the cameras own the vendor domain shift. Pure,
deterministic torch, like the renderer: each image's noise depends on its own seed alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from device_sim.images import CLEAN_DOMAIN, pixel_grid, pixel_noise, rng_for, stable_key

_TIERS = ("flagship", "midrange", "budget", "legacy")


@dataclass(frozen=True, slots=True)
class CameraProfile:
    """One vendor / sensor tier's image pipeline. ``severity`` 0 is the clean camera."""

    domain: int
    name: str
    severity: float
    colour_matrix: tuple[tuple[float, ...], ...]  # white balance x crosstalk
    gamma: float
    contrast: float
    brightness: float
    blur_sigma: float
    sharpen: float
    vignette: float
    noise_std: float
    jpeg_step: float

    @property
    def is_clean(self) -> bool:
        return self.severity == 0.0


def clean_profile() -> CameraProfile:
    identity = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    return CameraProfile(CLEAN_DOMAIN, "studio", 0.0, identity, 1.0, 1.0, 0.0, 0, 0, 0, 0, 0)


def camera_profiles(seed: int, vendors: int, *, strength: float = 1.0) -> list[CameraProfile]:
    """The clean camera (domain 0) and ``vendors`` vendor pipelines (domains 1..vendors).

    Severity rises with the domain (tiers flagship → legacy, cycling); the direction of
    each distortion (colour cast, tone, blur or over-sharpening) is drawn from ``seed``, so
    vendors differ from each other as well as from the clean camera. ``strength`` scales
    every distortion (0 = every vendor is the clean camera).
    """
    profiles = [clean_profile()]
    for v in range(1, vendors + 1):
        rng = rng_for(seed, stable_key("camera"), v)
        s = strength * (0.6 + 0.4 * (v - 1) / max(1, vendors - 1))
        gains = np.exp(rng.normal(0.0, 0.22 * s, size=3))
        cross = np.eye(3) + rng.normal(0.0, 0.08 * s, size=(3, 3))
        cross /= cross.sum(axis=1, keepdims=True)
        matrix = gains[:, None] * cross
        blur_or_sharpen = rng.uniform() < 0.65
        profiles.append(
            CameraProfile(
                domain=v,
                name=f"vendor{v}-{_TIERS[(v - 1) % len(_TIERS)]}",
                severity=float(s),
                colour_matrix=tuple(tuple(float(c) for c in row) for row in matrix),
                gamma=float(np.exp(rng.normal(0.0, 0.3 * s))),
                contrast=float(np.exp(rng.normal(0.0, 0.15 * s))),
                brightness=float(rng.normal(0.0, 0.05 * s)),
                blur_sigma=float(rng.uniform(0.6, 1.8) * s) if blur_or_sharpen else 0.0,
                sharpen=0.0 if blur_or_sharpen else float(rng.uniform(0.8, 2.0) * s),
                vignette=float(rng.uniform(0.1, 0.45) * s),
                noise_std=float((0.01 + rng.uniform(0.02, 0.05)) * s),
                jpeg_step=float(rng.uniform(0.02, 0.08) * s),
            )
        )
    return profiles


def _gaussian_taps(sigma: float) -> list[tuple[int, float]]:
    radius = max(1, math.ceil(2.5 * sigma))
    weights = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-radius, radius + 1)]
    total = sum(weights)
    return [(k, w / total) for k, w in zip(range(-radius, radius + 1), weights, strict=True)]


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with reflected borders, as shifted sums (batch-invariant)."""
    if sigma <= 0:
        return images
    taps = _gaussian_taps(sigma)
    radius = taps[-1][0]
    out = images
    for dim in (-1, -2):
        pad = [radius, radius, 0, 0] if dim == -1 else [0, 0, radius, radius]
        padded = F.pad(out, pad, mode="reflect")
        size = out.shape[dim]
        acc = torch.zeros_like(out)
        for k, w in taps:
            acc += w * padded.narrow(dim, radius + k, size)
        out = acc
    return out


def _dct_matrix(n: int = 8) -> Tensor:
    k = torch.arange(n, dtype=torch.float64)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m.float()


_RGB_TO_YCC = torch.tensor(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)


def jpeg_like(images: Tensor, step: float) -> Tensor:
    """Block-DCT quantisation in YCbCr (what JPEG does to an image, without the entropy
    coding): 8×8 blocks, a step growing with frequency, chroma twice as coarse."""
    if step <= 0:
        return images
    b, c, h, w = images.shape
    ycc = torch.einsum("ij,bjhw->bihw", _RGB_TO_YCC, images)
    d = _dct_matrix()
    blocks = ycc.reshape(b, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5)
    coeffs = d @ blocks @ d.T
    freq = torch.arange(8, dtype=torch.float32)
    q = step * (1 + 0.5 * (freq[:, None] + freq[None, :]))
    q = q.expand(c, 8, 8).clone()
    q[1:] *= 2
    q = q[None, :, None, None]
    coeffs = torch.round(coeffs / q) * q
    blocks = d.T @ coeffs @ d
    ycc = blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_RGB_TO_YCC), ycc)


def apply_camera(images: Tensor, profile: CameraProfile, noise_seeds: Sequence[int]) -> Tensor:
    """Run ``profile``'s pipeline over [n, 3, H, W] images in [0, 1]; ``noise_seeds`` (one
    per image) make the sensor noise a function of each image's key alone."""
    if profile.is_clean:
        return images
    x = images
    size = x.shape[-1]  # images are square (IMAGE_SIZE)
    u, v = pixel_grid(size)
    x = x * (1 - profile.vignette * (u**2 + v**2) / 2)[None, None]
    if profile.blur_sigma > 0:
        x = gaussian_blur(x, profile.blur_sigma)
    if profile.sharpen > 0:
        x = x + profile.sharpen * (x - gaussian_blur(x, 1.0))
    noise = pixel_noise([int(s) for s in noise_seeds], size)
    # Shot noise grows with the signal; read noise does not.
    x = x + profile.noise_std * noise * (0.4 + 0.6 * x.clamp(0, 1).sqrt())
    matrix = torch.tensor(profile.colour_matrix, dtype=torch.float32)
    x = torch.einsum("ij,bjhw->bihw", matrix, x).clamp(0, 1)
    x = (x.pow(profile.gamma) - 0.5) * profile.contrast + 0.5 + profile.brightness
    x = jpeg_like(x.clamp(0, 1), profile.jpeg_step)
    return x.clamp(0, 1)
