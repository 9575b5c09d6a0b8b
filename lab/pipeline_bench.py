"""Throughput and trigger latency of the aggregation agents on a real broker.

:func:`measure_agent_throughput` runs one in-process agents worker (RocksDB store, the
deployment's defaults otherwise), publishes base models, then produces freeze6 float16
10-sample pushes as fast as the producer goes and measures

- samples/s from the first send until the worker has counted every sample (counted means
  the ingest stage validated and summarized the push, and the Faust agent's outputs and
  state are durable), next to raw aiokafka produce→consume of the same pushes
  (``measure_kafka_round_trip``), run once before and once after the agents so that a
  machine whose load drifts does not favour either side (the ratio uses their mean);
- trigger latency: from the log time of the push that brought a model to ``min_samples``
  (the end of the trigger's range) until a consumer sees the trigger on the topic, in three
  regimes: under the flood (includes the backlog behind the producer), at a sustained load
  of ``sustain_fraction`` of the capacity just measured (probe models cross the threshold
  at evenly spaced moments of a paced stream), and on an idle worker.

Producer, worker (ingest stage and Faust app) and consumers share one process and one event
loop, as in the raw Kafka bench, so the ratio compares like with like; in a deployment the
producers are devices elsewhere and the worker has its process to itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from agents.worker import AgentWorker
from lab.transport_bench import measure_kafka_round_trip, synthetic_push
from pipeline import clients, codec
from pipeline.records import Backbone, Cut, ModelMetrics, ModelUpdate, TrainingTrigger
from pipeline.settings import Settings
from pipeline.topics import Topics

SAMPLES_PER_PUSH = 10
NUM_CLASSES = 1000


def _base_update(model_id: str) -> ModelUpdate:
    return ModelUpdate(
        model_id=model_id,
        version="v0",
        parent_version=None,
        trigger_id=None,
        backbone=Backbone.INCEPTION_RESNET_V1,
        cut=Cut.FREEZE6,
        num_classes=NUM_CLASSES,
        checkpoint_uri=f"bench://{model_id}/v0",
        sha256="0" * 64,
        size=0,
        encoding="safetensors",
        metrics=ModelMetrics(0.0, None, 0, 0, 0.0, 0),
        is_best=True,
    )


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    return {
        "count": len(values),
        "p50": float(np.percentile(values, 50)),
        "p99": float(np.percentile(values, 99)),
        "max": max(values),
    }


async def _until(predicate: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: timed out waiting for {what}")
        await asyncio.sleep(0.005)


def _counted(worker: AgentWorker, model_id: str, samples: int) -> bool:
    state = worker.state(model_id)
    return state is not None and state.counted_samples >= samples


def _seen(seen: list[tuple[TrainingTrigger, float]], model_id: str) -> bool:
    return any(t.model_id == model_id for t, _ in seen)


async def _delete_topics(bootstrap: str, prefix: str) -> None:
    admin = clients.make_admin(bootstrap=bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            with contextlib.suppress(Exception):
                await admin.delete_topics(names)
    finally:
        await admin.close()


async def _sustained_latency(
    worker: AgentWorker,
    producer: Any,
    topic: str,
    encoded: dict[str, list[bytes]],
    seen: list[tuple[TrainingTrigger, float]],
    *,
    background: list[str],
    probes: list[str],
    short: int,
    rate: float,
    seconds: float,
) -> dict[str, Any]:
    """Trigger latency under a steady load below saturation.

    The probe models are first filled to one push short of ``min_samples``; then pushes
    go out at ``rate`` per second for ``seconds`` (the background models, whose jobs are
    in flight, only get counted), and the push that crosses each probe's threshold is
    slotted in at evenly spaced moments of that stream.
    """
    fill = [
        await producer.send(topic, encoded[m][i % 8], key=codec.encode_key(m))
        for m in probes
        for i in range(short)
    ]
    await asyncio.gather(*fill)
    for m in probes:
        await _until(
            functools.partial(_counted, worker, m, short * SAMPLES_PER_PUSH),
            "the probe models' pushes counted",
            60,
        )
    count = max(len(probes), int(rate * seconds))
    slots = {int((j + 0.5) * count / len(probes)): m for j, m in enumerate(probes)}
    crossing: dict[str, Any] = {}
    others = []
    start = time.perf_counter()
    sent = 0
    while sent < count:
        due = min(count, int((time.perf_counter() - start) * rate) + 1)
        while sent < due:
            probe = slots.get(sent)
            m = probe or background[sent % len(background)]
            fut = await producer.send(topic, encoded[m][sent % 8], key=codec.encode_key(m))
            if probe is not None:
                crossing[probe] = fut
            else:
                others.append(fut)
            sent += 1
        await asyncio.sleep(0.002)
    send_s = time.perf_counter() - start
    await asyncio.gather(*others)
    for m in probes:
        await _until(functools.partial(_seen, seen, m), "the probe triggers", 60)
    latencies = []
    for m, fut in crossing.items():
        md = await fut
        seen_at = next(at for t, at in seen if t.model_id == m)
        latencies.append(seen_at - md.timestamp / 1000)
    return {
        "target_pushes_s": rate,
        "pushes_s": count / send_s,
        "samples_s": count * SAMPLES_PER_PUSH / send_s,
        "pushes": count,
        "trigger_latency_s": _summary(latencies),
    }


async def ameasure_agent_throughput(
    bootstrap: str,
    prefix: str,
    messages: int,
    *,
    models: int = 50,
    idle_models: int = 20,
    probe_models: int = 20,
    sustain_fraction: float = 0.5,
    sustain_s: float = 5.0,
    compare_raw: bool = True,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """The async body of :func:`measure_agent_throughput`."""
    pushes_per_model = max(2, messages // models)
    # Each model crosses min_samples once, halfway through its pushes: one latency sample
    # per model, and the second half exercises coalescing behind the job in flight.
    min_samples = max(1, pushes_per_model // 2) * SAMPLES_PER_PUSH
    model_ids = [f"bench-{i:03d}" for i in range(models)]
    idle_ids = [f"idle-{i:03d}" for i in range(idle_models)]
    probe_ids = [f"probe-{i:03d}" for i in range(probe_models)]
    known_ids = model_ids + idle_ids + probe_ids
    payloads = []
    for i in range(64):
        p = synthetic_push(SAMPLES_PER_PUSH, device=i, first_id=i * SAMPLES_PER_PUSH, seed=i)
        payloads.append(p)
    raw_runs: list[float] = []

    async def measure_raw() -> None:
        raw = await measure_kafka_round_trip(
            bootstrap, f"{prefix}.rawbench.{uuid.uuid4().hex[:6]}", messages=total
        )
        raw_runs.append(raw.samples_s)

    total = pushes_per_model * models
    if compare_raw:
        await measure_raw()
    with tempfile.TemporaryDirectory(prefix="fedex-agent-bench-") as home:
        settings = Settings(
            kafka_bootstrap=bootstrap,
            topic_prefix=prefix,
            home=Path(home),
            min_samples=min_samples,
            age_floor_samples=min_samples,
            max_age_s=3600.0,
            job_timeout_s=3600.0,
        )
        topics = Topics(prefix)
        encoded = {
            m: [codec.encode_push(replace(p, model_id=m)) for p in payloads[:8]] for m in known_ids
        }
        worker = AgentWorker(settings)
        producer = clients.make_producer(bootstrap=bootstrap, linger_ms=5)
        tail = clients.make_consumer(bootstrap=bootstrap, group_id=None)
        seen: list[tuple[TrainingTrigger, float]] = []
        try:
            await worker.start()
            await producer.start()
            await worker.wait_ready()
            for m in known_ids:
                await producer.send(
                    topics.models, codec.encode_update(_base_update(m)), key=codec.encode_key(m)
                )
            await producer.flush()
            deadline = time.monotonic() + 60
            while not all((s := worker.state(m)) is not None and s.known for m in known_ids):
                if time.monotonic() > deadline:
                    raise TimeoutError("the agents did not learn the bench models in 60 s")
                await asyncio.sleep(0.05)

            from aiokafka import TopicPartition

            await tail.start()
            tps = [TopicPartition(topics.triggers, p) for p in range(settings.triggers_partitions)]
            tail.assign(tps)
            await tail.seek_to_end(*tps)

            async def watch() -> None:
                while True:
                    batches = await tail.getmany(timeout_ms=100)
                    now = time.time()
                    seen.extend(
                        (codec.decode_trigger(r.value), now) for rs in batches.values() for r in rs
                    )

            watcher = asyncio.create_task(watch())
            produced_at: dict[tuple[int, int], float] = {}
            start = time.perf_counter()
            sends = []
            for i in range(total):
                m = model_ids[i % models]
                sends.append(
                    await producer.send(topics.features, encoded[m][i % 8], key=codec.encode_key(m))
                )
                if len(sends) >= 2000:
                    for md in await asyncio.gather(*sends):
                        produced_at[(md.partition, md.offset)] = md.timestamp / 1000
                    sends.clear()
            for md in await asyncio.gather(*sends):
                produced_at[(md.partition, md.offset)] = md.timestamp / 1000
            produce_s = time.perf_counter() - start
            want = total * SAMPLES_PER_PUSH
            deadline = time.monotonic() + timeout
            while worker.agents.counted_samples < want:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"agents counted {worker.agents.counted_samples} of {want} samples"
                    )
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - start
            await _until(lambda: len(seen) >= models, "a trigger per model", 30)

            short = min_samples // SAMPLES_PER_PUSH - 1
            sustained = await _sustained_latency(
                worker,
                producer,
                topics.features,
                encoded,
                seen,
                background=model_ids,
                probes=probe_ids,
                short=short,
                rate=sustain_fraction * total / elapsed,
                seconds=sustain_s,
            )

            # Trigger latency on an idle system: fill a model to one push short of
            # min_samples, let the agents count it, then time the push that crosses.
            idle_latencies = []
            for m in idle_ids:
                await asyncio.gather(
                    *[
                        await producer.send(topics.features, encoded[m][i % 8], key=m.encode())
                        for i in range(short)
                    ]
                )
                await _until(
                    functools.partial(_counted, worker, m, short * SAMPLES_PER_PUSH),
                    "the idle model's pushes counted",
                    30,
                )
                md = await (await producer.send(topics.features, encoded[m][0], key=m.encode()))
                await _until(functools.partial(_seen, seen, m), "the idle trigger", 30)
                seen_at = next(at for t, at in seen if t.model_id == m)
                idle_latencies.append(seen_at - md.timestamp / 1000)
            watcher.cancel()
        finally:
            await tail.stop()
            await producer.stop()
            await worker.stop()
            await _delete_topics(bootstrap, prefix)

    latencies = []
    for trigger, seen_at in seen:
        if not trigger.model_id.startswith("bench-"):
            continue
        [r] = trigger.ranges
        crossed = produced_at.get((r.partition, r.end - 1))
        if crossed is not None:
            latencies.append(seen_at - crossed)
    agent_rate = want / elapsed
    result: dict[str, Any] = {
        "bootstrap": bootstrap,
        "push": {"cut": "freeze6", "dtype": "float16", "samples": SAMPLES_PER_PUSH},
        "messages": total,
        "models": models,
        "min_samples": min_samples,
        "partitions": settings.features_partitions,
        "seconds": elapsed,
        "produce_seconds": produce_s,
        "samples_s": agent_rate,
        "pushes_s": total / elapsed,
        "triggers": len(seen),
        # Under the flood: includes the agents' backlog behind the producer.
        "trigger_latency_s": _summary(latencies),
        # A paced stream at sustain_fraction of the capacity above.
        "sustained": sustained,
        # One model at a time on an otherwise idle worker.
        "idle_trigger_latency_s": _summary(idle_latencies),
    }
    if compare_raw:
        await measure_raw()
        await _delete_topics(bootstrap, prefix)
        raw_rate = sum(raw_runs) / len(raw_runs)
        result["raw_kafka_runs_samples_s"] = raw_runs
        result["raw_kafka_samples_s"] = raw_rate
        result["ratio_to_raw_kafka"] = agent_rate / raw_rate
    return result


def measure_agent_throughput(bootstrap: str, prefix: str, messages: int) -> dict[str, Any]:
    """Samples/s through the agents vs raw Kafka, and trigger latency (p50/p99), for freeze6
    float16 10-sample pushes. Creates and deletes topics under ``prefix``. Blocking."""
    return asyncio.run(ameasure_agent_throughput(bootstrap, prefix, messages))
