"""The main job end to end on the real broker: cloud children (worker, trainer, model
server as subprocesses), a small fleet of a tiny world, and the report it ends with."""

from __future__ import annotations

import math

from rich.console import Console

from device_sim.devices import Availability, DeviceParams
from device_sim.fleet import FleetConfig
from device_sim.fleet_config import FleetSchedule
from device_sim.world import WorldConfig
from lab.main_job import print_report, run_main_job
from pipeline.records import Backbone
from pipeline.settings import Settings

#: The easy world (aligned portraits) on a random backbone: this tests the mechanics;
#: the learning on the hard world is measured by the benches (docs/learning.md).
WORLD = WorldConfig(
    seed=7, identities=8, pretrain_images=4, device_images=6, vendors=3, variation=0.0
)


async def test_main_job_ships_versions_that_raise_device_accuracy(settings: Settings) -> None:
    settings = settings.model_copy(update={"min_samples": 150, "train_epochs": 10})
    fleet = FleetConfig(
        count=80,
        models=1,
        backbone=Backbone.MOBILENET_V2,
        world=WORLD,
        schedule=FleetSchedule(duration_s=45.0, time_scale=60.0),
        params=DeviceParams(
            availability=Availability.ALWAYS,
            inferences_per_hour=60.0,
            push_batch=5,
            simulate_transfer=False,
        ),
    )
    console = Console(record=True, width=150)
    report = await run_main_job(settings, console=console, fleet_config=fleet)

    assert report.models == ["faces-1"]
    assert report.jobs, "no training job published a version"
    summary = report.fleet
    assert summary["totals"]["samples_pushed"] > 0
    trained = [v for v in summary["versions"] if v["version"] != "v0" and v["applied"] > 0]
    assert trained, "no trained version reached the devices"
    assert all(v["applied"] == v["devices"] == 80 for v in trained)
    base = next(v for v in summary["versions"] if v["version"] == "v0")
    final = summary["per_model"]["faces-1"]["accuracy"]
    assert math.isfinite(base["mean_accuracy"])
    assert final > base["mean_accuracy"] + 0.05

    print_report(report, console)
    text = console.export_text()
    assert "versions shipped" in text and trained[0]["version"] in text
    assert "freshness" in text and "energy per device" in text
