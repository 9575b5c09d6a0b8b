"""The backbone split: feature shapes, prefix ∘ head = full forward, head state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.records import FEATURE_SHAPES, IMAGE_SIZE, Backbone, Cut
from pipeline.zoo import (
    ZooError,
    build_backbone,
    head_flops_per_sample,
    head_state_dict,
    head_train_flops_per_sample,
    load_head_state,
    load_weights,
    split,
    thawed_parameter_count,
)

NUM_CLASSES = 10


@pytest.fixture(scope="module", params=list(Backbone))
def built(request: pytest.FixtureRequest) -> tuple[Backbone, nn.Module, torch.Tensor, torch.Tensor]:
    backbone = Backbone(request.param)
    model = build_backbone(backbone, num_classes=NUM_CLASSES, seed=1)
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model.eval()(x)
    return backbone, model, x, reference


@pytest.mark.parametrize("cut", list(Cut))
def test_prefix_then_head_is_the_full_forward(
    built: tuple[Backbone, nn.Module, torch.Tensor, torch.Tensor], cut: Cut
) -> None:
    backbone, model, x, reference = built
    parts = split(model, backbone, cut)
    parts.head.eval()
    with torch.no_grad():
        features = parts.prefix(x)
        out = parts.head(features)
    assert tuple(features.shape) == (2, *FEATURE_SHAPES[backbone][cut])
    assert parts.feature_shape == FEATURE_SHAPES[backbone][cut]
    assert out.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_prefix_is_frozen_and_stays_in_eval(
    built: tuple[Backbone, nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    backbone, model, _, _ = built
    parts = split(model, backbone, Cut.FREEZE4)
    parts.prefix.train()
    assert not parts.prefix.training
    assert all(not m.training for m in parts.prefix.modules())
    assert all(not p.requires_grad for p in parts.prefix.parameters())
    assert all(p.requires_grad for p in parts.head.parameters())


def test_head_parameter_counts_shrink_with_the_freeze_level(
    built: tuple[Backbone, nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    backbone, model, _, _ = built
    counts = [thawed_parameter_count(split(model, backbone, cut).head) for cut in Cut]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == sum(p.numel() for p in model.parameters())
    assert counts[-1] == 512 * NUM_CLASSES + NUM_CLASSES  # freeze6: the logits Linear
    if backbone is Backbone.INCEPTION_RESNET_V1:
        # freeze5: last_linear (1792x512, no bias) + last_bn (2x512) + logits
        assert counts[-2] == 1792 * 512 + 2 * 512 + counts[-1]


def test_head_state_keys_are_the_models_keys(
    built: tuple[Backbone, nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    backbone, model, _, _ = built
    full = model.state_dict()
    for cut in Cut:
        state = head_state_dict(split(model, backbone, cut).head)
        assert set(state) <= set(full)
        for key, value in state.items():
            assert value.data_ptr() == full[key].data_ptr()
    assert set(head_state_dict(split(model, backbone, Cut.FREEZE6).head)) == {
        "logits.weight",
        "logits.bias",
    }


def test_load_head_state_round_trips_and_rejects_other_heads() -> None:
    a = build_backbone(Backbone.MOBILENET_V2, num_classes=NUM_CLASSES, seed=1)
    b = build_backbone(Backbone.MOBILENET_V2, num_classes=NUM_CLASSES, seed=2)
    head_a = split(a, Backbone.MOBILENET_V2, Cut.FREEZE5).head
    head_b = split(b, Backbone.MOBILENET_V2, Cut.FREEZE5).head
    load_head_state(head_b, {k: v.half() for k, v in head_state_dict(head_a).items()})
    assert torch.allclose(
        b.state_dict()["logits.weight"], a.state_dict()["logits.weight"], atol=1e-3
    )
    assert b.state_dict()["logits.weight"].dtype == torch.float32
    with pytest.raises(ZooError, match="missing"):
        load_head_state(head_b, head_state_dict(split(a, Backbone.MOBILENET_V2, Cut.FREEZE6).head))
    other = build_backbone(Backbone.MOBILENET_V2, num_classes=NUM_CLASSES + 1)
    with pytest.raises(ZooError, match="shape mismatch"):
        load_head_state(
            head_b, head_state_dict(split(other, Backbone.MOBILENET_V2, Cut.FREEZE5).head)
        )


def test_build_is_deterministic_in_the_seed_and_keeps_the_global_rng() -> None:
    state = torch.random.get_rng_state()
    a = build_backbone(Backbone.MOBILENET_V2, num_classes=3, seed=7)
    b = build_backbone(Backbone.MOBILENET_V2, num_classes=3, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.state_dict()["logits.weight"], b.state_dict()["logits.weight"])
    assert not a.training


def test_load_weights_from_a_local_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = build_backbone(Backbone.MOBILENET_V2, num_classes=5, seed=3)
    pt, st = tmp_path / "w.pt", tmp_path / "w.safetensors"
    torch.save(source.state_dict(), pt)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(st))
    for path in (pt, st):
        target = build_backbone(Backbone.MOBILENET_V2, num_classes=5, seed=4, weights=path)
        assert torch.equal(
            target.state_dict()["last_linear.weight"], source.state_dict()["last_linear.weight"]
        )
    # another number of classes: the pre-training classifier is skipped, the rest loads
    target = build_backbone(Backbone.MOBILENET_V2, num_classes=7)
    assert load_weights(target, pt) == ["logits.bias", "logits.weight"]
    assert torch.equal(
        target.state_dict()["last_bn.running_var"], source.state_dict()["last_bn.running_var"]
    )
    with pytest.raises(ZooError, match="does not exist"):
        load_weights(target, tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ZooError, match="cannot read"):
        load_weights(target, tmp_path / "junk.pt")


def test_flops_per_sample_of_the_linear_heads() -> None:
    n = 8631
    assert head_flops_per_sample(Backbone.INCEPTION_RESNET_V1, Cut.FREEZE6, n) == 3 * 2 * 512 * n
    # no input gradient for the first thawed layer: fwd + weight grad only
    assert (
        head_train_flops_per_sample(Backbone.INCEPTION_RESNET_V1, Cut.FREEZE6, n) == 2 * 2 * 512 * n
    )
    assert head_flops_per_sample(Backbone.INCEPTION_RESNET_V1, Cut.FREEZE5, n) == 3 * 2 * (
        1792 * 512 + 512 * n
    )
    deep = head_flops_per_sample(Backbone.INCEPTION_RESNET_V1, Cut.FREEZE1, n)
    assert deep > 1000 * head_flops_per_sample(Backbone.INCEPTION_RESNET_V1, Cut.FREEZE6, n) / 10
