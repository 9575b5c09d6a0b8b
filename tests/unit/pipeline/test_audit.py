"""The exactly-once audit's checks on hand-built topics: no broker.

Each test lays out a feature log, triggers, versions, dead letters and the agents' state
as a deployment would leave them, then breaks one invariant and expects exactly that
violation. The audit of the real stack runs in ``tests/integration/test_exactly_once.py``.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline import codec
from pipeline.audit import Auditor, AuditReport
from pipeline.records import DeadLetter, FeaturePush, ModelUpdate, OffsetRange, TrainingTrigger
from pipeline.samples import ValidationRule
from tests import factories

TOPIC = "p.features"
VAL = 0.25
#: With it, of the devices d0, d1, d2 of model m, d0 is a validation device.
VAL_DEVICES = 0.2
RULE = ValidationRule(VAL, VAL_DEVICES)


def push(offset: int, *, device: str | None = None, ids: list[int] | None = None) -> FeaturePush:
    """Offset ``offset``'s push: ten samples from id ``10 * offset`` (or ``ids``) of device
    ``d<offset % 3>`` (or ``device``), no features."""
    return factories.push(
        "m",
        device=f"d{offset % 3}" if device is None else device,
        first_id=offset * 10,
        sample_ids=ids,
        value=0.0,
        timestamp_ms=0,
    )


def update(
    version: str, trigger: TrainingTrigger | None = None, *, train: int = 0, val: int = 0
) -> ModelUpdate:
    return factories.update(
        "m",
        version,
        trigger_id=None if trigger is None else trigger.trigger_id,
        trigger_ranges=() if trigger is None else trigger.ranges,
        train=train,
        val=val,
    )


def trigger(seq: int, start: int, end: int, samples: int, attempt: int = 1) -> TrainingTrigger:
    return factories.trigger("m", seq, (OffsetRange(0, start, end),), samples, attempt=attempt)


def trained(t: TrainingTrigger, pushes: list[FeaturePush]) -> ModelUpdate:
    """The version a correct trainer publishes for ``t`` over its first copies."""
    keys = list(dict.fromkeys((p.device_id, int(s)) for p in pushes for s in p.sample_ids))
    val = int(RULE.mask("m", keys).sum())
    return update(f"v{t.trigger_id.rpartition(':')[2]}", t, train=len(keys) - val, val=val)


def state(*, pending: list[list[int]], next_offset: int, flight: dict | None = None) -> dict:
    return {
        "model_id": "m",
        "pending_ranges": pending,
        "next_offsets": [[0, next_offset]],
        "in_flight": flight,
    }


class World:
    """One deployment's topics, as the auditor reads them."""

    def __init__(self) -> None:
        self.pushes: list[FeaturePush] = [push(o) for o in range(8)]
        self.t1 = trigger(1, 0, 5, 50)
        self.updates = [update("v0"), trained(self.t1, self.pushes[:5])]
        self.triggers = [self.t1]
        self.dead: list[DeadLetter] = []
        self.raw: dict[int, bytes] = {}
        # 5 and 6 pending; 7 not counted yet (ingest lag).
        self.state: dict | None = state(pending=[[0, 5, 7]], next_offset=7)

    def trigger_the_pending(self) -> TrainingTrigger:
        """A second trigger over the pending pushes 5 and 6, on the topic, no longer pending."""
        t2 = trigger(2, 5, 7, 20)
        self.triggers.append(t2)
        self.state = state(pending=[], next_offset=7)
        return t2

    def audit(self) -> AuditReport:
        auditor = Auditor(features_topic=TOPIC, val_fraction=VAL, val_device_fraction=VAL_DEVICES)
        for letter in self.dead:
            auditor.add_dead_letter(letter)
        for u in self.updates:
            auditor.add_update(u)
        for t in self.triggers:
            auditor.add_trigger(t)
        auditor.add_state("m", self.state)
        for offset, p in enumerate(self.pushes):
            value = self.raw.get(offset, codec.encode_push(p))
            auditor.add_feature_record(0, offset, b"m", value)
        return auditor.report()


def kinds(report: AuditReport) -> list[str]:
    return [v.kind for v in report.violations]


def test_a_healthy_deployment_is_clean_and_accounted_for() -> None:
    report = World().audit()
    assert report.clean, report.violations
    [m] = report.models
    assert (m.pushes, m.samples, m.distinct, m.copies) == (8, 80, 80, 0)
    assert (m.trained_pushes, m.trained_samples, m.pending_pushes, m.uncounted_pushes) == (
        5,
        50,
        2,
        1,
    )
    assert (m.triggers, m.versions, m.train_samples + m.val_samples) == (1, 1, 50)


def test_a_counted_push_in_no_trigger_and_not_pending_is_orphaned() -> None:
    world = World()
    world.state = state(pending=[[0, 6, 7]], next_offset=7)  # the lost update dropped 5
    report = world.audit()
    assert kinds(report) == ["orphaned"]
    assert "0@5" in report.violations[0].detail
    assert report.models[0].orphaned_samples == 10


def test_a_re_fired_trigger_with_other_ranges_is_flagged() -> None:
    world = World()
    world.triggers.append(trigger(1, 0, 4, 40, attempt=2))
    assert kinds(world.audit()) == ["trigger_ranges_differ"]


def test_a_trigger_whose_count_is_not_its_ranges_is_flagged() -> None:
    world = World()
    world.triggers = [trigger(1, 0, 5, 45)]
    world.updates[1] = replace(world.updates[1], trigger_ranges=world.triggers[0].ranges)
    assert kinds(world.audit()) == ["trigger_count_mismatch"]


def test_train_counts_that_do_not_match_the_log_are_flagged() -> None:
    world = World()
    m = world.updates[1].metrics
    world.updates[1] = replace(
        world.updates[1], metrics=replace(m, train_samples=m.train_samples + 10)
    )
    assert kinds(world.audit()) == ["train_counts_differ"]


def test_train_counts_follow_the_trainers_validation_rule_devices_included() -> None:
    world = World()
    [m] = world.audit().models
    assert RULE.held_out_devices("m", ["d0", "d1", "d2"]) == {"d0"}
    assert m.val_samples >= 20  # offsets 0 and 3 are d0's: all validation
    # A trainer that held out samples by their hash alone reports other counts.
    keys = [(p.device_id, int(s)) for p in world.pushes[:5] for s in p.sample_ids]
    val = int(ValidationRule(VAL).mask("m", keys).sum())
    world.updates[1] = replace(
        world.updates[1],
        metrics=replace(world.updates[1].metrics, train_samples=50 - val, val_samples=val),
    )
    assert kinds(world.audit()) == ["train_counts_differ"]


def test_replayed_samples_are_counted_apart_and_are_no_violation() -> None:
    world = World()
    t2 = world.trigger_the_pending()
    v2 = trained(t2, world.pushes[5:7])
    world.updates.append(replace(v2, metrics=replace(v2.metrics, replay_samples=25)))
    report = world.audit()
    assert report.clean, report.violations
    [m] = report.models
    assert (m.trained_samples, m.train_samples + m.val_samples, m.replay_samples) == (70, 70, 25)


def test_a_re_sent_copy_counts_once_and_stays_with_the_job_of_its_first_copy() -> None:
    world = World()
    world.pushes[5] = push(5, device="d0", ids=list(range(10)))  # offset 0's, sent again
    report = world.audit()
    assert report.clean, report.violations
    [m] = report.models
    assert (m.distinct, m.copies, m.trained_samples) == (70, 10, 50)


def test_a_job_in_flight_and_one_written_ahead_of_its_trigger_are_not_orphans() -> None:
    world = World()
    t2 = trigger(2, 5, 7, 20)
    flight = {"trigger_id": "m:2", "ranges": [[0, 5, 7]]}
    world.state = state(pending=[], next_offset=7, flight=flight)
    assert world.audit().clean  # the trigger not on the topic yet
    world.triggers.append(t2)
    report = world.audit()
    assert report.clean, report.violations
    assert report.models[0].in_flight_pushes == 2


def test_a_trigger_without_version_and_not_in_flight_is_flagged() -> None:
    world = World()
    world.trigger_the_pending()
    assert kinds(world.audit()) == ["trigger_without_version", "trigger_without_version"]


@pytest.mark.parametrize("dead_lettered", [False, True])
def test_a_bad_record_must_be_dead_lettered(dead_lettered: bool) -> None:
    world = World()
    world.raw[7] = b"not a push"
    if dead_lettered:
        world.dead.append(DeadLetter(b"not a push", TOPIC, 0, 7, "bad_magic", "no", b"m"))
    report = world.audit()
    assert kinds(report) == ([] if dead_lettered else ["rejected_not_dead_lettered"])
    assert report.models[0].dead_lettered == int(dead_lettered)


def test_versions_must_be_monotone_and_one_per_trigger() -> None:
    world = World()
    t2 = world.trigger_the_pending()
    v2 = trained(t2, world.pushes[5:7])
    world.updates = [world.updates[0], v2, world.updates[1], replace(v2, version="v3")]
    assert kinds(world.audit()) == ["versions_per_trigger", "versions_not_monotone"]
