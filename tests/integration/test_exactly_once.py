"""Exactly once on the real stack, under faults: a chaos run, then ``fedex audit``.

The run starts its own broker (it kills it midway), the worker and the trainer as
supervised child processes (as ``fedex up`` runs them), and devices that re-send every
push until it is acknowledged. Age triggers fire every 2 s on four models, so triggers,
jobs and updates interleave with the pushes and the outage. The audit then reads the
topics alone: every acknowledged sample is new in exactly one trained version (trained or
held out for validation there; later versions may replay it, counted apart).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from lab.chaos import ChaosConfig, ChaosResult, ChaosRun, Fault, FaultKind, racing_settings
from pipeline.auth import ANY_MODEL, issue_token
from pipeline.kafka_local import free_port
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[2]
JAR_CACHE = REPO / ".fedex" / "kafka" / "libs"


def chaos_settings(settings: Settings) -> Settings:
    # age triggers only: they race the pushes
    return racing_settings(settings, min_samples=100_000, job_timeout_s=20.0, val_fraction=0.2)


async def test_a_broker_kill_midway_loses_and_duplicates_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    config = ChaosConfig(
        models=4,
        devices_per_model=3,
        push_rate=20.0,
        duration_s=24.0,
        faults=(Fault(FaultKind.KILL_BROKER, at_s=9.0, duration_s=5.0),),
        settle_timeout_s=60.0,
        libs_dir=JAR_CACHE,
    )
    lines: list[str] = []
    run = ChaosRun(
        chaos_settings(settings).model_copy(update={"home": tmp_path}),
        config,
        on_event=lines.append,
    )
    result = await run.run()
    log = "\n".join(lines)
    report = result.report
    assert result.faults and result.faults[0]["kind"] == "kill_broker", log
    assert result.push_retries > 0, "the outage never reached the devices"
    assert result.settled, f"did not settle:\n{log}\n{report.to_json()}"
    assert report.clean, [v.detail for v in report.violations]
    assert len(report.models) == 4
    assert all(m.versions >= 2 for m in report.models), report.to_json()["models"]
    # Every acknowledged push is in the log and trained once (copies of re-sent pushes
    # included in `samples`, excluded from `distinct`).
    assert sum(m.pushes for m in report.models) >= result.pushes_acked
    assert sum(m.trained_samples for m in report.models) == sum(m.distinct for m in report.models)
    assert sum(m.distinct for m in report.models) == result.samples_acked
    # Later jobs replay earlier ones' samples: counted apart, and no violation.
    assert any(m.replay_samples > 0 for m in report.models), report.to_json()["models"]


async def test_every_process_rides_out_a_paused_then_killed_broker(
    settings: Settings, tmp_path: Path
) -> None:
    """Broker paused 30 s, then killed 30 s: the worker, the trainer and the model server
    stay up (no restart), log the outage once each way, and catch up afterwards: every
    push is trained, and the server serves the last version of every model."""
    secret = "chaos-test-secret"
    port = free_port()
    config = ChaosConfig(
        models=2,
        devices_per_model=3,
        push_rate=10.0,
        duration_s=72.0,
        faults=(
            Fault(FaultKind.PAUSE_BROKER, at_s=4.0, duration_s=30.0),
            Fault(FaultKind.KILL_BROKER, at_s=38.0, duration_s=30.0),
        ),
        serve=True,
        server_port=port,
        settle_timeout_s=60.0,
        libs_dir=JAR_CACHE,
    )
    served: dict[str, Any] = {}

    async def inspect(result: ChaosResult) -> None:
        token = issue_token(secret, "ops", ANY_MODEL, 600, time.time())
        headers = {"Authorization": f"Bearer {token}"}
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(50):  # the registry follows the model topic: give it a moment
                async with http.get(f"{base}/v1/models", headers=headers) as response:
                    served["models"] = await response.json()
                latest = {m["id"]: m["latest"] for m in served["models"]["models"]}
                if latest == expected_latest(result):
                    break
                await asyncio.sleep(0.2)
            async with http.get(f"{base}/readyz") as response:
                served["readyz"] = await response.json()
            async with http.get(f"{base}/metrics") as response:
                served["metrics"] = await response.text()

    lines: list[str] = []
    run = ChaosRun(
        chaos_settings(settings).model_copy(update={"home": tmp_path, "auth_secret": secret}),
        config,
        on_event=lines.append,
        on_settled=inspect,
    )
    result = await run.run()
    log = "\n".join(lines)
    assert [f["kind"] for f in result.faults] == ["pause_broker", "kill_broker"], log
    assert result.restarts == {"worker": 0, "trainer": 0, "server": 0}, log
    assert result.settled and result.report.clean, result.report.to_json()
    assert all(m.versions >= 2 for m in result.report.models)
    latest = {m["id"]: m["latest"] for m in served["models"]["models"]}
    assert latest == expected_latest(result)
    kafka = served["readyz"]["kafka"]
    assert kafka["reachable"] is True and kafka["outages"] >= 2
    assert "fedex_broker_reachable 1.0" in served["metrics"]
    for name in ("worker", "trainer", "server"):
        text = (run.log_dir / f"{name}.log").read_text()
        lost = text.count("Kafka unreachable")
        back = text.count("Kafka back after")
        assert lost == back >= 1, f"{name}: {lost} lost / {back} back lines"
        assert text.count("Unable connect to node") == 0, f"{name} logs every attempt"


def expected_latest(result: ChaosResult) -> dict[str, str]:
    return {m.model_id: f"v{m.versions}" for m in result.report.models}
