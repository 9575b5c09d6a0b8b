"""The registry fold: latest, best and history per model, idempotent."""

from __future__ import annotations

from dataclasses import replace

from pipeline.records import Backbone, Cut, ModelUpdate
from pipeline.registry import Registry
from tests import factories


def update(
    version: str, *, best: bool, model_id: str = "faces-1", blob: bytes | None = None
) -> ModelUpdate:
    return factories.update(model_id, version, best=best, num_classes=100, blob=blob)


def test_first_update_defines_the_model_and_is_best() -> None:
    registry = Registry()
    assert registry.apply(update("v0", best=False, blob=b"abc"))
    entry = registry.get("faces-1")
    assert entry is not None
    assert (entry.num_classes, entry.cut, entry.backbone) == (
        100,
        Cut.FREEZE6,
        Backbone.INCEPTION_RESNET_V1,
    )
    assert entry.best is not None and entry.best.version == "v0"
    assert entry.latest is not None and entry.latest.checkpoint is None  # blobs are not kept


def test_latest_follows_every_version_best_only_winners() -> None:
    registry = Registry()
    registry.apply(update("v0", best=True))
    registry.apply(update("v1", best=True))
    registry.apply(update("v2", best=False))
    entry = registry.get("faces-1")
    assert entry is not None and entry.latest is not None and entry.best is not None
    assert entry.latest.version == "v2"
    assert entry.best.version == "v1"
    assert [u.version for u in entry.history] == ["v0", "v1", "v2"]
    assert entry.version("v1") is not None and entry.version("v9") is None


def test_redelivered_update_is_a_no_op() -> None:
    registry = Registry()
    assert registry.apply(update("v0", best=True))
    assert not registry.apply(replace(update("v0", best=True), is_best=False))
    entry = registry.get("faces-1")
    assert entry is not None and len(entry.history) == 1


def test_models_are_listed_in_order() -> None:
    registry = Registry()
    registry.apply(update("v0", best=True, model_id="b"))
    registry.apply(update("v0", best=True, model_id="a"))
    assert [m.model_id for m in registry.models()] == ["a", "b"]
    assert "a" in registry and "c" not in registry and len(registry) == 2
