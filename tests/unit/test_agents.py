"""The agents' batch logic (``Aggregator``) without Faust or a broker.

The Faust shell around it (``agents.app``) is covered end to end by
``tests/integration/test_agents.py``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from agents.aggregator import MODEL_MISMATCH, UNKNOWN_MODEL, Aggregator, Record
from agents.policy import ModelState, TriggerPolicy
from pipeline import codec
from pipeline.records import Cut, FeaturePush, TriggerReason
from pipeline.transport_bench import synthetic_push
from tests.unit.test_policy import T0, update

POLICY = TriggerPolicy(min_samples=30, age_floor_samples=5, max_age_s=60.0, job_timeout_s=300.0)
TOPIC = "p.features"


class Store:
    """The table, as the aggregator sees it: load by model id; the test stores outcomes."""

    def __init__(self) -> None:
        self.states: dict[str, ModelState] = {}

    def load(self, model_id: str) -> ModelState | None:
        state = self.states.get(model_id)
        # A copy, as from the table's bytes: the aggregator must return what it changed.
        return None if state is None else ModelState.from_fields(state.to_fields())


def make(store: Store) -> Aggregator:
    return Aggregator(POLICY, max_push_samples=64, load=store.load)


def push(model_id: str = "m", *, first_id: int = 0, n: int = 10) -> FeaturePush:
    p = synthetic_push(n, first_id=first_id, seed=first_id)
    return replace(p, model_id=model_id, labels=(p.labels % 10).astype(np.int32))


def rec(value: bytes, offset: int, *, key: str | None = "m", partition: int = 0) -> Record:
    return Record(TOPIC, partition, offset, None if key is None else key.encode(), value, T0)


def with_model(store: Store, agg: Aggregator) -> None:
    out = agg.add_update(Record("p.models", 0, 0, b"m", codec.encode_update(update()), T0), T0)
    store.states.update(out.states)


def test_pushes_count_and_fire_at_the_record_that_crosses_the_threshold() -> None:
    store = Store()
    agg = make(store)
    with_model(store, agg)
    records = [rec(codec.encode_push(push(first_id=i * 10)), i) for i in range(5)]
    out = agg.add_pushes(records, T0 + 1)
    assert out.counted_samples == 50 and not out.dead_letters
    [trigger] = out.triggers
    assert trigger.reason is TriggerReason.COUNT
    assert (trigger.sample_count, trigger.ranges[0].start, trigger.ranges[0].end) == (30, 0, 3)
    state = out.states["m"]
    assert state.pending_samples == 20 and state.pending_ranges == {0: (3, 5)}
    assert out.last_record["m"].offset == 4
    store.states.update(out.states)
    # The same batch again (a redelivery after a crash): nothing new.
    again = agg.add_pushes(records, T0 + 2)
    assert (again.counted_samples, again.replayed, again.triggers) == (0, 5, [])
    assert not again.states


def test_bad_pushes_become_dead_letters_with_their_origin() -> None:
    store = Store()
    agg = make(store)
    with_model(store, agg)
    good = push()
    bad_label = replace(good, labels=np.full(10, 10, dtype=np.int32))  # model has 10 classes
    cases = {
        "bad_magic": rec(b"x" * 32, 1),
        "truncated": rec(b"FDXS", 2),
        "label_out_of_range": rec(codec.encode_push(bad_label), 3),
        "oversized_batch": rec(codec.encode_push(push(n=65)), 4),
        UNKNOWN_MODEL: rec(codec.encode_push(push("ghost")), 5, key="ghost"),
        MODEL_MISMATCH: rec(codec.encode_push(push("other")), 6, key="m"),
    }
    freeze5 = synthetic_push(10, cut=Cut.FREEZE5)
    cases["model_mismatch_cut"] = rec(
        codec.encode_push(replace(freeze5, model_id="m", labels=freeze5.labels % 10)), 7
    )
    out = agg.add_pushes([rec(codec.encode_push(good), 0), *cases.values()], T0)
    reasons = [d.reason for d in out.dead_letters]
    assert reasons == [*list(cases)[:-1], MODEL_MISMATCH]
    for letter, record in zip(out.dead_letters, cases.values(), strict=True):
        assert (letter.topic, letter.partition, letter.offset) == (TOPIC, 0, record.offset)
        assert (letter.original, letter.key) == (record.value, record.key)
        assert letter.message
    assert out.counted_samples == 10
    assert list(out.states) == ["m"]


def test_a_push_without_a_key_is_rejected() -> None:
    store = Store()
    agg = make(store)
    with_model(store, agg)
    out = agg.add_pushes([rec(codec.encode_push(push()), 0, key=None)], T0)
    assert [d.reason for d in out.dead_letters] == [MODEL_MISMATCH]


def test_updates_end_the_job_and_let_the_next_trigger_fire() -> None:
    store = Store()
    agg = make(store)
    with_model(store, agg)
    out = agg.add_pushes([rec(codec.encode_push(push(n=40)), 0)], T0)
    [first] = out.triggers
    store.states.update(out.states)
    out = agg.add_pushes([rec(codec.encode_push(push(n=40, first_id=50)), 1)], T0)
    assert not out.triggers
    store.states.update(out.states)
    answer = codec.encode_update(update("v1", first.trigger_id))
    out = agg.add_update(Record("p.models", 0, 1, b"m", answer, T0), T0 + 5)
    [second] = out.triggers
    assert (second.trigger_id, second.sample_count, second.base_version) == ("m:2", 40, "v1")


def test_bad_updates_are_dead_lettered_and_tombstones_ignored() -> None:
    agg = make(Store())
    out = agg.add_update(Record("p.models", 0, 3, b"m", b"junk-junk-junk-junk", T0), T0)
    assert [d.reason for d in out.dead_letters] == ["bad_magic"]
    assert not out.states
    out = agg.add_update(Record("p.models", 0, 4, b"m", None, T0), T0)
    assert not out.dead_letters and not out.states


def test_tick_fires_age_triggers_and_retries_and_returns_only_changed_states() -> None:
    store = Store()
    agg = make(store)
    with_model(store, agg)
    store.states["n"] = ModelState.from_fields({**store.states["m"].to_fields(), "model_id": "n"})
    out = agg.add_pushes([rec(codec.encode_push(push(n=6)), 0)], T0)
    store.states.update(out.states)
    assert not agg.tick(list(store.states.values()), T0 + 59).states
    out = agg.tick(list(store.states.values()), T0 + 60)
    [trigger] = out.triggers
    assert (trigger.reason, list(out.states)) == (TriggerReason.AGE, ["m"])
    store.states.update(out.states)
    out = agg.tick(list(store.states.values()), T0 + 360)
    [retry] = out.triggers
    assert (retry.trigger_id, retry.attempt, retry.reason) == ("m:1", 2, TriggerReason.RETRY)
