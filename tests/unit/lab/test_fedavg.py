"""FedAvg baseline, pure parts: device selection, sample-weighted averaging, the server step,
round bookkeeping (quorum, late / duplicate / foreign updates), the device's local update
(delta after E epochs, or the gradient), and the side-by-side bench's analysis: the task's
samples are distinct observations, targets, the cost of reaching them, the summary over
seeds and per vendor. No broker."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from device_sim.bank import FeatureBank
from device_sim.expansion import expand, split_world
from device_sim.feature_model import fit
from device_sim.world import World
from lab.fedavg_bench import with_costs
from lab.fedavg_devices import load_global, local_update
from lab.fedavg_report import (
    FEDEX_TARGET,
    copies,
    cost_at,
    distinct_report,
    headline,
    row_keys,
    stats,
    summarize,
    targets_for,
    vendor_report,
)
from lab.fedavg_server import (
    FedAvgConfig,
    OfferOutcome,
    Round,
    WeightedMean,
    apply_step,
    floating_state,
    quorum_size,
    select_devices,
)
from lab.fedavg_task import distinct_check, make_devices, sample_identities
from pipeline.errors import ConfigError
from pipeline.records import Backbone, Cut, FeatureDType, RoundUpdate, UpdateKind
from pipeline.zoo import build_backbone, head_state_dict, split
from tests.unit.device_sim.test_expansion import SMALL
from tests.unit.device_sim.test_feature_model import generate, known_model

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
    assert current.offer(update("a", 1.0, n=10)) is OfferOutcome.ACCEPTED
    assert not current.complete
    assert current.offer(update("b", 4.0, n=20)) is OfferOutcome.ACCEPTED
    assert current.complete
    np.testing.assert_allclose(current.mean.result()["w"], np.full((2, 3), 3.0))
    assert current.mean.weight == 30 and current.reported == {"a", "b"}


def test_round_ignores_and_counts_what_does_not_belong() -> None:
    current = open_round()
    assert current.offer(update("a", 1.0)) is OfferOutcome.ACCEPTED
    cases = [
        (update("a", 9.0), OfferOutcome.DUPLICATE),
        (update("z", 9.0), OfferOutcome.NOT_SELECTED),
        (update("b", 9.0, round_no=1), OfferOutcome.LATE),
        (update("b", 9.0, round_no=3), OfferOutcome.OTHER_ROUND),
        (update("b", 9.0, run_id="old-run"), OfferOutcome.OTHER_RUN),
        (update("b", 9.0, model_id="other"), OfferOutcome.OTHER_MODEL),
        (update("b", 9.0, kind=UpdateKind.GRADIENT), OfferOutcome.MISMATCH),
        (
            update("b", 9.0, tensors={"w": np.zeros((3, 2), dtype=np.float32)}),
            OfferOutcome.MISMATCH,
        ),
    ]
    for record, expected in cases:
        assert current.offer(record) is expected, expected
    current.reject(OfferOutcome.INVALID)
    # none of them touched the mean or the quorum
    np.testing.assert_allclose(current.mean.result()["w"], np.full((2, 3), 1.0))
    assert current.reported == {"a"} and not current.complete
    assert current.outcomes[OfferOutcome.ACCEPTED] == 1
    assert sum(current.outcomes.values()) == len(cases) + 2
    assert current.outcomes[OfferOutcome.INVALID] == 1


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


# --------------------------------------------------------------------------- the task


@pytest.fixture(scope="module")
def task() -> tuple[FeatureBank, World]:
    """An in-memory bank of 40 identities and its world (no rendering, no backbone)."""
    rng = np.random.default_rng(0)
    bank = expand(fit(*generate(known_model(rng), rng), rank=8), SMALL)
    return bank, split_world(SMALL, bank.num_domains - 1)


def test_the_devices_samples_are_distinct_observations_of_their_own_cells(
    task: tuple[FeatureBank, World],
) -> None:
    bank, world = task
    model = bank.model_ids[0]
    devices = make_devices(bank, world, model, count=40, samples=24, seed=1)
    pushed = np.concatenate([d.features for d in devices])
    assert pushed.dtype == np.float16 and pushed.shape == (40 * 24, bank.feature_shape[0])
    for device in devices:
        assert set(device.labels.tolist()) <= set(device.identities.tolist())
        assert device.eval_rows.size and bank.holdout[device.eval_rows].all()
        assert (bank.domains[device.eval_rows] == device.vendor).all()
    ids = [(d.device_id, int(s)) for d in devices for s in d.sample_ids]
    assert len(set(ids)) == len(ids)
    # a validation split of the pushed samples holds no copy of a trained vector, and no
    # test vector (the bank's real held-out rows) was pushed
    validation = np.random.default_rng(2).random(pushed.shape[0]) < 0.2
    report = distinct_check(bank, devices, validation)
    assert copies(report) == 0, report
    assert report["validation"] == int(validation.sum()) and report["test"] > 0
    # nor does any pushed sample equal a bank train row (a redraw of the bank would)
    assert not row_keys(pushed) & row_keys(bank.features[~bank.holdout])
    # another seed draws other samples; the same seed the same ones
    again = make_devices(bank, world, model, count=40, samples=24, seed=1)
    assert np.array_equal(again[3].features, devices[3].features)
    other = make_devices(bank, world, model, count=40, samples=24, seed=2)
    assert not row_keys(other[3].features) & row_keys(devices[3].features)


def test_the_distinct_report_counts_every_kind_of_copy() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 4)).astype(np.float16)
    clean = distinct_report(x[:6], x[6:8], x[8:])
    assert copies(clean) == 0 and clean["trained"] == 6 and clean["test"] == 2
    redrawn = distinct_report(np.concatenate([x[:6], x[:2]]), x[[6, 1]], x[[0, 6, 9]])
    assert redrawn["sample_copies"] == 3  # two trained twice, one validation = trained
    assert redrawn["validation_in_trained"] == 1
    assert redrawn["test_in_trained"] == 1 and redrawn["test_in_validation"] == 1
    assert copies(redrawn) == 6


def test_sample_identities_draw_from_each_device_s_own() -> None:
    sets = [np.array([3, 5]), np.array([7])]
    drawn = sample_identities(sets, 50, np.random.default_rng(0))
    assert drawn.shape == (2, 50)
    assert set(drawn[0].tolist()) == {3, 5} and set(drawn[1].tolist()) == {7}


# --------------------------------------------------------------------------- the report


def test_targets_are_fixed_a_share_of_fedex_s_gain_and_fedex_s_own() -> None:
    targets = targets_for(base=0.5, fedex=0.92, absolute=(0.90, 0.95), gains=(0.9, 0.95))
    assert [t["name"] for t in targets] == [
        "0.90",
        "0.95",
        "90% of FedEx's gain",
        "95% of FedEx's gain",
        FEDEX_TARGET,
    ]
    assert [t["kind"] for t in targets] == ["absolute"] * 2 + ["gain"] * 2 + ["fedex"]
    assert [t["accuracy"] for t in targets] == pytest.approx([0.90, 0.95, 0.878, 0.899, 0.92])
    assert [t["fedex_reached"] for t in targets] == [True, False, True, True, True]


def curve(accuracies: list[float]) -> list[dict[str, float]]:
    return [
        {"round": r, "accuracy": a, "wall_seconds": r / 10, "bytes_per_device": 1000.0 * r}
        for r, a in enumerate(accuracies)
    ]


def test_cost_at_takes_the_first_round_at_the_target_or_a_lower_bound() -> None:
    points = curve([0.5, 0.97, 0.985, 0.992, 0.99, 0.996])
    hit = cost_at(points, 0.99, final_download=500, fedex_bytes=250.0, fedex_wall=0.1)
    # 0.992 at round 3, before the dip to exactly 0.99
    assert hit == {
        "reached": True,
        "round": 3,
        "bytes_per_device": 3500.0,
        "wall_seconds": pytest.approx(0.3),
        "bytes_ratio": 14.0,
        "wall_ratio": pytest.approx(3.0),
    }
    assert cost_at(points, 0.99, final_download=0, fedex_bytes=1.0, fedex_wall=1.0)["round"] == 3
    missed = cost_at(points, 1.0, final_download=500, fedex_bytes=250.0, fedex_wall=0.1)
    assert missed == {
        "reached": False,
        "rounds_run": 5,
        "bytes_per_device": 5500.0,
        "bytes_ratio_lower_bound": 22.0,
    }


def test_stats_are_median_and_range_of_the_finite_values() -> None:
    assert stats([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert stats([float("nan"), 2.0]) == {"median": 2.0, "min": 2.0, "max": 2.0, "n": 1}
    assert stats([]) == {"median": None, "min": None, "max": None, "n": 0}


def test_vendor_report_names_the_worst_vendor_and_the_spread() -> None:
    correct = np.array([True, True, False, True, False, False, True, True])
    domains = np.array([1, 1, 1, 1, 2, 2, 3, 3])
    report = vendor_report(correct, domains)
    assert report["per_vendor"] == {"1": 0.75, "2": 0.0, "3": 1.0}
    assert report["spread"] == 1.0 and report["worst_vendor"] == 2
    assert report["worst_accuracy"] == 0.0
    assert report["variance"] == pytest.approx(np.var([0.75, 0.0, 1.0]))


def seed_result(seed: int, fedex: float, fp32: list[float], fp16: list[float]) -> dict[str, Any]:
    """What run_seed returns, with only what the summary reads."""
    base = 0.5
    targets = targets_for(base, fedex, absolute=(0.90,), gains=(0.9,))
    spread = {"spread": 0.1 * seed, "worst_accuracy": fedex - 0.1}
    fx = {
        "accuracy": fedex,
        "bytes_per_device": {"mean": 100.0},
        "wall_seconds": 2.0,
        "vendors": spread,
        "is_best": True,
    }
    arms = {}
    for dtype, accuracies in (("float32", fp32), ("float16", fp16)):
        run = {
            "accuracy": accuracies[-1],
            "rounds": len(accuracies) - 1,
            "vendors": spread,
            "curve": curve(accuracies),
            "final_download_bytes": 0,
        }
        arms[dtype] = with_costs(run, targets, fx)
    return {"seed": seed, "base_accuracy": base, "targets": targets, "fedex": fx, "fedavg": arms}


def test_the_summary_gives_median_and_range_over_seeds_per_target_and_precision() -> None:
    seeds = [
        seed_result(0, 0.95, [0.5, 0.8, 0.91, 0.96], [0.5, 0.92, 0.96]),
        seed_result(1, 0.85, [0.5, 0.7, 0.8, 0.84], [0.5, 0.86]),
        seed_result(2, 0.93, [0.5, 0.95], [0.5, 0.6, 0.7, 0.94]),
    ]
    summary = summarize(seeds, ["float32", "float16"])
    assert summary["seeds"] == 3
    assert summary["fedex"]["accuracy"] == {"median": 0.93, "min": 0.85, "max": 0.95, "n": 3}
    assert summary["fedex"]["promoted"] == 3
    assert summary["fedavg"]["float16"]["rounds"]["median"] == 2
    absolute, gain, fedex = summary["targets"]
    # 0.90: FedEx reached it in seeds 0 and 2 only; FedAvg fp32 at rounds 2 and 1
    assert absolute["name"] == "0.90" and absolute["fedex_reached"] == 2
    fp32 = absolute["fedavg"]["float32"]
    assert (fp32["reached"], fp32["of"]) == (2, 2)
    assert fp32["rounds"] == {"median": 1.5, "min": 1, "max": 2, "n": 2}
    assert fp32["bytes_ratio"] == {"median": 15.0, "min": 10.0, "max": 20.0, "n": 2}
    # FedEx's own accuracy: fp32 misses it in seed 1 (0.84 < 0.85): a lower bound
    assert fedex["fedavg"]["float32"]["reached"] == 2
    assert fedex["fedavg"]["float32"]["unreached_ratio_lower_bounds"] == [30.0]
    assert gain["fedex_reached"] == 3
    head = headline(summary)
    assert head["dtype"] == "float16" and (head["reached"], head["of"]) == (3, 3)
    assert head["bytes_ratio"] == 20.0  # rounds 2, 1, 3
    assert (head["bytes_ratio_min"], head["bytes_ratio_max"]) == (10.0, 30.0)
    assert head["wall_ratio"] == pytest.approx(0.1)
