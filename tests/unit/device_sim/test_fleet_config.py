"""FleetConfig and its groups: validation and the schedule's stop rule (no broker)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from device_sim.fleet_config import FleetConfig, FleetSchedule, SendPolicy
from pipeline.errors import ConfigError


def test_the_schedule_stops_on_duration_or_pushes_and_never_without_limits() -> None:
    assert FleetSchedule().stop_reason(1e9, 10**9) is None
    both = FleetSchedule(duration_s=10.0, max_pushes=5)
    assert both.stop_reason(9.9, 4) is None
    assert both.stop_reason(10.0, 0) == "duration"
    assert both.stop_reason(0.0, 5) == "max_pushes"


@pytest.mark.parametrize(
    "build",
    [
        lambda: FleetSchedule(time_scale=0.0),
        lambda: FleetSchedule(tick_s=-1.0),
        lambda: FleetConfig(count=0),
        lambda: FleetConfig(shard_index=2, shard_count=2),
        lambda: FleetConfig(features="camera"),  # type: ignore[arg-type]
    ],
)
def test_invalid_configs_are_refused(build: Callable[[], object]) -> None:
    with pytest.raises(ConfigError):
        build()


def test_defaults_and_world_models() -> None:
    config = FleetConfig(models=3, sending=SendPolicy(compression="lz4"))
    assert config.schedule == FleetSchedule()
    assert config.sending.max_in_flight == 2000 and config.sending.compression == "lz4"
    assert config.world_config().models == ("faces-1", "faces-2", "faces-3")
