"""FedAvg baseline, pure parts: device selection, sample-weighted averaging, the server step,
round bookkeeping (quorum, late / duplicate / foreign updates), and the device's local
update (delta after E epochs, or the gradient). No broker."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from lab.fedavg_devices import load_global, local_update
from lab.fedavg_server import (
    FedAvgConfig,
    Outcome,
    Round,
    WeightedMean,
    apply_step,
    floating_state,
    quorum_size,
    select_devices,
)
from pipeline.errors import ConfigError
from pipeline.records import Backbone, Cut, FeatureDType, RoundUpdate, UpdateKind
from pipeline.zoo import build_backbone, head_state_dict, split

DEVICES = tuple(f"dev-{i:03d}" for i in range(50))


def update(device: str, value: float, n: int = 10, round_no: int = 2, **kw: object) -> RoundUpdate:
    fields: dict[str, object] = {
        "model_id": "m",
        "run_id": "run",
        "round": round_no,
        "device_id": device,
        "sample_count": n,
        "kind": UpdateKind.DELTA,
        "dtype": FeatureDType.FLOAT32,
        "tensors": {
            "w": np.full((2, 3), value, dtype=np.float32),
            "b": np.full(2, value, dtype=np.float32),
        },
    }
    fields.update(kw)
    return RoundUpdate(**fields)  # type: ignore[arg-type]


def open_round(selected: tuple[str, ...] = ("a", "b", "c"), quorum: int = 2) -> Round:
    return Round(
        model_id="m",
        run_id="run",
        number=2,
        selected=frozenset(selected),
        quorum=quorum,
        shapes={"w": (2, 3), "b": (2,)},
        kind=UpdateKind.DELTA,
    )


# --------------------------------------------------------------------------- selection


def test_selection_is_a_deterministic_fraction_that_varies_by_round() -> None:
    first = select_devices(DEVICES, 0.1, 0, seed=7)
    assert len(first) == 5 and len(set(first)) == 5 and list(first) == sorted(first)
    assert set(first) <= set(DEVICES)
    assert select_devices(DEVICES, 0.1, 0, seed=7) == first
    rounds = {select_devices(DEVICES, 0.1, r, seed=7) for r in range(10)}
    assert len(rounds) > 5
    assert len(select_devices(DEVICES, 0.001, 0, seed=7, minimum=3)) == 3
    assert select_devices(DEVICES, 1.0, 4, seed=7) == DEVICES
    with pytest.raises(ConfigError):
        select_devices((), 0.5, 0, seed=0)


def test_quorum_size_and_config_validation() -> None:
    assert quorum_size(10, 1.0) == 10
    assert quorum_size(10, 0.8) == 8
    assert quorum_size(3, 0.5) == 2
    assert quorum_size(5, 0.01) == 1
    assert FedAvgConfig(local_epochs=0).kind is UpdateKind.GRADIENT
    assert FedAvgConfig().kind is UpdateKind.DELTA
    for bad in ({"fraction": 0.0}, {"quorum": 1.5}, {"lr": 0.0}, {"local_epochs": -1}):
        with pytest.raises(ConfigError):
            FedAvgConfig(**bad)


# --------------------------------------------------------------------------- averaging


def test_weighted_mean_weights_by_sample_count() -> None:
    mean = WeightedMean()
    assert mean.result() == {}
    mean.add(10, {"w": np.full(3, 1.0, dtype=np.float32)})
    mean.add(30, {"w": np.full(3, 5.0, dtype=np.float32)})
    result = mean.result()
    np.testing.assert_allclose(result["w"], np.full(3, 4.0))  # (10·1 + 30·5) / 40
    assert result["w"].dtype == np.float32
    assert mean.weight == 40 and mean.count == 2
    with pytest.raises(ValueError):
        mean.add(0, {"w": np.zeros(3)})
    mean.initialize()
    assert mean.result() == {} and mean.weight == 0


def test_weighted_mean_does_not_depend_on_arrival_order() -> None:
    rng = np.random.default_rng(0)
    parts = [(int(rng.integers(1, 50)), {"w": rng.standard_normal(100).astype(np.float32)})]
    parts += [(int(rng.integers(1, 50)), {"w": rng.standard_normal(100).astype(np.float32)})]
    parts += [(int(rng.integers(1, 50)), {"w": rng.standard_normal(100).astype(np.float32)})]
    forward, backward = WeightedMean(), WeightedMean()
    for weight, tensors in parts:
        forward.add(weight, tensors)
    for weight, tensors in reversed(parts):
        backward.add(weight, tensors)
    assert np.array_equal(forward.result()["w"], backward.result()["w"])
    expected = sum(w * t["w"].astype(np.float64) for w, t in parts) / sum(w for w, _ in parts)
    np.testing.assert_allclose(forward.result()["w"], expected, rtol=1e-6)


def test_apply_step_adds_deltas_and_subtracts_gradients() -> None:
    state = {"w": np.ones(2, dtype=np.float32), "frozen": np.zeros(1, dtype=np.float32)}
    mean = {"w": np.array([0.5, -1.0], dtype=np.float32)}
    stepped = apply_step(state, mean, UpdateKind.DELTA, 1.0)
    np.testing.assert_allclose(stepped["w"], [1.5, 0.0])
    assert stepped["frozen"] is state["frozen"]
    np.testing.assert_allclose(apply_step(state, mean, UpdateKind.GRADIENT, 0.1)["w"], [0.95, 1.1])
    np.testing.assert_allclose(state["w"], [1.0, 1.0])  # not in place


def test_floating_state_keeps_float_entries_as_float32() -> None:
    state = {
        "w": torch.ones(2, dtype=torch.float16),
        "num_batches_tracked": torch.tensor(3),
        "b": np.zeros(2, dtype=np.float64),
    }
    out = floating_state(state)
    assert set(out) == {"w", "b"}
    assert all(v.dtype == np.float32 for v in out.values())


# --------------------------------------------------------------------------- rounds


def test_round_closes_at_quorum_with_the_weighted_mean() -> None:
    current = open_round(quorum=2)
    assert current.offer(update("a", 1.0, n=10)) is Outcome.ACCEPTED
    assert not current.complete
    assert current.offer(update("b", 4.0, n=20)) is Outcome.ACCEPTED
    assert current.complete
    np.testing.assert_allclose(current.mean.result()["w"], np.full((2, 3), 3.0))
    assert current.mean.weight == 30 and current.reported == {"a", "b"}


def test_round_ignores_and_counts_what_does_not_belong() -> None:
    current = open_round()
    assert current.offer(update("a", 1.0)) is Outcome.ACCEPTED
    cases = [
        (update("a", 9.0), Outcome.DUPLICATE),
        (update("z", 9.0), Outcome.NOT_SELECTED),
        (update("b", 9.0, round_no=1), Outcome.LATE),
        (update("b", 9.0, round_no=3), Outcome.OTHER_ROUND),
        (update("b", 9.0, run_id="old-run"), Outcome.OTHER_RUN),
        (update("b", 9.0, model_id="other"), Outcome.OTHER_MODEL),
        (update("b", 9.0, kind=UpdateKind.GRADIENT), Outcome.MISMATCH),
        (update("b", 9.0, tensors={"w": np.zeros((3, 2), dtype=np.float32)}), Outcome.MISMATCH),
    ]
    for record, expected in cases:
        assert current.offer(record) is expected, expected
    current.reject(Outcome.INVALID)
    # none of them touched the mean or the quorum
    np.testing.assert_allclose(current.mean.result()["w"], np.full((2, 3), 1.0))
    assert current.reported == {"a"} and not current.complete
    assert current.outcomes[Outcome.ACCEPTED] == 1
    assert sum(current.outcomes.values()) == len(cases) + 2
    assert current.outcomes[Outcome.INVALID] == 1


def test_a_selected_device_that_reports_later_still_completes_the_round() -> None:
    current = open_round(selected=("a", "b"), quorum=2)
    current.offer(update("a", 1.0))
    current.offer(update("a", 1.0))  # duplicate, not a second vote
    assert not current.complete
    current.offer(replace(update("b", 2.0), loss=0.5))
    assert current.complete and current.losses == [0.5]


# --------------------------------------------------------------------------- devices


def tiny_head() -> torch.nn.Module:
    model = build_backbone(Backbone.MOBILENET_V2, num_classes=4, seed=0)
    return split(model, Backbone.MOBILENET_V2, Cut.FREEZE6).head


def separable(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prototypes = 3.0 * np.random.default_rng(99).standard_normal((4, 512))
    labels = rng.integers(0, 4, n).astype(np.int32)
    features = prototypes[labels] + rng.standard_normal((n, 512))
    return features.astype(np.float16), labels


def test_local_update_returns_the_delta_and_the_delta_lowers_the_loss() -> None:
    head = tiny_head()
    template = head_state_dict(head)
    global_state = floating_state(template)
    features, labels = separable(40)
    x, y = torch.as_tensor(features.astype(np.float32)), torch.as_tensor(labels).long()
    with torch.no_grad():
        before = float(torch.nn.functional.cross_entropy(head(x), y))

    result = local_update(head, features, labels, epochs=3, batch_size=10, lr=0.1, seed=1)

    assert result.kind is UpdateKind.DELTA and result.seconds > 0
    assert set(result.tensors) == set(global_state) == {"logits.weight", "logits.bias"}
    stepped = apply_step(global_state, result.tensors, UpdateKind.DELTA, 1.0)
    # the delta is exactly what local training moved
    for name, value in head.state_dict().items():
        np.testing.assert_allclose(stepped[name], value.numpy(), atol=1e-6)
    load_global(head, template, stepped)
    with torch.no_grad():
        after = float(torch.nn.functional.cross_entropy(head(x), y))
    assert after < before * 0.5, (before, after)
    # same seed, same global weights: the same delta
    load_global(head, template, global_state)
    again = local_update(head, features, labels, epochs=3, batch_size=10, lr=0.1, seed=1)
    for name in result.tensors:
        np.testing.assert_array_equal(again.tensors[name], result.tensors[name])


def test_local_update_with_zero_epochs_is_the_full_batch_gradient() -> None:
    head = tiny_head()
    features, labels = separable(16, seed=3)
    result = local_update(head, features, labels, epochs=0, batch_size=4, lr=0.1, seed=0)
    assert result.kind is UpdateKind.GRADIENT
    weight = head.state_dict()["logits.weight"].clone().requires_grad_(True)
    bias = head.state_dict()["logits.bias"].clone().requires_grad_(True)
    x = torch.as_tensor(features.astype(np.float32))
    loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, torch.as_tensor(labels).long())
    loss.backward()
    assert weight.grad is not None
    np.testing.assert_allclose(result.tensors["logits.weight"], weight.grad.numpy(), atol=1e-6)
    assert result.loss == pytest.approx(float(loss.detach()))


# --------------------------------------------------------------------------- the report


def test_cost_to_reach_takes_the_first_round_within_each_tolerance() -> None:
    from lab.fedavg_report import TOLERANCES, cost_to_reach

    curve = [
        {"round": r, "accuracy": a, "wall_seconds": r / 10, "bytes_per_device": 1000.0 * r}
        for r, a in enumerate([0.5, 0.97, 0.985, 0.992, 0.99, 0.996])
    ]
    costs = cost_to_reach(curve, target=1.0, final_download=500, fedex_bytes=250.0)
    assert [c["tolerance"] for c in costs] == list(TOLERANCES) == [0.0, 0.005, 0.01, 0.02]
    assert costs[0] == {"tolerance": 0.0, "accuracy_needed": 1.0, "reached": False}
    assert costs[1]["round"] == 5 and costs[1]["bytes_per_device"] == 5500.0
    assert costs[1]["ratio"] == 22.0
    assert costs[2]["round"] == 3  # 0.992 ≥ 0.99, before the dip to exactly 0.99
    assert costs[3]["round"] == 2 and costs[3]["wall_seconds"] == 0.2
