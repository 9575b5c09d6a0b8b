"""Synthetic faces and the camera pipelines that distort them: pure, deterministic torch.

Two pieces, both cheap enough to render thousands of 3×160×160 images a second on a CPU:

- :func:`render_faces` draws face-like images of one identity. An identity is a prototype
  (skin, hair, eye, mouth, accessory and background parameters, drawn from
  ``(seed, model, identity)``); every image adds its own pose, expression, lighting and
  background (drawn from ``(seed, model, identity, index)``). Each image depends on its key
  alone, never on what else is in the batch.
- :class:`CameraProfile` is one vendor / sensor tier's image pipeline (system-induced
  heterogeneity, as in HeteroSwitch): optics blur and vignetting, sensor noise, white
  balance and colour matrix, tone curve, and JPEG-like block-DCT quantisation.
  :func:`camera_profiles` draws them from the seed, mildest first; :func:`apply_camera`
  runs one over a batch.

Images are float32 in [0, 1]; :func:`to_backbone_input` maps them to the [-1, 1] range the
backbones are fed (facenet's fixed standardisation).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from pipeline.records import IMAGE_SIZE

#: Domain 0: the clean studio camera of the pre-training data (no distortion).
CLEAN_DOMAIN = 0

_TIERS = ("flagship", "midrange", "budget", "legacy")


def stable_key(text: str) -> int:
    """A 64-bit integer for a name, the same in every process (``hash()`` is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def rng_for(*key: int) -> np.random.Generator:
    """A numpy generator seeded by a tuple of non-negative integers."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


# --------------------------------------------------------------------------- faces


def _identity_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    u = rng.uniform
    return {
        "bg": u(0.1, 0.9, size=(3, 3, 3)),
        "skin": u([0.35, 0.22, 0.15], [0.98, 0.85, 0.75]),
        "face": np.array([u(-0.06, 0.06), u(-0.05, 0.08), u(0.5, 0.7), u(0.66, 0.86)]),
        "cloth_rgb": u(0.0, 1.0, size=3),
        # Identity textures (skin/hair/clothing patterns): orientation, cycles per image,
        # amplitude, for two gratings.
        "pattern": np.stack([u(0, math.pi, 2), u(3.0, 14.0, 2), u(0.04, 0.12, 2)]),
        "hair_rgb": u(0.02, 0.75, size=3),
        "hair": np.array([u(-0.62, -0.2), u(1.02, 1.25), u(0.0, 1.0)]),  # line, volume, long
        "eyes": np.array([u(-0.2, 0.02), u(0.17, 0.32), u(0.06, 0.11), u(0.6, 1.0)]),
        "iris_rgb": u(0.0, 0.7, size=3),
        "brow": np.array([u(0.02, 0.06), u(-0.25, 0.25)]),  # thickness, tilt
        "mouth": np.array([u(0.32, 0.55), u(0.12, 0.3), u(0.025, 0.06)]),
        "lip_rgb": u([0.4, 0.05, 0.1], [0.95, 0.5, 0.55]),
        "texture": rng.normal(0.0, 0.06, size=(3, 5, 5)),
        "extras": (u(size=2) < [0.3, 0.3]).astype(np.float64),  # glasses, beard
        "glasses_rgb": u(0.0, 0.5, size=3),
    }


def _image_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    u = rng.uniform
    return {
        # Small pose jitter: face crops are aligned (facenet's MTCNN) before the backbone.
        "pose": np.array([u(-0.03, 0.03), u(-0.03, 0.03), u(0.96, 1.04), u(-0.05, 0.05)]),
        "light": np.array([u(0.85, 1.1), u(0.0, 0.2), u(0.0, 2 * math.pi)]),
        "expr": np.array([u(0.0, 1.0), u(0.55, 1.0)]),  # mouth open, eye openness
        "bg": rng.normal(0.0, 0.07, size=(3, 3, 3)),
        "phase": u(0.0, 2 * math.pi, size=2),
        "noise_seed": rng.integers(0, 2**31, size=1),
    }


def _stack(params: Sequence[dict[str, np.ndarray]], name: str) -> Tensor:
    return torch.from_numpy(np.stack([p[name] for p in params]).astype(np.float32))


def _grid(size: int) -> tuple[Tensor, Tensor]:
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def _ellipse(
    x: Tensor, y: Tensor, cx: Tensor, cy: Tensor, rx: Tensor, ry: Tensor, soft: float = 0.06
) -> Tensor:
    """Soft mask [B, H, W] of ellipses with per-sample centre and radii ([B] each)."""
    d = ((x - _px(cx)) / _px(rx)) ** 2 + ((y - _px(cy)) / _px(ry)) ** 2
    # Clamped so no mask value (or product of a few) is a subnormal float: arithmetic on
    # those is ~100x slower on x86 and made rendering crawl.
    return torch.sigmoid(((1.0 - d) / soft).clamp(-16.0, 16.0))


def _field(coarse: Tensor, size: int) -> Tensor:
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def _px(t: Tensor) -> Tensor:
    """[B] → [B, 1, 1]: a per-image scalar against [B, H, W] pixel grids."""
    return t[:, None, None]


def _noise(seeds: Sequence[int], size: int) -> Tensor:
    """Unit Gaussian noise [n, 3, size, size], image k's from ``seeds[k]`` alone."""
    if not seeds:
        return torch.zeros(0, 3, size, size)
    return torch.stack(
        [torch.randn(3, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def _paint(image: Tensor, mask: Tensor, rgb: Tensor) -> Tensor:
    m = mask[:, None]
    return image * (1 - m) + rgb[:, :, None, None] * m


def render_faces(seed: int, model_key: int, identity: int, indices: Sequence[int]) -> Tensor:
    """Images ``indices`` of ``identity``: float32 [n, 3, 160, 160] in [0, 1].

    Image ``i`` is a function of ``(seed, model_key, identity, i)`` only.
    """
    n = len(indices)
    size = IMAGE_SIZE
    if n == 0:
        return torch.zeros(0, 3, size, size)
    ident = _identity_params(rng_for(seed, model_key, identity, 0))
    params = [_image_params(rng_for(seed, model_key, identity, 1, int(i))) for i in indices]
    idp = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in ident.items()}
    rep = lambda t: t.expand(n, *t.shape)  # noqa: E731

    # Pose: pixel (u, v) looks at canonical face coordinates R^-1((u, v) - t) / s.
    tx, ty, scale, rot = (_px(t) for t in _stack(params, "pose").unbind(1))
    u, v = _grid(size)
    x = (torch.cos(rot) * (u - tx) + torch.sin(rot) * (v - ty)) / scale
    y = (-torch.sin(rot) * (u - tx) + torch.cos(rot) * (v - ty)) / scale

    bg = _field((rep(idp["bg"]) + _stack(params, "bg")).clamp(0, 1), size)
    image = bg
    fcx, fcy, frx, fry = (rep(t) for t in idp["face"].unbind(0))
    line, volume, long = idp["hair"].unbind(0)
    hair_rgb = rep(idp["hair_rgb"])
    # Back hair: a larger ellipse behind the face, longer for long-haired identities.
    back = _ellipse(x, y, fcx, fcy - 0.05 + 0.1 * long, frx * volume, fry * (volume + 0.15 * long))
    image = _paint(image, back, hair_rgb)
    shoulders = _ellipse(
        x, y, fcx, torch.full_like(fcx, 1.25), frx * 1.9, torch.full_like(fcx, 0.55)
    )
    image = _paint(image, shoulders, rep(idp["cloth_rgb"]))
    # The identity's textures: two gratings (a fixed orientation and frequency per
    # identity, a random phase per image), what pooled features pick up best.
    theta, cycles, amp = idp["pattern"]
    phase = _stack(params, "phase")
    pattern = torch.zeros_like(x)
    for j in range(2):
        along = torch.cos(theta[j]) * x + torch.sin(theta[j]) * y
        pattern += amp[j] * torch.sin(math.pi * cycles[j] * along + _px(phase[:, j]))
    tint = torch.tensor([1.0, 0.8, 0.6])[None, :, None, None]
    image = (image + pattern[:, None] * tint).clamp(0, 1)
    texture = _field(rep(idp["texture"]), size)
    face = _ellipse(x, y, fcx, fcy, frx, fry)
    skin = rep(idp["skin"])
    image = (
        image * (1 - face[:, None]) + (skin[:, :, None, None] + texture).clamp(0, 1) * face[:, None]
    )
    fringe = face * torch.sigmoid(((line - (y - _px(fcy))) / 0.04).clamp(-16.0, 16.0))
    image = _paint(image, fringe, hair_rgb)

    beard, glasses = idp["extras"][1], idp["extras"][0]
    if beard > 0:
        chin = face * torch.sigmoid((((y - _px(fcy)) - 0.3) / 0.05).clamp(-16.0, 16.0))
        image = _paint(image, chin * 0.85, hair_rgb)

    mouth_open, eye_open = _stack(params, "expr").unbind(1)
    image = _paint_eyes(image, x, y, fcx, fcy, idp, eye_open, hair_rgb, bool(glasses > 0))

    my, mw, mh = (rep(t) for t in idp["mouth"].unbind(0))
    mouth = _ellipse(x, y, fcx, fcy + my, mw, mh * (1 + 1.5 * mouth_open), soft=0.1)
    image = _paint(image, mouth, rep(idp["lip_rgb"]))
    nose = _ellipse(x, y, fcx, fcy + 0.12, frx * 0.09, fry * 0.16, soft=0.3)
    image = image * (1 - 0.18 * nose[:, None])

    gain, slope, angle = (_px(t) for t in _stack(params, "light").unbind(1))
    light = gain * (1 + slope * (torch.cos(angle) * u + torch.sin(angle) * v))
    image = image * light[:, None]
    noise = _noise([int(p["noise_seed"][0]) for p in params], size)
    return (image + 0.015 * noise).clamp(0, 1)


def _paint_eyes(
    image: Tensor,
    x: Tensor,
    y: Tensor,
    fcx: Tensor,
    fcy: Tensor,
    idp: dict[str, Tensor],
    eye_open: Tensor,
    hair_rgb: Tensor,
    glasses: bool,
) -> Tensor:
    """Eyes (white, iris, open per image), brows and the identity's glasses if any."""
    n = image.shape[0]

    def rep(t: Tensor) -> Tensor:
        return t.expand(n, *t.shape)

    ey, edx, er, ew = (rep(t) for t in idp["eyes"].unbind(0))
    white = torch.tensor([0.92, 0.92, 0.9]).expand(n, 3)
    iris = rep(idp["iris_rgb"])
    brow_thick, brow_tilt = idp["brow"].unbind(0)
    for side in (-1.0, 1.0):
        ecx = fcx + side * edx
        ecy = fcy + ey
        eye = _ellipse(x, y, ecx, ecy, er * 1.5 * ew, er * eye_open, soft=0.08)
        image = _paint(image, eye, white)
        image = _paint(image, eye * _ellipse(x, y, ecx, ecy, er * 0.7, er * 0.7), iris)
        bcy = ecy - er * 2.2 + side * brow_tilt * 0.1
        brow = _ellipse(x, y, ecx, bcy, er * 1.9, brow_thick.expand(n), soft=0.1)
        image = _paint(image, brow, hair_rgb * 0.8)
        if glasses:
            ring = _ellipse(x, y, ecx, ecy, er * 2.3, er * 1.9, soft=0.05)
            inner = _ellipse(x, y, ecx, ecy, er * 2.0, er * 1.6, soft=0.05)
            image = _paint(image, (ring - inner).clamp(0, 1), rep(idp["glasses_rgb"]))

    return image


# --------------------------------------------------------------------------- cameras


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
    u, v = _grid(size)
    x = x * (1 - profile.vignette * (u**2 + v**2) / 2)[None, None]
    if profile.blur_sigma > 0:
        x = gaussian_blur(x, profile.blur_sigma)
    if profile.sharpen > 0:
        x = x + profile.sharpen * (x - gaussian_blur(x, 1.0))
    noise = _noise([int(s) for s in noise_seeds], size)
    # Shot noise grows with the signal; read noise does not.
    x = x + profile.noise_std * noise * (0.4 + 0.6 * x.clamp(0, 1).sqrt())
    matrix = torch.tensor(profile.colour_matrix, dtype=torch.float32)
    x = torch.einsum("ij,bjhw->bihw", matrix, x).clamp(0, 1)
    x = (x.pow(profile.gamma) - 0.5) * profile.contrast + 0.5 + profile.brightness
    x = jpeg_like(x.clamp(0, 1), profile.jpeg_step)
    return x.clamp(0, 1)


def to_backbone_input(images: Tensor) -> Tensor:
    """[0, 1] images → the [-1, 1] range the backbones are fed."""
    return images * 2.0 - 1.0
