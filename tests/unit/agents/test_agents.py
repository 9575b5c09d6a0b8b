"""The agents' batch logic without Faust or a broker: ``Summarizer`` (the ingest stage's
validation and summaries) and ``Aggregator`` (the Faust agent's counting and triggers).

The Kafka shells around them (``agents.ingest``, ``agents.app``) are covered end to end by
``tests/integration/test_agents.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import pytest

from agents.aggregator import Aggregator, Record
from agents.policy import ModelState, TriggerPolicy
from agents.summarizer import MODEL_MISMATCH, TOO_LARGE, UNKNOWN_MODEL, Summarizer
from pipeline import codec
from pipeline.records import Backbone, BatchSummary, Cut, FeaturePush, TriggerReason
from pipeline.samples import DEFAULT_MAX_PUSH_BYTES, ModelFit
from tests import factories
from tests.unit.agents.test_policy import T0, update

POLICY = TriggerPolicy(min_samples=30, age_floor_samples=5, max_age_s=60.0, job_timeout_s=300.0)
TOPIC = "p.features"
SUMMARIES = "p-agents-summaries"
SPEC = ModelFit("m", Backbone.INCEPTION_RESNET_V1, Cut.FREEZE6, num_classes=10)


class Store:
    """The table, as the aggregator sees it: load by model id; the test stores outcomes."""

    def __init__(self) -> None:
        self.states: dict[str, ModelState] = {}

    def load(self, model_id: str) -> ModelState | None:
        state = self.states.get(model_id)
        # A copy, as from the table's bytes: the aggregator must return what it changed.
        return None if state is None else ModelState.from_fields(state.to_fields())


def make(store: Store) -> Aggregator:
    return Aggregator(POLICY, load=store.load)


def summarizer(max_push_bytes: int = DEFAULT_MAX_PUSH_BYTES, **fits: ModelFit) -> Summarizer:
    return Summarizer(max_push_bytes=max_push_bytes, max_push_samples=64, lookup=fits.get)


def push(model_id: str = "m", *, first_id: int = 0, n: int = 10, device: int = 0) -> FeaturePush:
    return factories.push(model_id, device=device, n=n, first_id=first_id)


def rec(
    value: bytes, offset: int, *, key: str | None = "m", partition: int = 0, at: float = T0
) -> Record:
    return Record(TOPIC, partition, offset, None if key is None else key.encode(), value, at)


def pushes(offsets: Iterable[int], n: int = 10, *, partition: int = 0) -> list[Record]:
    return [
        rec(codec.encode_push(push(first_id=o * 100, n=n, device=o % 3)), o, partition=partition)
        for o in offsets
    ]


def summary_records(records: list[Record], offset: int = 0) -> list[Record]:
    """What the ingest stage sends for ``records``, as the Faust agent reads it."""
    out = summarizer(m=SPEC).summarize(records, T0)
    assert not out.dead_letters
    return [
        Record(SUMMARIES, s.partition, offset + i, None, codec.encode_summary(s), T0)
        for i, s in enumerate(out.summaries)
    ]


def with_model(store: Store, agg: Aggregator) -> None:
    out = agg.add_update(Record("p.models", 0, 0, b"m", codec.encode_update(update()), T0), T0)
    store.states.update(out.states)


# -------------------------------------------------------------------------- summarizer


def test_summary_per_partition_with_every_good_push() -> None:
    records = [
        rec(codec.encode_push(push(n=4, device=1)), 3, at=T0 + 0.5),
        rec(codec.encode_push(push("k", n=2)), 4, key="k"),
        rec(codec.encode_push(push(n=6, device=2, first_id=50)), 7, at=T0 + 0.25),
        rec(codec.encode_push(push(n=1, device=1, first_id=90)), 2, partition=1),
    ]
    out = summarizer(m=SPEC, k=SPEC).summarize(records, T0 + 9)
    assert not out.dead_letters
    assert (out.pushes, out.samples) == (4, 13)
    assert out.commit == {(TOPIC, 0): 8, (TOPIC, 1): 3}
    p0, p1 = out.summaries
    assert (p0.partition, p1.partition) == (0, 1)
    assert [p0.models[i] for i in p0.model_index] == ["m", "k", "m"]
    assert (p0.offsets.tolist(), p0.samples.tolist()) == ([3, 4, 7], [4, 2, 6])
    assert p0.times_ms.tolist()[::2] == [round((T0 + 0.5) * 1000), round((T0 + 0.25) * 1000)]
    assert [p0.devices[i] for i in p0.device_index] == ["dev-000001", "dev-000000", "dev-000002"]
    assert (p1.models, p1.offsets.tolist(), p1.sample_count) == (("m",), [2], 1)
    # What the summarizer builds is what the codec carries.
    assert codec.decode_summary(codec.encode_summary(p0)).same_as(p0)


def test_bad_pushes_become_dead_letters_with_their_origin() -> None:
    good = push()
    bad_label = replace(good, labels=np.full(10, 10, dtype=np.int32))  # model has 10 classes
    freeze5 = factories.push("m", cut=Cut.FREEZE5)
    cases = {
        "bad_magic": rec(b"x" * 32, 1),
        "truncated": rec(b"FDXS", 2),
        "label_out_of_range": rec(codec.encode_push(bad_label), 3),
        "oversized_batch": rec(codec.encode_push(push(n=65)), 4),
        UNKNOWN_MODEL: rec(codec.encode_push(push("ghost")), 5, key="ghost"),
        MODEL_MISMATCH: rec(codec.encode_push(push("other")), 6, key="m"),
        "model_mismatch_cut": rec(codec.encode_push(freeze5), 7),
        "model_mismatch_key": rec(codec.encode_push(push()), 8, key=None),
        "tombstone": Record(TOPIC, 0, 9, b"m", None, T0),
    }
    out = summarizer(m=SPEC).summarize([rec(codec.encode_push(good), 0), *cases.values()], T0)
    reasons = [d.reason for d in out.dead_letters]
    assert reasons == [*list(cases)[:-3], MODEL_MISMATCH, MODEL_MISMATCH, "tombstone"]
    for letter, record in zip(out.dead_letters, cases.values(), strict=True):
        assert (letter.topic, letter.partition, letter.offset) == (TOPIC, 0, record.offset)
        assert (letter.original, letter.key) == (record.value or b"", record.key)
        assert letter.message and letter.at_ms == int(T0 * 1000)
    [summary] = out.summaries
    assert (summary.offsets.tolist(), out.samples) == ([0], 10)
    # Dead letters move the committed offset too: they are handled.
    assert out.commit == {(TOPIC, 0): 10}


def test_a_push_over_the_byte_limit_is_dead_lettered_too_large_undecoded() -> None:
    # Well-formed (28 full-cut samples, under the sample limit) but over the deployment's
    # 4 MiB push limit, which the model server answers 413 too_large.
    big = codec.encode_push(factories.push("m", n=28, cut=Cut.FULL))
    assert len(big) > DEFAULT_MAX_PUSH_BYTES
    out = summarizer(m=ModelFit("m", Backbone.INCEPTION_RESNET_V1, Cut.FULL, 10)).summarize(
        [rec(big, 0)], T0
    )
    [letter] = out.dead_letters
    assert letter.reason == TOO_LARGE == "too_large"
    assert f"{len(big)} bytes, the limit is {DEFAULT_MAX_PUSH_BYTES}" in letter.message
    assert (out.summaries, out.commit) == ([], {(TOPIC, 0): 1})
    # At the limit exactly, a push is taken; garbage over it is not even decoded.
    exact = codec.encode_push(push())
    out = summarizer(len(exact), m=SPEC).summarize(
        [rec(exact, 0), rec(b"x" * (len(exact) + 1), 1)], T0
    )
    assert out.pushes == 1 and [d.reason for d in out.dead_letters] == [TOO_LARGE]


def test_a_key_for_another_model_is_a_mismatch_before_any_check_of_the_model() -> None:
    # Key "other" (10 classes), payload "faces" (100 classes) with labels up to 49: the
    # key's label range must not judge the push, and no message may blame "faces" for it.
    fits = {
        "other": ModelFit("other", Backbone.INCEPTION_RESNET_V1, Cut.FREEZE6, 10),
        "faces": ModelFit("faces", Backbone.INCEPTION_RESNET_V1, Cut.FREEZE6, 100),
    }
    faces = factories.push("faces", n=50, num_classes=100)
    out = summarizer(**fits).summarize([rec(codec.encode_push(faces), 0, key="other")], T0)
    [letter] = out.dead_letters
    assert letter.reason == MODEL_MISMATCH
    assert "'faces'" in letter.message and "'other'" in letter.message
    assert "labels" not in letter.message
    # Keyed right, the same push is checked against its own model's range...
    out = summarizer(**fits).summarize([rec(codec.encode_push(faces), 0, key="faces")], T0)
    assert (out.dead_letters, out.pushes) == ([], 1)
    # ...and a label over that range names the model it was checked against.
    wide = factories.push("other", n=12, num_classes=12)
    out = summarizer(**fits).summarize([rec(codec.encode_push(wide), 0, key="other")], T0)
    [letter] = out.dead_letters
    assert letter.reason == "label_out_of_range"
    assert letter.message.startswith("labels must be [0, 10) for model 'other', got max 11")


def test_a_batch_of_only_bad_pushes_has_no_summary() -> None:
    out = summarizer().summarize([rec(codec.encode_push(push()), 4)], T0)
    assert [d.reason for d in out.dead_letters] == [UNKNOWN_MODEL]
    assert (out.summaries, out.commit) == ([], {(TOPIC, 0): 5})


# -------------------------------------------------------------------------- aggregator


def test_summaries_count_and_fire_at_the_push_that_crosses_the_threshold() -> None:
    store = Store()
    agg = make(store)
    with_model(store, agg)
    records = summary_records(pushes(range(5)))
    out = agg.add_summaries(records, T0 + 1)
    assert out.counted_samples == 50 and not out.dead_letters
    [trigger] = out.triggers
    assert trigger.reason is TriggerReason.COUNT
    assert (trigger.sample_count, trigger.ranges[0].start, trigger.ranges[0].end) == (30, 0, 3)
    state = out.states["m"]
    assert state.pending_samples == 20 and state.pending_ranges == {0: (3, 5)}
    assert state.counted_pushes == 5 and state.distinct_devices == 2
    assert out.last_record["m"] is records[-1]
    store.states.update(out.states)
    # The same summary again (the ingest stage died before its commit): nothing new.
    again = agg.add_summaries(records, T0 + 2)
    assert (again.counted_samples, again.replayed, again.triggers) == (0, 5, [])
    assert not again.states


def test_one_summary_counts_every_model_of_its_partition_into_its_own_state() -> None:
    store = Store()
    agg = make(store)
    with_model(store, agg)
    records = [
        rec(codec.encode_push(push(key, first_id=o * 100)), o, key=key)
        for o, key in enumerate(["m", "k", "m", "k", "m"])
    ]
    [summary] = summarizer(m=SPEC, k=SPEC).summarize(records, T0).summaries
    record = Record(SUMMARIES, 0, 0, None, codec.encode_summary(summary), T0)
    out = agg.add_summaries([record], T0)
    assert out.counted_samples == 50
    m, k = out.states["m"], out.states["k"]
    [trigger] = out.triggers  # m reached 30; k (no update yet) is counted, not fired
    assert (trigger.model_id, trigger.ranges[0].start, trigger.ranges[0].end) == ("m", 0, 5)
    assert (k.pending_samples, k.pending_ranges, k.known) == (20, {0: (1, 4)}, False)
    assert m.next_offsets == {0: 5} and k.next_offsets == {0: 4}
    assert out.last_record == {"m": record, "k": record}


def test_a_replay_batched_differently_counts_only_the_new_pushes() -> None:
    store = Store()
    agg = make(store)
    with_model(store, agg)
    out = agg.add_summaries(summary_records(pushes(range(2))), T0)
    store.states.update(out.states)
    # After a restart the stage re-reads from offset 0 and batches offsets 0..3 together.
    out = agg.add_summaries(summary_records(pushes(range(4)), offset=1), T0)
    assert (out.counted_samples, out.replayed) == (20, 2)
    [trigger] = out.triggers
    assert (trigger.sample_count, trigger.ranges[0].start, trigger.ranges[0].end) == (30, 0, 3)
    assert out.states["m"].pending_ranges == {0: (3, 4)}


def test_the_trigger_is_the_same_however_the_pushes_were_batched() -> None:
    def run(batches: list[list[int]]) -> list[tuple[str, int, int]]:
        store = Store()
        agg = make(store)
        with_model(store, agg)
        fired = []
        for i, offsets in enumerate(batches):
            out = agg.add_summaries(summary_records(pushes(offsets), offset=i), T0)
            store.states.update(out.states)
            fired += [(t.trigger_id, t.ranges[0].end, t.sample_count) for t in out.triggers]
        return fired

    assert run([[0, 1, 2, 3, 4]]) == run([[0], [1, 2], [3, 4]]) == [("m:1", 3, 30)]


def test_summaries_of_a_model_not_yet_known_count_and_fire_on_its_update() -> None:
    store = Store()
    agg = make(store)
    out = agg.add_summaries(summary_records(pushes(range(4))), T0)
    assert (out.counted_samples, out.triggers) == (40, [])
    store.states.update(out.states)
    out = agg.add_update(Record("p.models", 0, 0, b"m", codec.encode_update(update()), T0), T0)
    [trigger] = out.triggers
    assert (trigger.sample_count, trigger.reason) == (40, TriggerReason.COUNT)


def test_a_bad_summary_is_dead_lettered_and_the_rest_still_counts() -> None:
    store = Store()
    agg = make(store)
    with_model(store, agg)
    [good] = summary_records(pushes([0]))
    junk = Record(SUMMARIES, 0, 1, b"m", b"not a summary at all", T0)
    out = agg.add_summaries([junk, replace(good, offset=2)], T0)
    assert [d.reason for d in out.dead_letters] == ["bad_magic"]
    assert (out.dead_letters[0].topic, out.dead_letters[0].offset) == (SUMMARIES, 1)
    assert out.counted_samples == 10


def test_summary_columns_carry_log_times_for_the_age_trigger() -> None:
    store = Store()
    agg = make(store)
    with_model(store, agg)
    summary = BatchSummary(
        partition=0,
        models=("m",),
        model_index=np.array([0, 0], dtype=np.int32),
        offsets=np.array([0, 1], dtype=np.int64),
        samples=np.array([3, 3], dtype=np.int32),
        times_ms=np.array([int((T0 + 5) * 1000), int(T0 * 1000)], dtype=np.int64),
        device_index=np.array([0, 0], dtype=np.int32),
        devices=("d",),
    )
    record = Record(SUMMARIES, 0, 0, b"m", codec.encode_summary(summary), T0)
    out = agg.add_summaries([record], T0)
    store.states.update(out.states)
    assert out.states["m"].oldest_pending_at == T0
    [trigger] = agg.tick(list(store.states.values()), T0 + 60).triggers
    assert (trigger.reason, trigger.sample_count) == (TriggerReason.AGE, 6)


def test_updates_end_the_job_and_let_the_next_trigger_fire() -> None:
    store = Store()
    agg = make(store)
    with_model(store, agg)
    out = agg.add_summaries(summary_records(pushes([0], n=40)), T0)
    [first] = out.triggers
    store.states.update(out.states)
    out = agg.add_summaries(summary_records(pushes([1], n=40), offset=1), T0)
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


@pytest.mark.parametrize("key", [b"m/v0", b"m"])
def test_updates_keyed_by_model_and_version_or_by_model_alone_are_accepted(
    key: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store()
    agg = make(store)
    with caplog.at_level(logging.WARNING, logger="agents.aggregator"):
        out = agg.add_update(Record("p.models", 0, 0, key, codec.encode_update(update()), T0), T0)
    assert not caplog.records
    assert not out.dead_letters
    assert out.states["m"].known


@pytest.mark.parametrize("key", [b"n/v0", b"n", b"m/v9", None, b"\xff"])
def test_an_update_keyed_for_another_model_or_version_is_flagged(
    key: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    agg = make(Store())
    with caplog.at_level(logging.WARNING, logger="agents.aggregator"):
        agg.add_update(Record("p.models", 0, 0, key, codec.encode_update(update()), T0), T0)
    [warning] = caplog.records
    assert "not by its model id and version" in warning.getMessage()


def test_tick_fires_age_triggers_and_retries_and_returns_only_changed_states() -> None:
    store = Store()
    agg = make(store)
    with_model(store, agg)
    store.states["n"] = ModelState.from_fields({**store.states["m"].to_fields(), "model_id": "n"})
    out = agg.add_summaries(summary_records(pushes([0], n=6)), T0)
    store.states.update(out.states)
    assert not agg.tick(list(store.states.values()), T0 + 59).states
    out = agg.tick(list(store.states.values()), T0 + 60)
    [trigger] = out.triggers
    assert (trigger.reason, list(out.states)) == (TriggerReason.AGE, ["m"])
    store.states.update(out.states)
    out = agg.tick(list(store.states.values()), T0 + 360)
    [retry] = out.triggers
    assert (retry.trigger_id, retry.attempt, retry.reason) == ("m:1", 2, TriggerReason.RETRY)


def test_a_takeover_re_fires_only_jobs_whose_trigger_is_not_known_sent() -> None:
    store = Store()
    agg = make(store)
    with_model(store, agg)
    out = agg.add_summaries(summary_records(pushes(range(3))), T0)
    [first] = out.triggers
    store.states.update(out.states)
    # Written ahead of the send, not yet marked announced: the new owner re-fires it.
    out = agg.take_over(list(store.states.values()), T0 + 1)
    [again] = out.triggers
    assert (again.trigger_id, again.ranges, again.sample_count) == (
        first.trigger_id,
        first.ranges,
        first.sample_count,
    )
    assert (again.reason, again.attempt) == (TriggerReason.RETRY, 2)
    # Once the send was acknowledged (the shell marks it), a takeover leaves it alone.
    state = out.states["m"]
    assert state.in_flight is not None and not state.in_flight.announced
    state.in_flight.announced = True
    store.states.update(out.states)
    assert not agg.take_over(list(store.states.values()), T0 + 2).triggers
    # The flag survives the table's bytes.
    assert store.load("m").in_flight.announced  # type: ignore[union-attr]
