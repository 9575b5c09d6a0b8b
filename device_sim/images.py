"""Synthetic faces: pure, deterministic torch.

Cheap enough to render a hundred 3×160×160 images a second on one CPU core:

- :func:`render_faces` draws face-like images of one identity. An identity is a prototype
  (skin, hair, eye, mouth, glasses, beard, face shape and texture gratings, drawn from
  ``(seed, model, identity)``); every image adds its own draws from
  ``(seed, model, identity, index)``, scaled by one ``variation`` knob:

  - **scene**: its own background field, two clutter blobs and clothing colour (the
    identity's background and clothing fade out as ``variation`` → 1);
  - **pose**: shift up to ±0.15 of the half-width, scale ×e^±0.15, roll ±0.3 rad, and yaw
    (±0.6 rad) and pitch (±0.35 rad), which slide the eyes, nose and mouth across the face
    and squash their spacing;
  - **light**: gain ×e^[-0.45, 0.25], a gradient across the image in any direction, a
    colour cast;
  - **expression**: mouth opening, eye closing, smile, brow raise;
  - **occlusion**: half the images carry sunglasses, a hand, a hat or a scarf of a random
    colour, placed in face coordinates;
  - **age**: a per-image age that greys the hair, darkens and widens the face, recedes the
    hairline and lines the forehead.

  ``variation`` 0 is the easy world of aligned studio portraits (the renderer before
  ``variation`` existed, pixel for pixel: the hard draws come from a stream of their own).
  At 1 (the default), nearest-centroid on raw 16×16 pixels of the devices' images scores
  0.23–0.27 on 16 identities (1.0 at 0), while a pretrained face backbone still tells the
  identities apart (tests/unit/device_sim/test_separability.py). Each image depends on its
  key alone, never on what else is in the batch.
- the camera pipelines that distort them per vendor live in :mod:`device_sim.cameras`
  (:class:`~device_sim.cameras.CameraProfile`, :func:`~device_sim.cameras.apply_camera`).

What this is not: these are cartoons, not photographs. Identity lives in a handful of
shape and colour parameters, so a strong enough learner on enough images separates
identities perfectly; there is no identity-correlated nuisance (every identity draws from
the same pose, light and occluder distributions), no skin-tone-dependent camera response
and no face detector error beyond the pose jitter.

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


def stable_key(text: str) -> int:
    """A 64-bit integer for a name, the same in every process (``hash()`` is salted)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def rng_for(*key: int) -> np.random.Generator:
    """A numpy generator seeded by a tuple of non-negative integers."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


# --------------------------------------------------------------------------- faces

#: Probability of an occluder (glasses bar, hand, hat, scarf) at ``variation`` 1.
OCCLUSION_RATE = 0.5
#: Occluder kinds, in the order of the ``kind`` draw.
OCCLUDERS = ("sunglasses", "hand", "hat", "scarf")


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
    """The easy world's per-image jitter (``variation`` 0): aligned crops, mild light."""
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


def _variation_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The hard world's per-image draws, unit-sized; :func:`render_faces` scales each by
    ``variation``. A stream of their own, so ``variation`` 0 renders the easy world."""
    u = rng.uniform
    return {
        # x, y shift; log scale; roll; yaw; pitch (each in [-1, 1]).
        "pose": u(-1.0, 1.0, size=6),
        # A scene of the image's own: background field, clothing, two clutter blobs
        # (centre x, y, radii x, y, rgb).
        "bg": u(0.05, 0.95, size=(3, 3, 3)),
        "cloth_rgb": u(0.0, 1.0, size=3),
        "clutter": np.concatenate(
            [u(-1.0, 1.0, size=(2, 2)), u(0.15, 0.45, size=(2, 2)), u(0.0, 1.0, size=(2, 3))],
            axis=1,
        ),
        # Log gain in [-1, 1], extra slope in [0, 1], direction; light colour (unit normal).
        "light": np.array([u(-1.0, 1.0), u(0.0, 1.0), u(0.0, 2 * math.pi)]),
        "light_rgb": rng.normal(0.0, 1.0, size=3),
        # Eye closing in [0, 1], smile and brow raise in [-1, 1].
        "expr": np.array([u(0.0, 1.0), u(-1.0, 1.0), u(-1.0, 1.0)]),
        "age": u(0.0, 1.0, size=1),
        # Occluder: presence draw, kind, position jitter x / y, size jitter; its colour.
        "occluder": np.array([u(), rng.integers(0, len(OCCLUDERS)), u(-1, 1), u(-1, 1), u()]),
        "occluder_rgb": u(0.0, 1.0, size=3),
    }


def _stack(params: Sequence[dict[str, np.ndarray]], name: str) -> Tensor:
    return torch.from_numpy(np.stack([p[name] for p in params]).astype(np.float32))


def pixel_grid(size: int) -> tuple[Tensor, Tensor]:
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return x, y


def _step(t: Tensor, soft: float) -> Tensor:
    """Soft step 0 → 1 at ``t`` = 0. Clamped so no mask value (or product of a few) is a
    subnormal float: arithmetic on those is ~100x slower on x86 and made rendering crawl."""
    return torch.sigmoid((t / soft).clamp(-16.0, 16.0))


def _ellipse(
    x: Tensor, y: Tensor, cx: Tensor, cy: Tensor, rx: Tensor, ry: Tensor, soft: float = 0.06
) -> Tensor:
    """Soft mask [B, H, W] of ellipses with per-sample centre and radii ([B] each)."""
    d = ((x - _px(cx)) / _px(rx)) ** 2 + ((y - _px(cy)) / _px(ry)) ** 2
    return _step(1.0 - d, soft)


def _box(
    x: Tensor, y: Tensor, cx: Tensor, cy: Tensor, hw: Tensor, hh: Tensor, soft: float = 0.03
) -> Tensor:
    """Soft mask [B, H, W] of axis-aligned boxes (centre, half width and height, [B] each)."""
    return _step(_px(hw) - (x - _px(cx)).abs(), soft) * _step(_px(hh) - (y - _px(cy)).abs(), soft)


def _field(coarse: Tensor, size: int) -> Tensor:
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def _px(t: Tensor) -> Tensor:
    """[B] → [B, 1, 1]: a per-image scalar against [B, H, W] pixel grids."""
    return t[:, None, None]


def pixel_noise(seeds: Sequence[int], size: int) -> Tensor:
    """Unit Gaussian noise [n, 3, size, size], image k's from ``seeds[k]`` alone."""
    if not seeds:
        return torch.zeros(0, 3, size, size)
    return torch.stack(
        [torch.randn(3, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def _paint(image: Tensor, mask: Tensor, rgb: Tensor) -> Tensor:
    m = mask[:, None]
    return image * (1 - m) + rgb[:, :, None, None] * m


def _lerp(a: Tensor, b: Tensor, w: float | Tensor) -> Tensor:
    return a + (b - a) * w


@dataclass(frozen=True, slots=True)
class _Pose:
    """Where an image's face is: canonical face coordinates of every pixel ([n, H, W]) and
    the shift of the inner features (eyes, nose, mouth) that yaw and pitch cause ([n])."""

    x: Tensor
    y: Tensor
    yaw: Tensor
    pitch: Tensor


def _pose(easy: Tensor, hard: Tensor, variation: float, size: int) -> _Pose:
    """Easy jitter ``easy`` [n, 4] (tx, ty, scale, roll) plus ``variation`` × the hard
    draws ``hard`` [n, 6]: shifts up to ±0.15 (of the half-width), scale ×e^±0.15, roll
    ±0.3 rad, yaw ±0.6 and pitch ±0.35 (their sines move the inner features)."""
    v = variation
    tx = _px(easy[:, 0] + 0.15 * v * hard[:, 0])
    ty = _px(easy[:, 1] + 0.12 * v * hard[:, 1])
    scale = _px(easy[:, 2] * torch.exp(0.15 * v * hard[:, 2]))
    rot = _px(easy[:, 3] + 0.3 * v * hard[:, 3])
    u, w = pixel_grid(size)
    x = (torch.cos(rot) * (u - tx) + torch.sin(rot) * (w - ty)) / scale
    y = (-torch.sin(rot) * (u - tx) + torch.cos(rot) * (w - ty)) / scale
    return _Pose(x, y, torch.sin(0.6 * v * hard[:, 4]), torch.sin(0.35 * v * hard[:, 5]))


def render_faces(
    seed: int,
    model_key: int,
    identity: int,
    indices: Sequence[int],
    *,
    variation: float = 1.0,
) -> Tensor:
    """Images ``indices`` of ``identity``: float32 [n, 3, 160, 160] in [0, 1].

    Image ``i`` is a function of ``(seed, model_key, identity, i, variation)`` only.
    ``variation`` scales every within-class change (see the module docstring); 0 renders
    the easy world of aligned studio portraits.
    """
    n = len(indices)
    size = IMAGE_SIZE
    if n == 0:
        return torch.zeros(0, 3, size, size)
    if variation < 0:
        raise ValueError(f"variation must be ≥ 0, got {variation}")
    ident = _identity_params(rng_for(seed, model_key, identity, 0))
    easy = [_image_params(rng_for(seed, model_key, identity, 1, int(i))) for i in indices]
    hard = [_variation_params(rng_for(seed, model_key, identity, 2, int(i))) for i in indices]
    idp = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in ident.items()}
    v, mix = float(variation), min(float(variation), 1.0)
    pose = _pose(_stack(easy, "pose"), _stack(hard, "pose"), v, size)
    age = _stack(hard, "age")[:, 0] * v
    draws = _Draws(idp, easy, hard, pose, age)
    image = _scene(draws, mix, size)
    image = _paint_face(image, draws, v)
    image = _occlude(image, hard, pose, mix)
    image = _light(image, easy, hard, v, size)
    noise = pixel_noise([int(p["noise_seed"][0]) for p in easy], size)
    return (image + 0.015 * noise).clamp(0, 1)


@dataclass(frozen=True, slots=True)
class _Draws:
    """What one batch's painting steps read: the identity's prototype ``idp`` (tensors),
    each image's easy and hard draws, its pose and its age (already scaled by
    ``variation``)."""

    idp: dict[str, Tensor]
    easy: Sequence[dict[str, np.ndarray]]
    hard: Sequence[dict[str, np.ndarray]]
    pose: _Pose
    age: Tensor


def _scene(draws: _Draws, mix: float, size: int) -> Tensor:
    """Background (the identity's, blended towards the image's own by ``mix``), clutter,
    back hair, shoulders and the identity's texture gratings."""
    idp, easy, hard, pose, age = draws.idp, draws.easy, draws.hard, draws.pose, draws.age
    n = len(easy)
    x, y = pose.x, pose.y
    coarse = (idp["bg"].expand(n, 3, 3, 3) + _stack(easy, "bg")).clamp(0, 1)
    image = _field(_lerp(coarse, _stack(hard, "bg"), mix), size)
    if mix > 0:
        u, w = pixel_grid(size)
        for blob in _stack(hard, "clutter").unbind(1):
            cx, cy, rx, ry = blob[:, :4].unbind(1)
            image = _paint(image, mix * _ellipse(u, w, cx, cy, rx, ry, soft=0.1), blob[:, 4:])
    fcx, fcy, frx, fry = (t.expand(n) for t in idp["face"].unbind(0))
    _, volume, long = idp["hair"].unbind(0)
    hair_rgb = _hair_colour(idp, age)
    # Back hair: a larger ellipse behind the face, longer for long-haired identities; it
    # slides against the face as the head turns.
    back = _ellipse(
        x,
        y,
        fcx - 0.1 * pose.yaw,
        fcy - 0.05 + 0.1 * long,
        frx * volume,
        fry * (volume + 0.15 * long),
    )
    image = _paint(image, back, hair_rgb)
    shoulders = _ellipse(
        x, y, fcx, torch.full_like(fcx, 1.25), frx * 1.9, torch.full_like(fcx, 0.55)
    )
    cloth = _lerp(idp["cloth_rgb"].expand(n, 3), _stack(hard, "cloth_rgb"), mix)
    image = _paint(image, shoulders, cloth)
    # The identity's textures: two gratings (a fixed orientation and frequency per
    # identity, a random phase per image), what pooled features pick up best.
    theta, cycles, amp = idp["pattern"]
    phase = _stack(easy, "phase")
    pattern = torch.zeros_like(x)
    for j in range(2):
        along = torch.cos(theta[j]) * x + torch.sin(theta[j]) * y
        pattern += amp[j] * torch.sin(math.pi * cycles[j] * along + _px(phase[:, j]))
    tint = torch.tensor([1.0, 0.8, 0.6])[None, :, None, None]
    return (image + pattern[:, None] * tint).clamp(0, 1)


def _hair_colour(idp: dict[str, Tensor], age: Tensor) -> Tensor:
    """The identity's hair, greying with ``age`` ([n], 0 young): [n, 3]."""
    grey = torch.tensor([0.62, 0.6, 0.58])
    return _lerp(idp["hair_rgb"], grey, 0.6 * age.clamp(0, 1)[:, None])


def _paint_face(image: Tensor, draws: _Draws, variation: float) -> Tensor:
    """Skin, fringe, beard, eyes, mouth and nose; expression and age from the draws, the
    inner features moved by yaw and pitch."""
    idp, easy, hard, pose, age = draws.idp, draws.easy, draws.hard, draws.pose, draws.age
    n = image.shape[0]
    x, y, v = pose.x, pose.y, variation
    fcx, fcy, frx, fry = (t.expand(n) for t in idp["face"].unbind(0))
    # Age: a wider, darker face, a receding hairline, forehead lines.
    frx = frx * (1 + 0.1 * age) * (1 - 0.12 * pose.yaw.abs())
    line, _, _ = idp["hair"].unbind(0)
    hair_rgb = _hair_colour(idp, age)
    texture = _field(idp["texture"].expand(n, 3, 5, 5), image.shape[-1])
    face = _ellipse(x, y, fcx, fcy, frx, fry)
    dy = y - _px(fcy)  # below the face's centre
    skin = idp["skin"] * (1 - 0.12 * age[:, None])
    wrinkles = 0.06 * _px(age) * torch.sin(60.0 * dy) * _step(-0.1 - dy, 0.05)
    skin_img = (skin[:, :, None, None] + texture + wrinkles[:, None]).clamp(0, 1)
    image = image * (1 - face[:, None]) + skin_img * face[:, None]
    fringe = face * _step(_px(line + 0.15 * age) - dy, 0.04)
    image = _paint(image, fringe, hair_rgb)
    beard, glasses = idp["extras"][1], idp["extras"][0]
    if beard > 0:
        chin = face * _step(dy - 0.3, 0.05)
        image = _paint(image, chin * 0.85, hair_rgb)

    # Yaw and pitch move the inner features across the face (and squash their spacing).
    cx = fcx + 0.35 * frx * pose.yaw
    cy = fcy + 0.25 * fry * pose.pitch
    mouth_open, eye_open = _stack(easy, "expr").unbind(1)
    closing, smile, brow_raise = _stack(hard, "expr").unbind(1)
    eye_open = eye_open * (1 - 0.6 * min(v, 1.0) * closing)
    image = _paint_eyes(
        image, pose, cx, cy, idp, eye_open, 0.05 * v * brow_raise, hair_rgb, bool(glasses > 0)
    )
    my, mw, mh = (t.expand(n) for t in idp["mouth"].unbind(0))
    mouth = _ellipse(
        x,
        y,
        cx,
        cy + my * (1 - 0.3 * pose.pitch.abs()),
        mw * (1 + 0.3 * v * smile) * (1 - 0.3 * pose.yaw.abs()),
        mh * (1 + 1.5 * mouth_open),
        soft=0.1,
    )
    image = _paint(image, mouth, idp["lip_rgb"].expand(n, 3))
    nose = _ellipse(x, y, cx + 0.1 * pose.yaw, cy + 0.12, frx * 0.09, fry * 0.16, soft=0.3)
    return image * (1 - 0.18 * nose[:, None])


def _paint_eyes(
    image: Tensor,
    pose: _Pose,
    fcx: Tensor,
    fcy: Tensor,
    idp: dict[str, Tensor],
    eye_open: Tensor,
    brow_raise: Tensor,
    hair_rgb: Tensor,
    glasses: bool,
) -> Tensor:
    """Eyes (white, iris, open per image), brows and the identity's glasses if any; the
    eyes' spacing shrinks with yaw, the far eye more."""
    n = image.shape[0]
    x, y = pose.x, pose.y

    def rep(t: Tensor) -> Tensor:
        return t.expand(n, *t.shape)

    ey, edx, er, ew = (rep(t) for t in idp["eyes"].unbind(0))
    white = torch.tensor([0.92, 0.92, 0.9]).expand(n, 3)
    iris = rep(idp["iris_rgb"])
    brow_thick, brow_tilt = idp["brow"].unbind(0)
    for side in (-1.0, 1.0):
        near = 1 - 0.3 * side * pose.yaw  # the eye the head turns from looks smaller
        ecx = fcx + side * edx * torch.sqrt(1 - pose.yaw**2)
        ecy = fcy + ey * (1 - 0.3 * pose.pitch.abs())
        r = er * near
        eye = _ellipse(x, y, ecx, ecy, r * 1.5 * ew, r * eye_open, soft=0.08)
        image = _paint(image, eye, white)
        image = _paint(image, eye * _ellipse(x, y, ecx, ecy, r * 0.7, r * 0.7), iris)
        bcy = ecy - r * 2.2 + side * brow_tilt * 0.1 - brow_raise
        brow = _ellipse(x, y, ecx, bcy, r * 1.9, brow_thick.expand(n), soft=0.1)
        image = _paint(image, brow, hair_rgb * 0.8)
        if glasses:
            ring = _ellipse(x, y, ecx, ecy, r * 2.3, r * 1.9, soft=0.05)
            inner = _ellipse(x, y, ecx, ecy, r * 2.0, r * 1.6, soft=0.05)
            image = _paint(image, (ring - inner).clamp(0, 1), rep(idp["glasses_rgb"]))
    return image


def _occlude(
    image: Tensor, hard: Sequence[dict[str, np.ndarray]], pose: _Pose, mix: float
) -> Tensor:
    """One occluder on a fraction ``OCCLUSION_RATE × mix`` of the images, in face
    coordinates (it moves with the head): sunglasses, a hand, a hat or a scarf."""
    if mix <= 0:
        return image
    draw, kind, jx, jy, size = _stack(hard, "occluder").unbind(1)
    present = (draw < OCCLUSION_RATE * mix).float()
    x, y, s = pose.x, pose.y, 1 + 0.4 * size
    masks = (
        _box(x, y, 0.0 + 0.05 * jx, -0.12 + 0.05 * jy, 0.55 * s, 0.1 * s),
        _ellipse(x, y, 0.35 * jx, 0.35 + 0.15 * jy, 0.3 * s, 0.38 * s, soft=0.1),
        _box(x, y, 0.05 * jx, -0.8 + 0.1 * jy, 0.85 * s, 0.28 * s),
        _box(x, y, 0.05 * jx, 0.55 + 0.05 * jy, 0.7 * s, 0.25 * s),
    )
    mask = sum(
        (m * _px((kind == k).float() * present) for k, m in enumerate(masks)),
        torch.zeros_like(x),
    )
    return _paint(image, mask, _stack(hard, "occluder_rgb"))


def _light(
    image: Tensor,
    easy: Sequence[dict[str, np.ndarray]],
    hard: Sequence[dict[str, np.ndarray]],
    variation: float,
    size: int,
) -> Tensor:
    """Directional light: gain (×e^[-0.45, 0.25] at ``variation`` 1), a gradient across
    the image up to 0.2 + 0.5 × variation, and a colour cast of the light."""
    v = variation
    gain, slope, angle = _stack(easy, "light").unbind(1)
    log_gain, extra, hard_angle = _stack(hard, "light").unbind(1)
    gain = gain * torch.exp(v * torch.where(log_gain < 0, 0.45, 0.25) * log_gain)
    # The extra gradient has its own direction, so the two add up to any direction.
    u, w = pixel_grid(size)
    light = _px(gain) * (
        1
        + _px(slope) * (_px(torch.cos(angle)) * u + _px(torch.sin(angle)) * w)
        + 0.5 * v * _px(extra) * (_px(torch.cos(hard_angle)) * u + _px(torch.sin(hard_angle)) * w)
    )
    cast = torch.exp(0.08 * v * _stack(hard, "light_rgb"))
    return image * light[:, None] * cast[:, :, None, None]


def to_backbone_input(images: Tensor) -> Tensor:
    """[0, 1] images → the [-1, 1] range the backbones are fed."""
    return images * 2.0 - 1.0
