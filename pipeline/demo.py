"""The main job (``fedex demo`` / ``make demo``) on the embedded default stack.

Starts the local Kafka broker (or uses ``FEDEX_KAFKA_BOOTSTRAP``), ensures the topics,
and runs what the system can do end to end, ending with a report.
"""

from __future__ import annotations

import asyncio

from rich.console import Console

from pipeline.settings import Settings


async def _demo(settings: Settings, console: Console) -> None:
    from pipeline.stack import stack_for
    from pipeline.topics import describe_topics, topic_specs
    from pipeline.transport_bench import measure_kafka_round_trip

    async with stack_for(settings) as live:
        console.rule("topics")
        for row in await describe_topics(live.bootstrap, topic_specs(live)):
            console.print(row)
        console.rule("feature pushes through Kafka")
        run = await measure_kafka_round_trip(
            live.bootstrap, f"{live.topic_prefix}.demo-roundtrip", messages=5000
        )
        console.print(
            f"{run.messages:,} freeze6 pushes ({run.samples:,} samples, {run.bytes / 1e6:.1f} MB) "
            f"produced and consumed in {run.seconds:.2f} s: {run.samples_s:,.0f} samples/s"
        )


def run_demo(settings: Settings) -> None:
    console = Console()
    asyncio.run(_demo(settings, console))
