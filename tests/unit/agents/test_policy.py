"""The trigger policy and the per-model state, with an injected clock and no broker."""

from __future__ import annotations

import pytest

from agents.policy import MAX_TRACKED_DEVICES, ModelState, TriggerPolicy
from pipeline import codec
from pipeline.records import (
    ModelUpdate,
    OffsetRange,
    TriggerReason,
)
from tests import factories

POLICY = TriggerPolicy(min_samples=100, age_floor_samples=20, max_age_s=60.0, job_timeout_s=300.0)
T0 = 1_700_000_000.0


def update(version: str = "v0", trigger_id: str | None = None, *, best: bool = True) -> ModelUpdate:
    return factories.update("m", version, trigger_id=trigger_id, best=best)


def known() -> ModelState:
    state = POLICY.initialize("m")
    POLICY.on_update(state, update())
    return state


def add(
    state: ModelState,
    offset: int,
    samples: int = 10,
    *,
    at: float = T0,
    partition: int = 0,
    device: str = "d0",
) -> bool:
    return POLICY.agg(
        state, partition=partition, offset=offset, samples=samples, device_id=device, at=at
    )


def test_nothing_fires_for_a_model_without_a_base_update() -> None:
    state = POLICY.initialize("m")
    add(state, 0, 500)
    assert not state.known
    assert POLICY.result(state, T0) is None


def test_count_trigger_takes_every_pending_sample_and_range() -> None:
    state = known()
    for offset in range(9):
        add(state, 3 + offset)
        assert POLICY.result(state, T0) is None
    add(state, 12, samples=15)
    trigger = POLICY.result(state, T0 + 1)
    assert trigger is not None
    assert (trigger.trigger_id, trigger.reason, trigger.attempt) == ("m:1", TriggerReason.COUNT, 1)
    assert trigger.sample_count == 105
    assert trigger.ranges == (OffsetRange(0, 3, 13),)
    assert trigger.base_version == "v0"
    assert trigger.created_at_ms == int((T0 + 1) * 1000)
    assert state.pending_samples == 0 and not state.pending_ranges
    assert state.in_flight is not None and state.last_trigger_at == T0 + 1


def test_ranges_are_kept_per_partition() -> None:
    state = known()
    add(state, 5, 60, partition=1)
    add(state, 7, 60, partition=0)
    add(state, 9, 1, partition=1)
    trigger = POLICY.result(state, T0)
    assert trigger is not None
    assert trigger.ranges == (OffsetRange(0, 7, 8), OffsetRange(1, 5, 10))


def test_age_trigger_needs_the_floor_and_the_age() -> None:
    state = known()
    add(state, 0, 19, at=T0)
    assert POLICY.result(state, T0 + 3600) is None  # old, but under the floor
    add(state, 1, 1, at=T0 + 50)
    assert POLICY.due(state, T0 + 59.9) is None  # at the floor, not old enough
    trigger = POLICY.result(state, T0 + 60)
    assert trigger is not None and trigger.reason is TriggerReason.AGE
    assert trigger.sample_count == 20


def test_oldest_pending_time_is_the_minimum_and_resets_with_a_trigger() -> None:
    state = known()
    add(state, 0, 50, at=T0 + 10)
    add(state, 1, 50, at=T0)
    assert state.oldest_pending_at == T0
    assert POLICY.result(state, T0 + 11) is not None
    assert state.oldest_pending_at is None


def test_one_job_in_flight_coalesces_new_data_into_the_next_trigger() -> None:
    state = known()
    add(state, 0, 100)
    first = POLICY.result(state, T0)
    assert first is not None
    add(state, 1, 100)
    add(state, 2, 100)
    assert POLICY.result(state, T0 + 1) is None  # count reached, job still running
    assert state.pending_samples == 200
    assert POLICY.on_update(state, update("v1", first.trigger_id))
    second = POLICY.result(state, T0 + 2)
    assert second is not None
    assert (second.trigger_id, second.sample_count) == ("m:2", 200)
    assert second.ranges == (OffsetRange(0, 1, 3),)
    assert second.base_version == "v1"


def test_only_the_matching_update_ends_the_job() -> None:
    state = known()
    add(state, 0, 100)
    first = POLICY.result(state, T0)
    assert first is not None
    assert not POLICY.on_update(state, update("v7", "m:7"))
    assert not POLICY.on_update(state, update("v0b", None))
    assert state.in_flight is not None
    assert POLICY.on_update(state, update("v1", "m:1", best=False))
    assert state.in_flight is None
    assert (state.latest_version, state.best_version) == ("v1", "v0b")


def test_timed_out_job_is_fired_again_with_the_same_id() -> None:
    state = known()
    add(state, 0, 100)
    first = POLICY.result(state, T0)
    assert first is not None
    add(state, 1, 100)  # new data stays pending through the re-fires
    assert POLICY.result(state, T0 + 299) is None
    retry = POLICY.result(state, T0 + 300)
    assert retry is not None
    assert (retry.trigger_id, retry.reason, retry.attempt) == ("m:1", TriggerReason.RETRY, 2)
    assert (retry.ranges, retry.sample_count) == (first.ranges, first.sample_count)
    assert POLICY.result(state, T0 + 599) is None  # the timeout restarts at each re-fire
    third = POLICY.result(state, T0 + 600)
    assert third is not None and third.attempt == 3
    assert state.pending_samples == 100


def test_replayed_offsets_are_ignored() -> None:
    state = known()
    assert add(state, 10, 30)
    assert add(state, 11, 30)
    assert not add(state, 10, 30)
    assert not add(state, 11, 30)
    assert add(state, 5, 30, partition=1)  # another partition has its own offsets
    assert state.pending_samples == 90
    assert POLICY.result(state, T0) is None
    assert add(state, 12, 10)
    trigger = POLICY.result(state, T0)
    assert trigger is not None
    assert not add(state, 12, 10)  # after a trigger too
    assert state.pending_samples == 0


def test_distinct_devices_are_counted_and_bounded() -> None:
    state = known()
    for i in range(3):
        add(state, i, 1, device=f"d{i % 2}")
    assert state.distinct_devices == 2
    for i in range(MAX_TRACKED_DEVICES * 2):
        add(state, 10 + i, 0, device=f"x{i}")
    assert state.distinct_devices == MAX_TRACKED_DEVICES


@pytest.mark.parametrize("in_flight", [False, True])
def test_state_codec_round_trip(in_flight: bool) -> None:
    state = known()
    add(state, 4, 60, partition=1, device="a", at=T0 + 0.25)
    add(state, 9, 60, partition=0, device="b")
    if in_flight:
        assert POLICY.result(state, T0) is not None
        add(state, 10, 7, partition=0)
    data = codec.encode_model_state(state.to_fields())
    back = ModelState.from_fields(codec.decode_model_state(data))
    assert back == state
    assert codec.encode_model_state(back.to_fields()) == data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff not json", codec.Reject.BAD_METADATA),
        (b"[1, 2]", codec.Reject.BAD_METADATA),
        (b'{"v": 2, "model_id": "m"}', codec.Reject.UNSUPPORTED_VERSION),
        (b'{"v": 1}', codec.Reject.MISSING_ID),
    ],
)
def test_state_codec_rejects_what_it_did_not_write(data: bytes, reason: codec.Reject) -> None:
    with pytest.raises(codec.CodecError) as info:
        codec.decode_model_state(data)
    assert info.value.reason is reason


def test_a_re_fired_job_keeps_its_id_ranges_count_and_base() -> None:
    state = known()
    for offset in range(12):
        add(state, offset)
    first = POLICY.result(state, T0)
    assert first is not None
    add(state, 12)  # new data while the job runs must not leak into a re-fire
    for at in (T0 + 1, T0 + 2):
        again = POLICY.refire(state, at)
        assert again is not None
        assert (again.trigger_id, again.ranges, again.sample_count, again.base_version) == (
            first.trigger_id,
            first.ranges,
            first.sample_count,
            first.base_version,
        )
    assert POLICY.refire(POLICY.initialize("x"), T0) is None
