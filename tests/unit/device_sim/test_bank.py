"""The feature bank: build, cache, determinism, image folders, sampling, and the premise
of the product (base head good on pre-training, worse on devices, beaten by a head
fine-tuned on device features)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import device_sim.bank as bank_module
from device_sim.backbone import build_world_backbone, extract_features
from device_sim.bank import BankError, FeatureBank, _rebatch, build_bank
from device_sim.bank_build import run_bank_build
from device_sim.heads import fit_head, head_accuracy, new_head, train_base_head
from device_sim.images import CLEAN_DOMAIN, to_backbone_input
from device_sim.world import World
from pipeline.records import Backbone, Cut
from pipeline.zoo import build_backbone, load_head_state, split
from tests.unit.device_sim.test_world import SMALL, write_faces

#: test_world's small world cut down further: 4 identities, 2 vendors, 2-3 per device.
TINY = replace(
    SMALL,
    seed=3,
    models=("m1", "m2"),
    identities=4,
    device_images=3,
    vendors=2,
    identities_per_device=(2, 3),
)


def build_fast(world: World, out: Path, images_dir: Path | None = None) -> FeatureBank:
    """The cheap bank the tests build: MobileNetV2 at freeze6."""
    return build_bank(
        world,
        backbone=Backbone.MOBILENET_V2,
        cut=Cut.FREEZE6,
        images_dir=images_dir,
        out=out,
        batch_size=16,
    )


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("banks")


@pytest.fixture(scope="module")
def bank(bank_dir: Path) -> FeatureBank:
    return build_fast(World(TINY), bank_dir)


# --------------------------------------------------------------------------- build


def test_bank_holds_every_group_of_the_world(bank: FeatureBank) -> None:
    world = World(TINY)
    groups = list(world.groups())
    assert not bank.from_cache and bank.build_seconds > 0
    assert len(bank) == sum(len(g.indices) for g in groups)
    assert bank.features.dtype == np.float16 and bank.feature_shape == (512,)
    assert bank.labels.dtype == np.int32 and bank.domains.dtype == np.uint8
    assert bank.models.dtype == np.int32 and bank.holdout.dtype == np.bool_
    assert bank.backbone is Backbone.MOBILENET_V2 and bank.cut is Cut.FREEZE6
    assert bank.model_ids == ["m1", "m2"] and bank.num_classes == 4
    assert bank.num_domains == 3 and bank.vendor_domains == (1, 2)
    for model_id in world.model_ids:
        assert np.array_equal(
            bank.pretrain_identities(model_id), world.pretrain_identities(model_id)
        )
        assert np.array_equal(bank.device_identities(model_id), world.device_identities(model_id))
    # Rows follow the world's groups in order, with their true labels.
    start = 0
    for g in groups:
        rows = slice(start, start + len(g.indices))
        assert (bank.labels[rows] == g.identity).all()
        assert (bank.domains[rows] == g.domain).all()
        assert (bank.models[rows] == g.model_index).all()
        assert bank.image_index[rows].tolist() == list(g.indices)
        assert bank.holdout[rows].tolist() == g.holdout_mask(TINY.holdout_fraction).tolist()
        start += len(g.indices)
    # Calibrated random features: finite, unit-ish scale, not collapsed.
    features = bank.features.astype(np.float32)
    assert np.isfinite(features).all()
    assert 0.3 < float(features.std()) < 3.0
    assert float(features.std(axis=0).min()) > 0.01


def test_second_build_is_a_cache_hit(
    bank: FeatureBank, bank_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = bank.path.stat().st_mtime_ns

    def no_compute(*args: object, **kwargs: object) -> None:
        raise AssertionError("the prefix ran again on a cache hit")

    monkeypatch.setattr(bank_module, "_run_prefix", no_compute)
    again = build_fast(World(TINY), bank_dir)
    assert again.from_cache
    assert again.path == bank.path
    assert again.path.stat().st_mtime_ns == before
    assert again.content_sha256 == bank.content_sha256
    assert np.array_equal(again.features, bank.features)


def test_builds_are_byte_identical_and_seeded(bank: FeatureBank, tmp_path: Path) -> None:
    twin = build_fast(World(TINY), tmp_path / "twin")
    assert not twin.from_cache
    assert twin.path.name == bank.path.name
    assert twin.path.read_bytes() == bank.path.read_bytes()

    other = build_fast(World(replace(TINY, seed=4)), tmp_path / "other")
    assert other.path.name != bank.path.name
    assert other.content_sha256 != bank.content_sha256
    assert not np.array_equal(other.features, bank.features)


def test_another_config_builds_beside_the_first(bank: FeatureBank, bank_dir: Path) -> None:
    fewer = build_fast(World(replace(TINY, vendors=1)), bank_dir)
    assert not fewer.from_cache
    assert fewer.path != bank.path and bank.path.is_file()
    assert fewer.num_domains == 2


def test_a_tampered_bank_is_rebuilt(bank: FeatureBank, tmp_path: Path) -> None:
    copy = tmp_path / bank.path.name
    blob = bytearray(bank.path.read_bytes())
    blob[-100] ^= 0xFF  # a feature byte: the content hash no longer matches
    copy.write_bytes(bytes(blob))
    with pytest.raises(BankError, match="content hash"):
        FeatureBank.load(copy)
    rebuilt = build_fast(World(TINY), tmp_path)
    assert not rebuilt.from_cache
    assert rebuilt.path.read_bytes() == bank.path.read_bytes()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(BankError, match="full"):
        build_bank(World(TINY), out=tmp_path, backbone=Backbone.MOBILENET_V2, cut=Cut.FULL)
    with pytest.raises(BankError, match="batch_size"):
        build_bank(World(TINY), out=tmp_path, batch_size=0)
    (tmp_path / "junk.safetensors").write_bytes(b"not a bank")
    with pytest.raises(BankError, match="cannot read"):
        FeatureBank.load(tmp_path / "junk.safetensors")


def test_image_folder_bank(tmp_path: Path) -> None:
    root = write_faces(tmp_path / "faces", identities=3, per_identity=4)
    config = replace(TINY, pretrain_fraction=0.67)
    bank = build_fast(World(config), tmp_path / "banks", images_dir=root)
    world = World.from_image_folder(root, config)
    assert len(bank) == sum(len(g.indices) for g in world.groups())
    assert bank.model_ids == ["m1"] and bank.num_classes == 3
    assert bank.meta["identities"] == {"m1": ["person_0", "person_1", "person_2"]}
    assert set(np.unique(bank.labels).tolist()) == {0, 1, 2}
    assert np.isfinite(bank.features.astype(np.float32)).all()
    again = build_fast(World(config), tmp_path / "banks", images_dir=root)
    assert again.from_cache
    # New image bytes: a new bank.
    (root / "person_2" / "0.png").write_bytes((root / "person_1" / "0.png").read_bytes())
    changed = build_fast(World(config), tmp_path / "banks", images_dir=root)
    assert not changed.from_cache and changed.path != bank.path


def test_rebatch_yields_exact_batches() -> None:
    chunks = [torch.full((n, 1), float(i)) for i, n in enumerate([3, 5, 1, 7])]
    batches = list(_rebatch(iter(chunks), 4))
    assert [b.shape[0] for b in batches] == [4, 4, 4, 4]
    assert torch.equal(torch.cat(batches), torch.cat(chunks))
    assert [b.shape[0] for b in _rebatch(iter(chunks), 5)] == [5, 5, 5, 1]


# --------------------------------------------------------------------------- backbone


def test_calibration_makes_a_random_backbone_usable() -> None:
    world = World(TINY)
    images = world.images("m1", 0, CLEAN_DOMAIN, [0, 1, 2, 3])
    raw = split(build_backbone(Backbone.MOBILENET_V2, num_classes=4), "mobilenet_v2", "freeze6")
    calibrated = build_world_backbone(world, Backbone.MOBILENET_V2, Cut.FREEZE6)
    with torch.inference_mode():
        raw_features = raw.prefix(to_backbone_input(images))
    features = extract_features(calibrated.prefix, images)
    assert float(raw_features.abs().max()) < 1e-3  # default BatchNorm statistics: vanished
    assert 0.3 < float(features.std()) < 3.0
    # Same images, same numbers, whatever the memory layout extract_features uses.
    with torch.inference_mode():
        plain = calibrated.prefix(to_backbone_input(images))
    torch.testing.assert_close(features, plain, rtol=1e-4, atol=1e-4)
    again = build_world_backbone(world, Backbone.MOBILENET_V2, Cut.FREEZE6)
    assert torch.equal(extract_features(again.prefix, images), features)


# --------------------------------------------------------------------------- sampling


def test_draw_serves_a_devices_vendor_and_identities(bank: FeatureBank) -> None:
    rng = np.random.default_rng(0)
    identities = bank.device_identities("m2")[:3]
    rows = bank.draw("m2", 2, identities, 50, rng)
    assert rows.shape == (50,) and rows.dtype == np.int64
    features, labels = bank.take(rows)
    assert features.shape == (50, 512) and features.dtype == np.float16
    assert labels.dtype == np.int32
    assert set(labels.tolist()) == set(identities.tolist())  # 50 draws hit all three
    assert (bank.models[rows] == 1).all() and (bank.domains[rows] == 2).all()
    assert not bank.holdout[rows].any()
    held = bank.draw("m2", 2, identities, 20, rng, holdout=True)
    assert bank.holdout[held].all()
    # Deterministic in the generator.
    assert np.array_equal(
        bank.draw("m1", 1, [0, 1], 10, np.random.default_rng(5)),
        bank.draw("m1", 1, [0, 1], 10, np.random.default_rng(5)),
    )


def test_draw_batch_for_a_thousand_devices(bank: FeatureBank) -> None:
    world = World(TINY)
    profiles = [world.device_profile("m1", f"dev-{k}") for k in range(1000)]
    rows = bank.draw_batch(
        "m1",
        [p.vendor for p in profiles],
        [p.identities for p in profiles],
        8,
        np.random.default_rng(1),
    )
    assert rows.shape == (1000, 8)
    for k in (0, 17, 999):
        p = profiles[k]
        assert set(bank.labels[rows[k]].tolist()) <= set(p.identities.tolist())
        assert (bank.domains[rows[k]] == p.vendor).all()
        assert (bank.models[rows[k]] == 0).all()
    assert bank.draw_batch("m1", [], [], 8, np.random.default_rng(1)).shape == (0, 8)


def test_held_out_is_a_devices_evaluation_set(bank: FeatureBank) -> None:
    identities = bank.device_identities("m1")[:2]
    rows = bank.held_out("m1", 1, identities)
    assert len(rows) == 2 * 1  # ceil(0.25 · 3) of 3 images, per identity
    assert bank.holdout[rows].all() and (bank.domains[rows] == 1).all()
    assert set(bank.labels[rows].tolist()) == set(identities.tolist())


def test_draw_errors_say_what_is_missing(bank: FeatureBank) -> None:
    rng = np.random.default_rng(0)
    novel = np.setdiff1d(bank.device_identities("m1"), bank.pretrain_identities("m1"))
    with pytest.raises(BankError, match="domain 0"):
        bank.draw("m1", CLEAN_DOMAIN, novel[:1], 4, rng)  # never photographed in studio
    with pytest.raises(BankError, match="out of range"):
        bank.draw("m1", 1, [99], 4, rng)
    with pytest.raises(BankError, match="vendor out of range"):
        bank.draw("m1", 7, [0], 4, rng)
    with pytest.raises(BankError, match="not in bank"):
        bank.draw("nope", 1, [0], 4, rng)
    with pytest.raises(BankError, match="at least one identity"):
        bank.draw("m1", 1, [], 4, rng)


# --------------------------------------------------------------------------- the premise


@pytest.fixture(scope="module")
def face_bank(bank_dir: Path) -> FeatureBank:
    """A tiny world through the paper's backbone and cut (its random features separate
    identities well; a random MobileNetV2's do so only weakly)."""
    config = replace(TINY, models=("faces",), identities=8, pretrain_images=6, device_images=6)
    return build_bank(
        World(config),
        backbone=Backbone.INCEPTION_RESNET_V1,
        cut=Cut.FREEZE6,
        out=bank_dir,
        calibration_images=32,
    )


@pytest.mark.slow
def test_base_head_is_good_on_pretraining_and_worse_on_devices(face_bank: FeatureBank) -> None:
    base = train_base_head(face_bank, "faces", seed=0)
    assert base.pretrain_val_accuracy >= 0.9
    assert base.device_accuracy <= base.pretrain_val_accuracy - 0.25
    assert base.seen_device_accuracy <= base.pretrain_val_accuracy - 0.1
    assert base.novel_device_accuracy <= 0.2  # never trained on them
    assert set(base.vendor_accuracy) == {1, 2}
    assert sorted(base.state_dict) == ["logits.bias", "logits.weight"]
    assert base.state_dict["logits.weight"].shape == (8, 512)
    again = train_base_head(face_bank, "faces", seed=0)
    assert all(torch.equal(base.state_dict[k], again.state_dict[k]) for k in base.state_dict)


@pytest.mark.slow
def test_personalising_on_device_features_beats_the_base_head(face_bank: FeatureBank) -> None:
    """The product's premise: a head warm-started from v0 and trained on what devices
    pushed is clearly better on the devices' held-out images."""
    base = train_base_head(face_bank, "faces", seed=0)
    head = new_head(face_bank.backbone, face_bank.cut, face_bank.num_classes)
    load_head_state(head, base.state_dict)
    # Pushes: samples drawn per device, as a fleet would (with repeats), true labels.
    fleet = [(v, face_bank.device_identities("faces")) for v in face_bank.vendor_domains]
    rng = np.random.default_rng(0)
    rows = np.concatenate([face_bank.draw("faces", v, ids, 200, rng) for v, ids in fleet])
    losses = fit_head(head, *face_bank.take(rows), epochs=15, seed=0)
    assert losses[-1] < losses[0]
    held_out = face_bank.select("faces", domains=face_bank.vendor_domains, holdout=True)
    tuned = head_accuracy(head, *face_bank.take(held_out))
    assert tuned >= base.device_accuracy + 0.3
    assert tuned >= 0.85


def test_bank_build_command_prints_a_report(
    bank: FeatureBank, bank_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    found = run_bank_build(
        out=bank_dir,
        backbone=Backbone.MOBILENET_V2,
        cut=Cut.FREEZE6,
        seed=TINY.seed,
        batch_size=16,
        config=TINY,
    )
    assert found.from_cache and found.path == bank.path
    out = capsys.readouterr().out
    assert "found in cache" in out and "m1" in out and "m2" in out


def test_bank_file_is_readable_by_everyone(bank: FeatureBank) -> None:
    assert os.stat(bank.path).st_mode & 0o644 == 0o644
