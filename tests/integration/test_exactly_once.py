"""Exactly once on the real stack, under faults: a chaos run, then ``fedex audit``.

The run starts its own broker (it kills it midway), the worker and the trainer as
supervised child processes (as ``fedex up`` runs them), and devices that re-send every
push until it is acknowledged. Age triggers fire every 2 s on four models, so triggers,
jobs and updates interleave with the pushes and the outage. The audit then reads the
topics alone: every acknowledged sample is in exactly one trained version.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.chaos import ChaosConfig, ChaosRun, Fault, FaultKind
from pipeline.settings import Settings

REPO = Path(__file__).resolve().parents[2]
JAR_CACHE = REPO / ".fedex" / "kafka" / "libs"


def chaos_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "features_partitions": 2,
            "models_partitions": 2,
            "triggers_partitions": 2,
            "min_samples": 100_000,  # age triggers only: they race the pushes
            "age_floor_samples": 1,
            "max_age_s": 2.0,
            "agent_tick_s": 0.5,
            "job_timeout_s": 20.0,
            "train_epochs": 1,
            "val_fraction": 0.2,
        }
    )


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
    assert sum(m.trained_samples for m in report.models) == sum(
        m.distinct for m in report.models
    )
    assert sum(m.distinct for m in report.models) == result.samples_acked
