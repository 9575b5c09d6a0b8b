"""``fedex bench pipeline``: the aggregation agents against raw Kafka, and trigger latency.

One in-process agents worker (RocksDB store, the deployment's defaults otherwise) runs on
the broker at hand for the whole bench. Then:

- **Throughput, like for like, interleaved.** Each pair sends the same records twice:
  once to a fresh raw topic read back by a plain consumer with the agents' fetch settings
  (``getmany`` of ``ingest_batch_max`` records, the same poll), once through the agents
  (counted = validated, summarized, the Faust agent's state and outputs durable). Both
  sides carry the same bytes under the same 50 keys over every partition. One warm-up
  pair runs first (on a broker the bench started, that is the cold figure: a fresh JVM
  still compiling); then k pairs (``--repeat``), and the ratio is the median of the k
  per-pair ratios with its min–max (:func:`lab.measure.interleave`).
- **Trigger latency**, from the log time of the push that brought a model to
  ``min_samples`` until a consumer sees the trigger on the topic, in three regimes: under
  the flood (one value per model per pair: includes the backlog behind the producer), at
  a sustained load of ``sustain_fraction`` of the measured capacity (probe models cross
  the threshold at evenly spaced moments of a paced stream), and on an idle worker (each
  idle model crosses alone). Every distribution carries its n; a p99 needs 100 values.

Producer, worker and consumers share one process and one event loop on both sides, so the
ratio compares like with like; in a deployment the producers are devices elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.ingest import POLL_MS
from agents.worker import AgentWorker
from lab.measure import Distribution, Warmup, describe, interleave
from lab.transport_bench import bench_records, measure_kafka_round_trip
from pipeline import clients, codec
from pipeline.records import Backbone, Cut, ModelMetrics, ModelUpdate, TrainingTrigger
from pipeline.settings import Settings
from pipeline.tables import print_table
from pipeline.topics import Topics

SAMPLES_PER_PUSH = 10
NUM_CLASSES = 1000
KEYS = 50


@dataclass(frozen=True, slots=True)
class PipelineBenchConfig:
    messages: int = 20_000
    pairs: int = 5
    warmup_pairs: int = 1
    probe_models: int = 100
    idle_models: int = 100
    sustain_fraction: float = 0.5
    sustain_s: float = 10.0
    timeout: float = 300.0

    @property
    def pushes_per_model(self) -> int:
        return max(2, self.messages // KEYS)

    @property
    def min_samples(self) -> int:
        # Each model crosses min_samples once, halfway through its pushes: one latency value
        # per model, and the second half exercises coalescing behind the job in flight.
        return max(1, self.pushes_per_model // 2) * SAMPLES_PER_PUSH

    @property
    def short(self) -> int:
        """Pushes that bring a probe model to one push short of ``min_samples``."""
        return self.min_samples // SAMPLES_PER_PUSH - 1


def base_update(model_id: str) -> ModelUpdate:
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


async def until(predicate: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: timed out waiting for {what}")
        await asyncio.sleep(0.005)


class TriggerWatch:
    """Every trigger a group-less consumer sees on the trigger topic, with when."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self._tail = clients.make_consumer(bootstrap=bootstrap, group_id=None)
        self._topic, self._partitions = topic, partitions
        self.seen: dict[str, float] = {}
        self.triggers: list[TrainingTrigger] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiokafka import TopicPartition

        await self._tail.start()
        tps = [TopicPartition(self._topic, p) for p in range(self._partitions)]
        self._tail.assign(tps)
        await self._tail.seek_to_end(*tps)
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            batches = await self._tail.getmany(timeout_ms=100)
            now = time.time()
            for records in batches.values():
                for r in records:
                    trigger = codec.decode_trigger(r.value)
                    self.triggers.append(trigger)
                    self.seen.setdefault(trigger.model_id, now)

    def saw(self, model_id: str) -> bool:
        return model_id in self.seen

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._tail.stop()


@dataclass
class Rig:
    """The live parts every phase uses."""

    config: PipelineBenchConfig
    settings: Settings
    worker: AgentWorker
    producer: Any
    watch: TriggerWatch
    flood: list[float] = field(default_factory=list)

    @property
    def features(self) -> str:
        return Topics(self.settings.topic_prefix).features

    def counted(self, model_id: str, samples: int) -> bool:
        state = self.worker.state(model_id)
        return state is not None and state.counted_samples >= samples

    async def send_all(self, records: Sequence[tuple[bytes, bytes]]) -> list[Any]:
        """Sends and awaits every record in order; returns their metadata."""
        sends, metas = [], []
        for key, value in records:
            sends.append(await self.producer.send(self.features, value, key=key))
            if len(sends) >= 2000:
                metas += await asyncio.gather(*sends)
                sends.clear()
        return metas + list(await asyncio.gather(*sends))


def pair_records(config: PipelineBenchConfig, pair: int) -> list[tuple[bytes, bytes]]:
    """The records of one pair: fresh models (``flood<pair>-NNN``), so each crosses
    ``min_samples`` once in it."""
    return bench_records(KEYS * config.pushes_per_model, keys=KEYS, model_prefix=f"flood{pair}")


def model_ids(config: PipelineBenchConfig) -> list[str]:
    pairs = config.warmup_pairs + config.pairs
    flood = [f"flood{p}-{k:03d}" for p in range(pairs) for k in range(KEYS)]
    return [
        *flood,
        *(f"probe-{i:03d}" for i in range(config.probe_models)),
        *(f"idle-{i:03d}" for i in range(config.idle_models)),
    ]


async def register(rig: Rig, ids: Sequence[str]) -> None:
    models = Topics(rig.settings.topic_prefix).models
    for m in ids:
        await rig.producer.send(
            models, codec.encode_update(base_update(m)), key=codec.encode_key(m)
        )
    await rig.producer.flush()
    await until(
        lambda: all((s := rig.worker.state(m)) is not None and s.known for m in ids),
        "the agents to learn the bench models",
        120,
    )


async def agents_run(rig: Rig, records: Sequence[tuple[bytes, bytes]], pair: int) -> float:
    """Samples/s through the agents for one pair; adds its flood latencies."""
    want = rig.worker.agents.counted_samples + len(records) * SAMPLES_PER_PUSH
    start = time.perf_counter()
    metas = await rig.send_all(records)
    await until(
        lambda: rig.worker.agents.counted_samples >= want,
        f"the agents to count {want} samples",
        rig.config.timeout,
    )
    elapsed = time.perf_counter() - start
    produced_at = {(md.partition, md.offset): md.timestamp / 1000 for md in metas}
    prefix = f"flood{pair}-"
    await until(
        lambda: sum(m.startswith(prefix) for m in rig.watch.seen) >= KEYS, "a trigger per model", 60
    )
    for trigger in rig.watch.triggers:
        if trigger.model_id.startswith(prefix):
            [r] = trigger.ranges
            crossed = produced_at.get((r.partition, r.end - 1))
            if crossed is not None and pair >= rig.config.warmup_pairs:
                rig.flood.append(rig.watch.seen[trigger.model_id] - crossed)
    return len(records) * SAMPLES_PER_PUSH / elapsed


async def fill(rig: Rig, prefix: str, count: int) -> list[tuple[bytes, bytes]]:
    """Brings models ``<prefix>-000``… to one push short of ``min_samples``, counted;
    returns one more push per model: the one that crosses."""
    short = rig.config.short
    await rig.send_all(bench_records(short * count, keys=count, model_prefix=prefix))
    for k in range(count):
        await until(
            functools.partial(rig.counted, f"{prefix}-{k:03d}", short * SAMPLES_PER_PUSH),
            f"the {prefix} models' pushes counted",
            120,
        )
    return bench_records(count, keys=count, model_prefix=prefix)


async def sustained_latency(rig: Rig, capacity_pushes_s: float) -> dict[str, Any]:
    """Trigger latency under a paced stream at ``sustain_fraction`` of the capacity.

    The probe models are filled first; then pushes go out at the target rate for
    ``sustain_s`` (background pushes go to the warm-up pair's models, whose jobs are in
    flight, so they are only counted), and each probe's crossing push is slotted in at
    evenly spaced moments of that stream.
    """
    cfg = rig.config
    crossing = await fill(rig, "probe", cfg.probe_models)
    rate = cfg.sustain_fraction * capacity_pushes_s
    count = max(cfg.probe_models, int(rate * cfg.sustain_s))
    background = bench_records(count, keys=KEYS, model_prefix="flood0")
    slots = {int((j + 0.5) * count / cfg.probe_models): j for j in range(cfg.probe_models)}
    probe_sends, other_sends = {}, []
    start, sent = time.perf_counter(), 0
    while sent < count:
        due = min(count, int((time.perf_counter() - start) * rate) + 1)
        while sent < due:
            j = slots.get(sent)
            key, value = crossing[j] if j is not None else background[sent]
            fut = await rig.producer.send(rig.features, value, key=key)
            if j is not None:
                probe_sends[key.decode()] = fut
            else:
                other_sends.append(fut)
            sent += 1
        await asyncio.sleep(0.002)
    send_s = time.perf_counter() - start
    await asyncio.gather(*other_sends)
    await until(lambda: all(m in rig.watch.seen for m in probe_sends), "the probe triggers", 60)
    latencies = [rig.watch.seen[m] - (await fut).timestamp / 1000 for m, fut in probe_sends.items()]
    return {
        "target_pushes_s": rate,
        "pushes_s": count / send_s,
        "samples_s": count * SAMPLES_PER_PUSH / send_s,
        "pushes": count,
        "trigger_latency_s": Distribution.of(latencies).as_dict(),
    }


async def idle_latency(rig: Rig) -> dict[str, Any]:
    """Trigger latency on an idle worker: every idle model is filled, then each crosses
    alone, the next only after the last one's trigger was seen."""
    crossing = await fill(rig, "idle", rig.config.idle_models)
    latencies = []
    for key, value in crossing:
        md = await (await rig.producer.send(rig.features, value, key=key))
        model_id = key.decode()
        await until(functools.partial(rig.watch.saw, model_id), "the idle trigger", 30)
        latencies.append(rig.watch.seen[model_id] - md.timestamp / 1000)
    return Distribution.of(latencies).as_dict()


async def raw_run(rig: Rig, records: Sequence[tuple[bytes, bytes]], pair: int) -> float:
    run = await measure_kafka_round_trip(
        rig.settings.bootstrap,
        f"{rig.settings.topic_prefix}.raw.{pair}",
        records,
        partitions=rig.settings.features_partitions,
        max_records=rig.settings.ingest_batch_max,
        poll_ms=POLL_MS,
    )
    return run.samples_s


def partition_shares(records: Sequence[tuple[bytes, bytes]], partitions: int) -> list[float]:
    """Share of the records on each partition under the producer's default partitioner."""
    from aiokafka.partitioner import DefaultPartitioner

    counts = [0] * partitions
    parts = list(range(partitions))
    for key, _ in records:
        counts[DefaultPartitioner()(key, parts, parts)] += 1
    return [c / len(records) for c in counts]


async def run_phases(rig: Rig, warmup: Warmup, echo: Callable[[str], None]) -> dict[str, Any]:
    cfg = rig.config
    with warmup.phase("agents worker start, base models registered"):
        await register(rig, model_ids(cfg))
    records = [pair_records(cfg, p) for p in range(cfg.warmup_pairs + cfg.pairs)]
    throughput = await interleave(
        lambda p: raw_run(rig, records[p], p),
        lambda p: agents_run(rig, records[p], p),
        pairs=cfg.pairs,
        warmup_pairs=cfg.warmup_pairs,
        echo=echo,
    )
    agents_median = statistics.median(throughput.b)
    sustained = await sustained_latency(rig, agents_median / SAMPLES_PER_PUSH)
    idle = await idle_latency(rig)
    return {
        "throughput": {"a": "raw Kafka", "b": "agents", **throughput.as_dict()},
        "agents_samples_s": agents_median,
        "raw_kafka_samples_s": statistics.median(throughput.a),
        "ratio_to_raw_kafka": throughput.median,
        "trigger_latency_s": Distribution.of(rig.flood).as_dict(),
        "sustained": sustained,
        "idle_trigger_latency_s": idle,
        "records": {
            "pushes_per_pair": len(records[0]),
            "keys": KEYS,
            "partitions": rig.settings.features_partitions,
            "partition_shares": partition_shares(records[0], rig.settings.features_partitions),
        },
    }


async def ameasure_agent_throughput(
    bootstrap: str,
    prefix: str,
    config: PipelineBenchConfig,
    *,
    warmup: Warmup,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The async body of :func:`measure_agent_throughput`."""
    with tempfile.TemporaryDirectory(prefix="fedex-agent-bench-") as home:
        settings = Settings(
            kafka_bootstrap=bootstrap,
            topic_prefix=prefix,
            home=Path(home),
            min_samples=config.min_samples,
            age_floor_samples=config.min_samples,
            max_age_s=3600.0,
            job_timeout_s=3600.0,
        )
        worker = AgentWorker(settings)
        producer = clients.make_producer(bootstrap=bootstrap, linger_ms=5)
        watch = TriggerWatch(bootstrap, Topics(prefix).triggers, settings.triggers_partitions)
        rig = Rig(config, settings, worker, producer, watch)
        try:
            await worker.start()
            await producer.start()
            await worker.wait_ready()
            await watch.start()
            result = await run_phases(rig, warmup, echo)
        finally:
            await watch.stop()
            await producer.stop()
            await worker.stop()
    return {
        "bootstrap": bootstrap,
        "push": {"cut": "freeze6", "dtype": "float16", "samples": SAMPLES_PER_PUSH},
        "min_samples": config.min_samples,
        "pairs": config.pairs,
        "warmup_pairs": config.warmup_pairs,
        **result,
    }


def measure_agent_throughput(
    bootstrap: str, prefix: str, config: PipelineBenchConfig, warmup: Warmup
) -> dict[str, Any]:
    """Blocking :func:`ameasure_agent_throughput`."""
    return asyncio.run(ameasure_agent_throughput(bootstrap, prefix, config, warmup=warmup))


def print_result(result: dict[str, Any]) -> None:
    agents, update = result["agents"], result["update"]
    tp = agents["throughput"]
    rows: list[list[Any]] = [
        [f"warm-up {i + 1}", a, b, b / a]
        for i, (a, b) in enumerate(zip(tp["warmup_a"], tp["warmup_b"], strict=True))
    ]
    rows += [
        [f"pair {i + 1}", a, b, b / a]
        for i, (a, b) in enumerate(zip(tp["a"], tp["b"], strict=True))
    ]
    print_table(
        f"pipeline: samples/s, raw Kafka vs agents, same records (50 keys, all partitions); "
        f"median ratio {tp['ratio_median']:.3f} ({tp['ratio_min']:.3f}–{tp['ratio_max']:.3f}) "
        f"over {tp['pairs']} pairs",
        ["run", "raw Kafka samples/s", "agents samples/s", "agents / raw"],
        rows,
    )
    print_table(
        "pipeline: latency",
        ["what", "distribution"],
        [
            ["trigger, under the flood", describe(agents["trigger_latency_s"])],
            ["trigger, sustained load", describe(agents["sustained"]["trigger_latency_s"])],
            ["trigger, idle worker", describe(agents["idle_trigger_latency_s"])],
            ["update (trigger → model update seen)", describe(update["update_latency_s"])],
        ],
    )


def run_pipeline_bench(
    settings: Settings,
    config: PipelineBenchConfig,
    *,
    update_jobs: int,
    device: str,
    keep: bool = False,
    out: Path | None = None,
) -> dict[str, Any]:
    """The command: the broker, the agents bench, the update latency, table and JSON."""
    from lab.bench_broker import bench_kafka
    from lab.benchio import write_result
    from lab.update_latency import measure_update_latency

    async def run() -> dict[str, Any]:
        warmup = Warmup()
        async with bench_kafka(settings, keep=keep) as bootstrap:
            prefix = f"bench-pipeline-{uuid.uuid4().hex[:8]}"
            agents = await ameasure_agent_throughput(bootstrap, prefix, config, warmup=warmup)
            live = settings.model_copy(update={"kafka_bootstrap": bootstrap})
            update = await measure_update_latency(live, jobs=update_jobs, device=device)
            result = {"warmup": warmup.as_list(), "agents": agents, "update": update}
            print_result(result)
            print(f"wrote {write_result('pipeline', result, out)}")
            return result

    return asyncio.run(run())
