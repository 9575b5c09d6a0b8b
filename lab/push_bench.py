"""``fedex bench push``: the paper's Table 2 from the device's side — what a push and a pull
cost per freeze level, on loopback and on simulated mobile networks.

For every freeze level a real 10-sample float16 :class:`~pipeline.records.FeaturePush` is
encoded with the wire codec, and its latency is measured on this machine two ways:

* **Kafka**: ``send_and_wait`` of the encoded push with ``acks=all`` to a real broker (the
  path of a device that speaks Kafka);
* **HTTP**: ``POST /v1/models/{id}/pushes`` to a real :class:`~pipeline.server.ModelServer`
  started in this process on a free port (token check, decode and validation, then the
  server's own acks=all produce to the feature log), the path of a phone.

The **pull** is a real ``GET`` of each level's checkpoint (the head the trainer ships: the
zoo's thawed layers for 8,631 identities, safetensors fp16) from the same server,
sha256-verified.

The latency on a **network tier** is a model, not a measurement: the measured loopback
latency (server and broker work) plus :func:`device_sim.network.transfer_seconds` of the
bytes on that tier (one round trip, TCP slow start, the tier's bandwidth or its
loss-limited rate). The FedAvg push row prices the encoded thawed-layer gradient record
the same way once the codec has one; until then it is reported as pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from device_sim.network import TIERS, NetworkTier
from lab.bench_broker import single_partition_topics
from lab.benchio import write_result
from lab.transport_bench import synthetic_push
from pipeline import codec
from pipeline.records import (
    FEATURE_SHAPES,
    Backbone,
    Cut,
    FeatureDType,
    FeaturePush,
    ModelUpdate,
    RoundUpdate,
    UpdateKind,
)
from pipeline.tables import print_table

LEVELS: Final = (Cut.FREEZE1, Cut.FREEZE2, Cut.FREEZE3, Cut.FREEZE4, Cut.FREEZE5, Cut.FREEZE6)
#: Checkpoints pulled: each level's head, and the whole model (what a FedAvg device pulls,
#: and the paper's "pull of the model").
PULL_LEVELS: Final = (Cut.FULL, *LEVELS)
#: FedAvg pushes priced: the freeze6 head our baseline trains (its default fp32, and
#: fp16 like a FedEx push) and the whole model (classic FedAvg, the paper's row).
FEDAVG_PUSHES: Final = (
    (Cut.FREEZE6, FeatureDType.FLOAT32),
    (Cut.FREEZE6, FeatureDType.FLOAT16),
    (Cut.FULL, FeatureDType.FLOAT32),
)
SAMPLES: Final = 10
#: Classifier width of the checkpoints pulled (VGGFace2, the paper's).
NUM_CLASSES: Final = 8631
#: Mobile tiers priced in the table (loopback is what is measured).
MOBILE_TIERS: Final = ("wifi", "lte", "3g", "2g")

#: The paper's Table 2 (FedEx, HotMobile'20), seconds on a phone. Only the numbers
#: DESIGN.md quotes: push of 10 features at freeze6 and freeze1, the FedAvg push and the
#: model pull; the other levels are left blank rather than guessed.
PAPER_PUSH_S: Final[dict[Cut, float]] = {Cut.FREEZE6: 1.5, Cut.FREEZE1: 427.0}
PAPER_FEDAVG_PUSH_S: Final = 36.0
PAPER_PULL_S: Final = 26.0

TIER_MODEL: Final = (
    "push/pull latency on a tier = measured loopback HTTP latency (p50, this machine: "
    "server + broker) + "
    "simulated transfer of the bytes on the tier (device_sim.network.transfer_seconds: one "
    "round trip, TCP slow start from 10 segments, then the tier's bandwidth or the "
    "Mathis loss-limited rate; warm connection); FedAvg push on a tier = the simulated "
    "transfer of its encoded record only"
)


# ------------------------------------------------------------------------ pure pieces


def bench_push(
    cut: Cut, *, n: int = SAMPLES, num_classes: int = NUM_CLASSES, seed: int = 0
) -> FeaturePush:
    """The push a device at ``cut`` sends: ``n`` random float16 features of the level's
    shape, for the bench model of that level (labels below ``num_classes``)."""
    push = synthetic_push(n, cut=cut, dtype=FeatureDType.FLOAT16, seed=seed)
    return dataclasses.replace(
        push, model_id=model_id_for(cut), labels=push.labels % np.int32(num_classes)
    )


def model_id_for(cut: Cut) -> str:
    return f"bench-push-{cut.value}"


def expected_push_bytes(
    cut: Cut,
    *,
    n: int = SAMPLES,
    backbone: Backbone = Backbone.INCEPTION_RESNET_V1,
    dtype: FeatureDType = FeatureDType.FLOAT16,
    meta_bytes: int,
) -> int:
    """Wire size of a push from the layout alone: header, metadata padded to 8, body."""
    body = codec.push_layout(n, FEATURE_SHAPES[backbone][cut], dtype)[-1]
    head = codec.HEADER_SIZE + meta_bytes
    return (head + codec.ALIGN - 1) // codec.ALIGN * codec.ALIGN + body


def summarize(seconds: Sequence[float]) -> dict[str, float | int]:
    """p50 / p90 / min / max / mean of timed repeats (nearest-rank percentiles)."""
    if not seconds:
        raise ValueError("no timings to summarize")
    ordered = sorted(seconds)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "p50": pick(0.5),
        "p90": pick(0.9),
        "min": ordered[0],
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
        "n": len(ordered),
    }


def tier_table(
    loopback_s: float,
    nbytes: int,
    tiers: Mapping[str, NetworkTier],
    *,
    upload: bool,
) -> dict[str, float]:
    """Modelled latency per tier: the measured loopback latency plus the simulated transfer
    of ``nbytes`` up (a push) or down (a pull)."""
    return {
        name: loopback_s
        + (tier.upload_seconds(nbytes) if upload else tier.download_seconds(nbytes))
        for name, tier in tiers.items()
    }


def mobile_tiers(names: Sequence[str] = MOBILE_TIERS) -> dict[str, NetworkTier]:
    return {name: TIERS[name] for name in names}


def tier_json(tiers: Mapping[str, NetworkTier]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(t) for t in tiers.values()]


def gradient_record_bytes(
    state: Mapping[str, Any], dtype: FeatureDType = FeatureDType.FLOAT32
) -> int:
    """Wire size of one FedAvg device push of a head: a gradient
    :class:`~pipeline.records.RoundUpdate` of its floating tensors (the entries FedAvg
    exchanges), encoded by the codec. Sizes, not values, matter: zeros of each shape."""
    tensors = {
        name: np.zeros(tuple(np.shape(value)), dtype=dtype.numpy)
        for name, value in state.items()
        if np.issubdtype(_dtype_of(value), np.floating)
    }
    update = RoundUpdate(
        model_id="bench-fedavg",
        run_id="bench",
        round=1,
        device_id="dev-000000",
        sample_count=SAMPLES,
        kind=UpdateKind.GRADIENT,
        dtype=dtype,
        tensors=tensors,
        loss=0.0,
    )
    return len(codec.encode_round_update(update))


def _dtype_of(value: Any) -> np.dtype[Any]:
    """numpy dtype of an array or a torch tensor (without importing torch)."""
    if hasattr(value, "numpy") and hasattr(value, "detach"):
        return np.dtype(str(value.dtype).removeprefix("torch."))
    return np.asarray(value).dtype


# ------------------------------------------------------------------------ measurement


async def time_calls(
    call: Callable[[], Awaitable[object]], *, repeats: int, warmup: int = 2
) -> list[float]:
    """Wall seconds of ``repeats`` sequential awaits of ``call`` after ``warmup`` untimed."""
    for _ in range(warmup):
        await call()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        await call()
        timings.append(time.perf_counter() - started)
    return timings


async def time_pairs(
    a: Callable[[], Awaitable[object]],
    b: Callable[[], Awaitable[object]],
    *,
    repeats: int,
    warmup: int = 2,
) -> tuple[list[float], list[float]]:
    """Wall seconds of ``a`` and ``b`` timed in alternation (ABAB…), ``repeats`` each,
    after ``warmup`` untimed calls of each: a busy moment of the machine hits both."""
    for _ in range(warmup):
        await a()
        await b()
    times_a: list[float] = []
    times_b: list[float] = []
    for _ in range(repeats):
        for call, times in ((a, times_a), (b, times_b)):
            started = time.perf_counter()
            await call()
            times.append(time.perf_counter() - started)
    return times_a, times_b


def _head_blobs(levels: Sequence[Cut], num_classes: int) -> dict[Cut, dict[str, Any]]:
    """Each level's head state dict (the zoo's InceptionResnetV1, random init)."""
    from pipeline.zoo import build_backbone, head_state_dict, split

    model = build_backbone(Backbone.INCEPTION_RESNET_V1, num_classes=num_classes, seed=0)
    return {
        cut: head_state_dict(split(model, Backbone.INCEPTION_RESNET_V1, cut).head) for cut in levels
    }


async def _publish_models(
    settings: Any, levels: Sequence[Cut], num_classes: int, log: Callable[[str], None]
) -> tuple[dict[Cut, Any], list[dict[str, Any]]]:
    """One bench model per level, its base version published by the product's own path
    (head → fp16 safetensors → checkpoint store → model topic, inline or by reference);
    and the wire size of a FedAvg gradient push of the heads in :data:`FEDAVG_PUSHES`."""
    from pipeline.checkpoints import LocalCheckpointStore
    from pipeline.publishing import (
        PublishTarget,
        VersionSpec,
        build_base_update,
        make_update_producer,
        publish_update,
    )
    from pipeline.topics import Topics

    target = PublishTarget(
        LocalCheckpointStore(settings.checkpoint_dir),
        "http://127.0.0.1:0",
        settings.max_message_bytes,
        settings.checkpoint_dtype,
    )
    log(f"building the heads of {len(levels)} levels ({num_classes} classes)")
    states = await asyncio.to_thread(_head_blobs, levels, num_classes)
    fedavg = []
    for cut, dtype in FEDAVG_PUSHES:
        if cut in states:
            nbytes = await asyncio.to_thread(gradient_record_bytes, states[cut], dtype)
            fedavg.append({"level": cut.value, "dtype": dtype.value, "bytes": nbytes})
    updates = {}
    for cut, state in states.items():
        build = functools.partial(
            build_base_update,
            target,
            VersionSpec.in_chain(
                model_id_for(cut), 0, Backbone.INCEPTION_RESNET_V1, cut, num_classes
            ),
            head_state=state,
        )
        updates[cut] = await asyncio.to_thread(build)
    producer = make_update_producer(settings, client_id="fedex-bench-push")
    await producer.start()
    try:
        for update in updates.values():
            await publish_update(producer, Topics(settings.topic_prefix).models, update)
    finally:
        await producer.stop()
    return updates, fedavg


async def _time_pushes(
    kafka: Any,
    http: Any,
    server_url: str,
    token: str,
    features_topic: str,
    cut: Cut,
    *,
    repeats: int,
    num_classes: int,
) -> dict[str, Any]:
    """One level's push over Kafka (acks=all) and over HTTP, interleaved."""
    from pipeline.download import push_over_http

    push = bench_push(cut, num_classes=num_classes)
    data = codec.encode_push(push)
    key = codec.encode_key(push.model_id)
    kafka_s, http_s = await time_pairs(
        functools.partial(kafka.send_and_wait, features_topic, data, key=key),
        functools.partial(push_over_http, http, server_url, token, data, model_id=push.model_id),
        repeats=repeats,
    )
    return {
        "level": cut.value,
        "feature_shape": list(push.feature_shape),
        "push_bytes": len(data),
        "kafka_s": summarize(kafka_s),
        "http_s": summarize(http_s),
    }


async def _time_pull(
    http: Any, server_url: str, token: str, update: ModelUpdate, *, repeats: int
) -> dict[str, Any]:
    from pipeline.download import fetch_checkpoint

    pull_s = await time_calls(
        functools.partial(
            fetch_checkpoint,
            http,
            server_url,
            token,
            update.model_id,
            update.version,
            expected_sha256=update.sha256,
        ),
        repeats=repeats,
        warmup=1,
    )
    return {
        "level": update.cut.value,
        "checkpoint_bytes": update.size,
        "encoding": update.encoding,
        "http_s": summarize(pull_s),
    }


@dataclasses.dataclass(frozen=True, slots=True)
class PushBenchConfig:
    """What the push bench times: the levels pushed (``repeats`` timed pushes each, both
    paths) and pulled (``pull_repeats`` timed pulls each), and the models' class count."""

    levels: Sequence[Cut] = LEVELS
    pull_levels: Sequence[Cut] = PULL_LEVELS
    repeats: int = 10
    pull_repeats: int = 5
    num_classes: int = NUM_CLASSES


async def measure(
    bootstrap: str,
    config: PushBenchConfig,
    *,
    home: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Publishes one bench model per level, starts a ModelServer on a free port, and times
    Kafka produce and HTTP push per push level (interleaved) and HTTP pull per pull level."""
    import aiohttp

    from pipeline import auth, clients
    from pipeline.server import ModelServer
    from pipeline.topics import Topics

    prefix = f"bench-push-{uuid.uuid4().hex[:8]}"
    settings = await single_partition_topics(bootstrap, prefix, home)
    features_topic = Topics(settings.topic_prefix).features
    result: dict[str, Any] = {"levels": [], "pull": []}
    try:
        wanted = list(dict.fromkeys([*config.pull_levels, *config.levels]))
        updates, result["fedavg"] = await _publish_models(settings, wanted, config.num_classes, log)
        secret = uuid.uuid4().hex
        token = auth.issue_token(secret, "dev-000000", auth.ANY_MODEL, 3600, time.time())
        server = ModelServer.from_settings(settings, secret=secret, host="127.0.0.1", port=0)
        kafka = clients.make_producer(
            bootstrap=bootstrap, client_id="fedex-bench-push-kafka", acks="all", linger_ms=0
        )
        await kafka.start()
        try:
            async with server, aiohttp.ClientSession() as http:
                await server.wait_ready(60)
                for update in updates.values():
                    await server.wait_for_version(update.model_id, update.version, 60)
                for cut in config.levels:
                    row = await _time_pushes(
                        kafka,
                        http,
                        server.url,
                        token,
                        features_topic,
                        cut,
                        repeats=config.repeats,
                        num_classes=config.num_classes,
                    )
                    result["levels"].append(row)
                    log(
                        f"{cut}: push {row['push_bytes']:,} B, kafka p50 "
                        f"{row['kafka_s']['p50']:.4f} s, http p50 {row['http_s']['p50']:.4f} s"
                    )
                for cut in config.pull_levels:
                    row = await _time_pull(
                        http, server.url, token, updates[cut], repeats=config.pull_repeats
                    )
                    result["pull"].append(row)
                    size, p50 = row["checkpoint_bytes"], row["http_s"]["p50"]
                    log(f"{cut}: pull {size:,} B, p50 {p50:.4f} s")
        finally:
            await kafka.stop()
    finally:
        await _delete_topics(bootstrap, settings.topic_prefix)
    return result


async def _delete_topics(bootstrap: str, prefix: str) -> None:
    from pipeline import clients

    admin = clients.make_admin(bootstrap=bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix + ".")]
        if names:
            with contextlib.suppress(Exception):
                await admin.delete_topics(names)
    finally:
        await admin.close()


def price(measured: Mapping[str, Any], tiers: Mapping[str, NetworkTier]) -> dict[str, Any]:
    """Adds the modelled tier latencies (on the HTTP p50) and the paper's column."""
    levels = []
    for row in measured["levels"]:
        loopback = float(row["http_s"]["p50"])
        paper = PAPER_PUSH_S.get(Cut(row["level"]))
        levels.append(
            {
                **row,
                "tiers_s": tier_table(loopback, int(row["push_bytes"]), tiers, upload=True),
                "paper_s": paper,
            }
        )
    pulls = [
        {
            **row,
            "tiers_s": tier_table(
                float(row["http_s"]["p50"]), int(row["checkpoint_bytes"]), tiers, upload=False
            ),
            "paper_s": PAPER_PULL_S if row["level"] == Cut.FULL.value else None,
        }
        for row in measured["pull"]
    ]
    fedavg = [
        {
            **row,
            "tiers_s": tier_table(0.0, int(row["bytes"]), tiers, upload=True),
            "paper_s": PAPER_FEDAVG_PUSH_S if row["level"] == Cut.FULL.value else None,
        }
        for row in measured.get("fedavg", [])
    ]
    return {"levels": levels, "pull": pulls, "fedavg_push": fedavg}


def run_push_bench(
    *, bootstrap: str, config: PushBenchConfig = PushBenchConfig(), out: Path | None = None
) -> dict[str, Any]:
    """``fedex bench push``: measure, price on the tiers, print the table, write JSON."""
    tiers = mobile_tiers()
    # One access-log line per timed request would be most of the output (and some of the
    # time); failures still log at WARNING and above.
    logging.getLogger("pipeline.server.access").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fedex-bench-push-") as home:
        measured = asyncio.run(measure(bootstrap, config, home=Path(home)))
    priced = price(measured, tiers)
    result = {
        "config": {
            "samples_per_push": SAMPLES,
            "dtype": "float16",
            "backbone": Backbone.INCEPTION_RESNET_V1.value,
            "num_classes": config.num_classes,
            "repeats": config.repeats,
            "pull_repeats": config.pull_repeats,
            "bootstrap": bootstrap,
            "kafka": "send_and_wait, acks=all, linger 0, one push at a time",
            "http": "POST to an in-process ModelServer (aiohttp, 127.0.0.1), acks=all behind it",
        },
        "model": TIER_MODEL,
        "tiers": tier_json(tiers),
        "paper": {
            "push_s": {c.value: s for c, s in PAPER_PUSH_S.items()},
            "fedavg_push_s": PAPER_FEDAVG_PUSH_S,
            "pull_s": PAPER_PULL_S,
        },
        **priced,
    }
    path = write_result("push", result, out)
    print_push_tables(priced, list(tiers))
    print(f"wrote {path}")
    return result


def print_push_tables(priced: dict[str, Any], names: list[str]) -> None:
    for title, key, lead in (
        (
            f"push of {SAMPLES} float16 features per freeze level: loopback measured, "
            "tiers modelled (s)",
            "levels",
            {"level": "level", "bytes": "push_bytes", "kafka p50": "kafka_s", "http p50": "http_s"},
        ),
        (
            "pull of the level's checkpoint (fp16 safetensors) from the model server (s)",
            "pull",
            {"level": "level", "bytes": "checkpoint_bytes", "http p50": "http_s"},
        ),
        (
            "FedAvg push: one device's gradient record of the thawed layers (transfer only, s)",
            "fedavg_push",
            {"level": "level", "dtype": "dtype", "bytes": "bytes"},
        ),
    ):
        print_table(
            title,
            [*lead, *names, "paper"],
            [
                [
                    *(r[f]["p50"] if f.endswith("_s") else r[f] for f in lead.values()),
                    *(r["tiers_s"][n] for n in names),
                    r["paper_s"] if r["paper_s"] is not None else "—",
                ]
                for r in priced[key]
            ],
        )
