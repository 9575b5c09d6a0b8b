"""``fedex bench codec`` and ``fedex bench kafka``: the cost of moving pushes.

The codec bench times encode/decode of 10-sample pushes on one core. The Kafka bench
times raw aiokafka produce→consume of the same pushes on the broker at hand: the ceiling
the aggregation pipeline is later compared with (``fedex bench pipeline``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lab.benchio import best_rate, write_result
from lab.feature_pushes import feature_push
from lab.measure import Warmup
from pipeline import codec
from pipeline.records import FEATURE_SHAPES, Backbone, Cut, FeatureDType, FeaturePush
from pipeline.tables import print_table

CODEC_CUTS = (Cut.FREEZE6, Cut.FREEZE5, Cut.FREEZE4)
#: Targets from the foundation issue, on the 2-core reference machine.
DECODE_TARGET_SAMPLES_S = 200_000
KAFKA_TARGET_SAMPLES_S = 50_000


def synthetic_push(
    n: int = 10,
    *,
    cut: Cut = Cut.FREEZE6,
    dtype: FeatureDType = FeatureDType.FLOAT16,
    device: int = 0,
    first_id: int = 0,
    seed: int = 0,
) -> FeaturePush:
    """A valid push of random features at ``cut`` of the product's backbone, for
    benchmarks: ``n`` samples of device ``device`` with ids from ``first_id``."""
    backbone = Backbone.INCEPTION_RESNET_V1
    rng = np.random.default_rng(seed)
    shape = FEATURE_SHAPES[backbone][cut]
    labels = rng.integers(0, 1000, n, dtype=np.int32)
    return feature_push(
        "bench",
        f"dev-{device:06d}",
        backbone=backbone,
        cut=cut,
        dtype=dtype,
        sample_ids=np.arange(first_id, first_id + n),
        labels=labels,
        features=rng.standard_normal((n, *shape), dtype=np.float32),
        timestamp_ms=int(time.time() * 1000),
    )


@contextlib.contextmanager
def one_core() -> Iterator[int | None]:
    """Pins this process to one CPU while timing, so "per core" means one core."""
    if not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    core = min(before)
    os.sched_setaffinity(0, {core})
    try:
        yield core
    finally:
        os.sched_setaffinity(0, before)


def _time_loop(fn: Any, arg: Any, min_seconds: float) -> tuple[int, float]:
    count, start = 0, time.perf_counter()
    while True:
        for _ in range(200):
            fn(arg)
        count += 200
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return count, elapsed


def run_codec_bench(
    *, samples: int = 10, repeats: int = 5, seconds: float = 0.4, out: Path | None = None
) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with one_core() as core:
        for cut in CODEC_CUTS:
            push = synthetic_push(samples, cut=cut)
            data = codec.encode_push(push)
            codec.decode_push(data)  # warm-up
            enc = [_time_loop(codec.encode_push, push, seconds) for _ in range(repeats)]
            dec = [_time_loop(codec.decode_push, data, seconds) for _ in range(repeats)]
            enc_best, enc_median = best_rate(enc)
            dec_best, dec_median = best_rate(dec)
            rows.append(
                {
                    "cut": cut.value,
                    "dtype": push.dtype.value,
                    "samples_per_push": samples,
                    "push_bytes": len(data),
                    "encode_samples_s": enc_best * samples,
                    "encode_samples_s_median": enc_median * samples,
                    "encode_mb_s": enc_best * len(data) / 1e6,
                    "decode_samples_s": dec_best * samples,
                    "decode_samples_s_median": dec_median * samples,
                    "decode_mb_s": dec_best * len(data) / 1e6,
                }
            )
    freeze6 = rows[0]
    result = {
        "pinned_core": core,
        "repeats": repeats,
        "rows": rows,
        "target": {"decode_samples_s": DECODE_TARGET_SAMPLES_S},
        "meets_target": freeze6["decode_samples_s"] >= DECODE_TARGET_SAMPLES_S,
    }
    path = write_result("codec", result, out)
    print_table(
        f"codec: {samples}-sample pushes, one core (best of {repeats}; target decode ≥ "
        f"{DECODE_TARGET_SAMPLES_S:,} samples/s at freeze6)",
        ["cut", "bytes", "encode samples/s", "encode MB/s", "decode samples/s", "decode MB/s"],
        [
            [
                r["cut"],
                r["push_bytes"],
                r["encode_samples_s"],
                r["encode_mb_s"],
                r["decode_samples_s"],
                r["decode_mb_s"],
            ]
            for r in rows
        ],
    )
    print(f"wrote {path}")
    return result


@dataclass(frozen=True, slots=True)
class KafkaRun:
    messages: int
    samples: int
    bytes: int
    seconds: float
    produce_seconds: float

    @property
    def samples_s(self) -> float:
        return self.samples / self.seconds

    @property
    def mb_s(self) -> float:
        return self.bytes / self.seconds / 1e6


def bench_records(
    messages: int, *, keys: int = 50, samples: int = 10, model_prefix: str = "bench"
) -> list[tuple[bytes, bytes]]:
    """``messages`` (key, value) records of encoded pushes round-robin over ``keys`` models,
    each push's ``model_id`` matching its key: the records the pipeline bench sends through
    the agents, so raw Kafka and the agents carry the same bytes and key distribution."""
    base = [synthetic_push(samples, device=i, first_id=i * samples, seed=i) for i in range(8)]
    models = [f"{model_prefix}-{k:03d}" for k in range(keys)]
    encoded = {m: [codec.encode_push(replace(p, model_id=m)) for p in base] for m in models}
    return [
        (codec.encode_key(models[i % keys]), encoded[models[i % keys]][(i // keys) % 8])
        for i in range(messages)
    ]


async def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from aiokafka.admin import NewTopic

    from pipeline import clients

    admin = clients.make_admin(bootstrap=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def _delete_topic(bootstrap: str, topic: str) -> None:
    from pipeline import clients

    admin = clients.make_admin(bootstrap=bootstrap)
    await admin.start()
    with contextlib.suppress(Exception):
        await admin.delete_topics([topic])
    await admin.close()


async def measure_kafka_round_trip(
    bootstrap: str,
    topic: str,
    records: Sequence[tuple[bytes, bytes]],
    *,
    samples_per_record: int = 10,
    partitions: int = 6,
    max_records: int = 1000,
    poll_ms: int = 100,
    timeout: float = 120.0,
) -> KafkaRun:
    """Produces ``records`` to a fresh topic of ``partitions`` while a consumer reads them
    back (``getmany`` with ``max_records`` and ``poll_ms``: the agents' ingest fetch);
    the clock runs from the first send to the last record received. Deletes the topic."""
    from pipeline import clients

    await _create_topic(bootstrap, topic, partitions)
    consumer = clients.make_consumer(
        bootstrap=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    consumer.subscribe([topic])
    await consumer.start()
    producer = clients.make_producer(bootstrap=bootstrap, linger_ms=5, max_batch_size=1024 * 1024)
    await producer.start()
    try:
        # A new topic's leaders take a moment to appear; sending earlier only logs retries.
        deadline = time.monotonic() + 30
        while len(await producer.partitions_for(topic)) < partitions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic} has no leaders after 30 s")
            await asyncio.sleep(0.05)
        # Partitions must be assigned before the clock starts.
        deadline = time.monotonic() + 30
        while not consumer.assignment() and time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=100)

        received = 0
        total = len(records)

        async def consume() -> None:
            nonlocal received
            while received < total:
                batches = await consumer.getmany(timeout_ms=poll_ms, max_records=max_records)
                received += sum(len(rs) for rs in batches.values())

        start = time.perf_counter()
        reader = asyncio.create_task(consume())
        pending = []
        for key, value in records:
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 2000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        produced = time.perf_counter() - start
        await asyncio.wait_for(reader, timeout)
        elapsed = time.perf_counter() - start
    finally:
        await producer.stop()
        await consumer.stop()
        await _delete_topic(bootstrap, topic)
    size = sum(len(v) for _, v in records)
    return KafkaRun(total, total * samples_per_record, size, elapsed, produced)


async def _kafka_bench(
    bootstrap: str, messages: int, repeats: int, warmup: Warmup
) -> list[KafkaRun]:
    records = bench_records(messages)
    with warmup.phase("one untimed produce→consume run (broker JIT, client connections)") as w:
        first = await measure_kafka_round_trip(
            bootstrap, f"bench.kafka.warmup.{uuid.uuid4().hex[:8]}", records
        )
        w["samples_s"] = first.samples_s
    runs = []
    for _ in range(repeats):
        topic = f"bench.kafka.{uuid.uuid4().hex[:8]}"
        runs.append(await measure_kafka_round_trip(bootstrap, topic, records))
    return runs


def run_kafka_bench(
    *, bootstrap: str, messages: int = 20_000, repeats: int = 5, out: Path | None = None
) -> dict[str, Any]:
    """One untimed warm-up run, then ``repeats`` timed runs: median, best and spread."""
    warmup = Warmup()
    runs = asyncio.run(_kafka_bench(bootstrap, messages, repeats, warmup))
    rates = [r.samples_s for r in runs]
    best = max(runs, key=lambda r: r.samples_s)
    median = statistics.median(rates)
    result = {
        "bootstrap": bootstrap,
        "push": {"cut": "freeze6", "dtype": "float16", "samples": 10},
        "records": {"messages": messages, "keys": 50, "partitions": 6},
        "warmup": warmup.as_list(),
        "runs": [
            {
                "messages": r.messages,
                "samples": r.samples,
                "bytes": r.bytes,
                "seconds": r.seconds,
                "produce_seconds": r.produce_seconds,
                "samples_s": r.samples_s,
                "mb_s": r.mb_s,
            }
            for r in runs
        ],
        "repeats": len(runs),
        "samples_s_median": median,
        "samples_s_min": min(rates),
        "samples_s_best": best.samples_s,
        "mb_s_median": statistics.median(r.mb_s for r in runs),
        "target": {"samples_s": KAFKA_TARGET_SAMPLES_S},
        "meets_target": median >= KAFKA_TARGET_SAMPLES_S,
    }
    path = write_result("kafka", result, out)
    print_table(
        f"kafka: raw aiokafka produce→consume of freeze6 10-sample pushes on {bootstrap}, "
        f"50 keys over 6 partitions, after one warm-up run (median {median:,.0f} samples/s; "
        f"target ≥ {KAFKA_TARGET_SAMPLES_S:,})",
        ["run", "messages", "seconds", "samples/s", "pushes/s", "MB/s"],
        [
            [i + 1, r.messages, r.seconds, r.samples_s, r.messages / r.seconds, r.mb_s]
            for i, r in enumerate(runs)
        ],
    )
    print(f"wrote {path}")
    return result
