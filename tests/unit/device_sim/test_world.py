"""The synthetic world: determinism, the identity split, the variation knob, cameras,
devices, image folders."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from device_sim.cameras import apply_camera, camera_profiles, gaussian_blur, jpeg_like
from device_sim.images import CLEAN_DOMAIN, render_faces
from device_sim.world import GENERATOR_VERSION, World, WorldConfig
from pipeline.errors import ConfigError
from pipeline.records import IMAGE_SIZE

#: The small world the fast unit tests build on (test_bank's too). It is the easy world
#: (``variation`` 0: aligned studio portraits), since a random-weight backbone separates
#: only easy identities; HARD is the same world at the default variation.
SMALL = WorldConfig(
    seed=7,
    models=("faces-a", "faces-b"),
    identities=8,
    pretrain_images=3,
    device_images=2,
    vendors=3,
    variation=0.0,
)
HARD = replace(SMALL, variation=WorldConfig().variation)


def _thumbs(images: torch.Tensor) -> np.ndarray:
    """8×8 colour thumbnails, flattened: a cheap, shift-tolerant image descriptor."""
    return F.adaptive_avg_pool2d(images, 8).reshape(len(images), -1).numpy()


def _nearest_centroid_accuracy(
    train: np.ndarray, train_y: np.ndarray, test: np.ndarray, test_y: np.ndarray
) -> float:
    classes = np.unique(train_y)
    centroids = np.stack([train[train_y == c].mean(0) for c in classes])
    distances = ((test[:, None, :] - centroids[None]) ** 2).sum(-1)
    return float((classes[distances.argmin(1)] == test_y).mean())


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "change",
    [
        {"models": ()},
        {"models": ("a", "a")},
        {"identities": 1},
        {"pretrain_fraction": 0.0},
        {"device_fraction": 1.5},
        {"pretrain_fraction": 0.4, "device_fraction": 0.5},
        {"vendors": 0},
        {"holdout_fraction": 1.0},
        {"identities_per_device": (3, 2)},
        {"variation": -0.1},
        {"variation": 2.5},
    ],
)
def test_invalid_configs_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        replace(SMALL, **change)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- identities


def test_identity_split_is_as_documented() -> None:
    world = World(replace(SMALL, identities=20))
    for model_id in world.model_ids:
        pretrain = world.pretrain_identities(model_id)
        device = world.device_identities(model_id)
        novel = world.novel_identities(model_id)
        assert len(pretrain) == 15  # round(20 · 0.75)
        assert len(device) == 20  # device_fraction 1.0: devices see everyone
        assert np.array_equal(pretrain, np.sort(pretrain))
        assert set(novel.tolist()) == set(range(20)) - set(pretrain.tolist())
        assert len(novel) == 5
        assert world.num_classes(model_id) == 20
    # Each model draws its own split; the seed changes it.
    assert not np.array_equal(
        world.pretrain_identities("faces-a"), world.pretrain_identities("faces-b")
    )
    other = World(replace(SMALL, identities=20, seed=8))
    assert not np.array_equal(
        world.pretrain_identities("faces-a"), other.pretrain_identities("faces-a")
    )


def test_partial_overlap_keeps_pretrain_only_identities_off_devices() -> None:
    world = World(replace(SMALL, identities=20, pretrain_fraction=0.6, device_fraction=0.6))
    pretrain = set(world.pretrain_identities("faces-a").tolist())
    device = set(world.device_identities("faces-a").tolist())
    assert len(pretrain) == len(device) == 12
    assert len(pretrain & device) == 4  # 12 + 12 - 20
    assert pretrain | device == set(range(20))


def test_groups_cover_the_split_with_disjoint_image_indices() -> None:
    world = World(SMALL)
    groups = list(world.groups())
    for m, model_id in enumerate(world.model_ids):
        mine = [g for g in groups if g.model_index == m]
        clean = {g.identity for g in mine if g.domain == CLEAN_DOMAIN}
        assert clean == set(world.pretrain_identities(model_id).tolist())
        for v in world.vendor_domains:
            assert {g.identity for g in mine if g.domain == v} == set(
                world.device_identities(model_id).tolist()
            )
        for identity in range(SMALL.identities):
            seen: set[int] = set()
            for g in (g for g in mine if g.identity == identity):
                expected = (
                    SMALL.pretrain_images if g.domain == CLEAN_DOMAIN else SMALL.device_images
                )
                assert len(g.indices) == expected
                assert not seen & set(g.indices)  # every domain sees other images
                seen |= set(g.indices)


def test_holdout_mask_keeps_at_least_one_training_image() -> None:
    world = World(SMALL)
    group = next(iter(world.groups()))
    assert group.holdout_mask(0.25).tolist() == [False, False, True]
    assert group.holdout_mask(0.99).tolist() == [False, True, True]
    assert group.holdout_mask(0.0).tolist() == [False, False, False]


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("config", [SMALL, HARD], ids=["easy", "hard"])
def test_images_are_deterministic_per_key_and_seeded(config: WorldConfig) -> None:
    world = World(config)
    a = world.images("faces-a", 3, 2, [5, 6, 7])
    assert a.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert torch.equal(a, World(config).images("faces-a", 3, 2, [5, 6, 7]))
    # An image depends on its own key, not on what else is in the batch.
    assert torch.equal(a[1:2], world.images("faces-a", 3, 2, [6]))
    # Seed, model, identity and index each change it.
    assert not torch.equal(a, World(replace(config, seed=8)).images("faces-a", 3, 2, [5, 6, 7]))
    assert not torch.equal(a, world.images("faces-b", 3, 2, [5, 6, 7]))
    assert not torch.equal(a, world.images("faces-a", 4, 2, [5, 6, 7]))
    assert not torch.equal(a[0], a[1])


def test_images_of_an_identity_look_alike_in_the_easy_world() -> None:
    """At ``variation`` 0 the per-image jitter does not drown the identity: nearest-centroid
    on 8×8 thumbnails of the clean images tells identities apart (at the default it must
    not: test_separability)."""
    world = World(SMALL)
    train = torch.cat([world.images("faces-a", i, 0, range(6)) for i in range(8)])
    test = torch.cat([world.images("faces-a", i, 0, range(6, 9)) for i in range(8)])
    train_y, test_y = np.repeat(np.arange(8), 6), np.repeat(np.arange(8), 3)
    assert _nearest_centroid_accuracy(_thumbs(train), train_y, _thumbs(test), test_y) >= 0.9


@pytest.mark.parametrize("config", [SMALL, HARD], ids=["easy", "hard"])
def test_cameras_shift_images_per_vendor_and_keep_identities(config: WorldConfig) -> None:
    world = World(config)
    ids, index = range(8), [4]
    clean = torch.cat([world.images("faces-a", i, CLEAN_DOMAIN, index) for i in ids])
    shifted = {
        v: torch.cat([world.images("faces-a", i, v, index) for i in ids])
        for v in world.vendor_domains
    }
    for v, images in shifted.items():
        # The camera changes every image visibly …
        diff = (images - clean).abs().mean(dim=(1, 2, 3))
        assert float(diff.min()) > 0.02, f"vendor {v} barely changes images"
        # … but keeps what is in it: each shifted image correlates best with its own
        # clean original, not with any other identity's.
        a = clean.reshape(8, -1) - clean.reshape(8, -1).mean(1, keepdim=True)
        b = images.reshape(8, -1) - images.reshape(8, -1).mean(1, keepdim=True)
        corr = (F.normalize(b, dim=1) @ F.normalize(a, dim=1).T).numpy()
        assert (corr.argmax(1) == np.arange(8)).all(), f"vendor {v} scrambles identities"
    # Vendors differ from each other, not only from the clean camera.
    vendors = list(shifted.values())
    for i in range(len(vendors)):
        for j in range(i + 1, len(vendors)):
            assert float((vendors[i] - vendors[j]).abs().mean()) > 0.01


def test_identities_stay_separable_within_a_vendor_in_the_easy_world() -> None:
    world = World(SMALL)
    vendor = world.vendor_domains[-1]  # the harshest camera
    train = torch.cat([world.images("faces-a", i, vendor, range(6)) for i in range(8)])
    test = torch.cat([world.images("faces-a", i, vendor, range(6, 9)) for i in range(8)])
    train_y, test_y = np.repeat(np.arange(8), 6), np.repeat(np.arange(8), 3)
    assert _nearest_centroid_accuracy(_thumbs(train), train_y, _thumbs(test), test_y) >= 0.85


def test_variation_scales_the_within_class_change() -> None:
    """Images of one identity differ more from each other as ``variation`` grows; 0 and 1
    are different worlds (different fingerprints, so banks rebuild)."""

    def spread(variation: float) -> float:
        images = World(replace(SMALL, variation=variation)).images("faces-a", 2, 0, range(12))
        return float((images - images.mean(0, keepdim=True)).pow(2).mean().sqrt())

    easy, half, hard = spread(0.0), spread(0.5), spread(1.0)
    assert easy < half < hard
    assert hard > 2 * easy
    fingerprints = [World(replace(SMALL, variation=v)).fingerprint() for v in (0.0, 0.5, 1.0)]
    assert len({str(f) for f in fingerprints}) == 3
    assert World(SMALL).fingerprint()["generator"] == GENERATOR_VERSION >= 2


def test_variation_zero_renders_the_easy_world_alone() -> None:
    """The hard draws have a stream of their own: at ``variation`` 0 none of them (scene,
    pose, light, expression, occluder, age) reaches the pixels."""
    easy = render_faces(5, 9, 1, [0, 3], variation=0.0)
    assert torch.equal(easy, render_faces(5, 9, 1, [0, 3], variation=0.0))
    assert not torch.equal(easy, render_faces(5, 9, 1, [0, 3], variation=0.01))
    with pytest.raises(ValueError, match="variation"):
        render_faces(5, 9, 1, [0], variation=-1.0)


def test_camera_profiles_rise_in_severity_and_zero_strength_is_clean() -> None:
    profiles = camera_profiles(0, 4)
    assert [p.domain for p in profiles] == [0, 1, 2, 3, 4]
    assert profiles[0].is_clean
    severities = [p.severity for p in profiles[1:]]
    assert severities == sorted(severities) and severities[0] > 0
    assert all(p.is_clean for p in camera_profiles(0, 3, strength=0.0))
    images = render_faces(0, 1, 2, [0, 1])
    assert torch.equal(apply_camera(images, profiles[0], [1, 2]), images)


def test_blur_and_jpeg_are_batch_invariant_and_sane() -> None:
    images = render_faces(0, 1, 2, [0, 1, 2])
    blurred = gaussian_blur(images, 1.5)
    assert torch.allclose(blurred[1:2], gaussian_blur(images[1:2], 1.5))

    # Blur removes high frequencies: neighbouring pixels become closer.
    def roughness(x: torch.Tensor) -> float:
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    assert roughness(blurred) < 0.7 * roughness(images)
    assert torch.allclose(blurred.mean(), images.mean(), atol=0.01)
    quantised = jpeg_like(images, 0.05)
    assert 0.0 < float((quantised - images).abs().mean()) < 0.05
    assert torch.allclose(jpeg_like(images, 0.0), images)


# --------------------------------------------------------------------------- devices


def test_device_profiles_are_deterministic_subsets() -> None:
    world = World(replace(SMALL, identities=20, identities_per_device=(3, 6)))
    device = set(world.device_identities("faces-a").tolist())
    profiles = [world.device_profile("faces-a", f"dev-{k:05d}") for k in range(200)]
    for p in profiles:
        assert 3 <= len(p.identities) <= 6
        assert set(p.identities.tolist()) <= device
        assert len(set(p.identities.tolist())) == len(p.identities)
        assert p.vendor in world.vendor_domains
    again = world.device_profile("faces-a", "dev-00017")
    assert again.vendor == profiles[17].vendor
    assert np.array_equal(again.identities, profiles[17].identities)
    # Vendors and identity sets vary across the fleet.
    assert {p.vendor for p in profiles} == set(world.vendor_domains)
    assert len({tuple(p.identities.tolist()) for p in profiles}) > 150


def test_unknown_model_identity_or_domain_is_a_config_error() -> None:
    world = World(SMALL)
    with pytest.raises(ConfigError, match="unknown model"):
        world.images("nope", 0, 0, [0])
    with pytest.raises(ConfigError, match="identity"):
        world.images("faces-a", 99, 0, [0])
    with pytest.raises(ConfigError, match="domain"):
        world.images("faces-a", 0, 9, [0])


# --------------------------------------------------------------------------- image folders


def write_faces(root: Path, identities: int = 3, per_identity: int = 4) -> Path:
    """A tiny folder of real-looking files: <root>/<name>/<k>.png, odd sizes on purpose."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(identities):
        folder = root / f"person_{i}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, size=3)
        for k in range(per_identity):
            pixels = np.clip(base + rng.normal(0, 20, size=(50 + k, 40, 3)), 0, 255)
            suffix = ".png" if k % 2 == 0 else ".jpg"
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{k}{suffix}")
    (root / "person_0" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    return root


def test_image_folder_world(tmp_path: Path) -> None:
    root = write_faces(tmp_path / "faces")
    world = World.from_image_folder(root, replace(SMALL, pretrain_fraction=0.67))
    assert world.model_ids == ("faces-a",)
    assert world.identity_names("faces-a") == ("person_0", "person_1", "person_2")
    assert world.num_classes("faces-a") == 3
    images = world.images("faces-a", 1, CLEAN_DOMAIN, [0, 3])
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    shifted = world.images("faces-a", 1, 2, [0, 3])
    assert not torch.equal(images, shifted)
    pretrain = set(world.pretrain_identities("faces-a").tolist())
    for g in world.groups():
        both = g.identity in pretrain
        if g.domain == CLEAN_DOMAIN:
            assert g.indices == ((0, 1) if both else (0, 1, 2, 3))
        else:
            assert g.indices == ((2, 3) if both else (0, 1, 2, 3))
    digest = world.fingerprint()["folder"]
    assert World.from_image_folder(root, SMALL).fingerprint()["folder"] == digest
    (root / "person_2" / "0.png").write_bytes((root / "person_1" / "0.png").read_bytes())
    assert World.from_image_folder(root, SMALL).fingerprint()["folder"] != digest


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        World.from_image_folder(tmp_path / "missing")
    (tmp_path / "one" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="need ≥ 2"):
        World.from_image_folder(tmp_path / "one")
