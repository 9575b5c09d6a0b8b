"""The push-fits-model rule (``pipeline.samples.admit_push``) and its three users: the
model server (``http_api.check_push``), the agents (``Summarizer``) and the trainer and
audit (``accept_push``) refuse the same push for the same reason. No broker."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from agents.aggregator import Record
from agents.summarizer import Summarizer
from pipeline import codec
from pipeline.http_api import HttpFailure, check_push
from pipeline.records import Backbone, Cut
from pipeline.registry import ModelEntry
from pipeline.samples import (
    DEFAULT_MAX_PUSH_BYTES,
    OTHER_MODEL,
    ModelFit,
    Refusal,
    accept_push,
    admit_push,
)
from tests import factories

MAX_SAMPLES = 16
FIT = ModelFit("m", Backbone.INCEPTION_RESNET_V1, Cut.FREEZE6, 10, MAX_SAMPLES)
ENTRY = ModelEntry("m", Backbone.INCEPTION_RESNET_V1, Cut.FREEZE6, 10)
GOOD = factories.push("m", n=4)
#: The byte limit the cases are checked under: over every case but the too_large one.
LIMIT = 20_000

CASES = {
    "truncated": b"FDXS",
    "bad_magic": b"XXXX" + codec.encode_push(GOOD)[4:],
    "oversized_batch": codec.encode_push(factories.push("m", n=MAX_SAMPLES + 1)),
    "label_out_of_range": codec.encode_push(replace(GOOD, labels=np.full(4, 10, np.int32))),
    # Backbone or cut not the model's: one reason on every path (was bad_field over HTTP).
    "model_mismatch": codec.encode_push(factories.push("m", n=4, cut=Cut.FREEZE5)),
    # Another model's push sent for m (was bad_id over HTTP).
    "model_mismatch ": codec.encode_push(factories.push("other", n=4)),
    "too_large": codec.encode_push(factories.push("m", n=MAX_SAMPLES - 1, cut=Cut.FREEZE5)),
}


def http_reason(data: bytes) -> tuple[int, str]:
    with pytest.raises(HttpFailure) as failure:
        check_push(data, "m", ENTRY, max_samples=MAX_SAMPLES, max_bytes=LIMIT)
    return failure.value.status, failure.value.reason


def agents_reason(data: bytes) -> str:
    summarizer = Summarizer(
        max_push_bytes=LIMIT, max_push_samples=MAX_SAMPLES, lookup={"m": FIT}.get
    )
    out = summarizer.summarize([Record("p.features", 0, 0, b"m", data, 1.0)], 1.0)
    [letter] = out.dead_letters
    return letter.reason


@pytest.mark.parametrize("expected", list(CASES))
def test_every_path_refuses_a_bad_push_for_the_same_reason(expected: str) -> None:
    data = CASES[expected]
    reason = expected.strip()
    status, http = http_reason(data)
    assert (http, status) == (reason, 413 if reason == "too_large" else 400)
    assert agents_reason(data) == reason
    assert accept_push(b"m", data, replace(FIT, max_push_bytes=LIMIT)) == reason


def test_a_good_push_passes_every_path() -> None:
    data = codec.encode_push(GOOD)
    assert check_push(data, "m", ENTRY, max_samples=MAX_SAMPLES, max_bytes=LIMIT).n == 4
    assert not isinstance(accept_push(b"m", data, FIT), str)
    summarizer = Summarizer(max_push_bytes=LIMIT, max_push_samples=16, lookup={"m": FIT}.get)
    assert summarizer.summarize([Record("t", 0, 0, b"m", data, 1.0)], 1.0).pushes == 1


def test_the_size_limit_comes_first_and_decodes_nothing() -> None:
    refusal = admit_push(
        b"\0" * 101, key_model="m", lookup={}.get, max_push_bytes=100, max_push_samples=1
    )
    assert refusal == Refusal(
        "too_large",
        "push is 101 bytes, the limit is 100; send its samples in several smaller pushes",
    )
    assert FIT.max_push_bytes == DEFAULT_MAX_PUSH_BYTES  # the trainer's default = the server's


def test_key_agreement_is_checked_before_the_model_and_names_both() -> None:
    # The case: key "other" (10 classes), payload "faces" (100 classes).
    fits = {
        "other": ModelFit("other", Backbone.INCEPTION_RESNET_V1, Cut.FREEZE6, 10),
        "faces": ModelFit("faces", Backbone.INCEPTION_RESNET_V1, Cut.FREEZE6, 100),
    }
    data = codec.encode_push(factories.push("faces", n=50, num_classes=100))
    refusal = admit_push(
        data, key_model="other", lookup=fits.get, max_push_bytes=None, max_push_samples=64
    )
    assert isinstance(refusal, Refusal)
    assert (refusal.reason, refusal.model_id) == ("model_mismatch", "faces")
    assert "'faces'" in refusal.message and "'other'" in refusal.message
    unkeyed = admit_push(
        data, key_model=None, lookup=fits.get, max_push_bytes=None, max_push_samples=64
    )
    assert isinstance(unkeyed, Refusal) and "with no key" in unkeyed.message


def test_accept_push_tells_another_models_records_from_refusals() -> None:
    other = codec.encode_push(factories.push("other", n=2))
    mine = codec.encode_push(GOOD)
    assert accept_push(b"other", other, FIT) == OTHER_MODEL
    assert accept_push(None, other, FIT) == OTHER_MODEL  # unkeyed: known by its model id
    # Unkeyed but of this model: the agents dead-letter it, so the trainer refuses it too.
    assert accept_push(None, mine, FIT) == "model_mismatch"
    assert accept_push(b"m", None, FIT) == "tombstone"
    assert accept_push(b"m", other, FIT) == "model_mismatch"
