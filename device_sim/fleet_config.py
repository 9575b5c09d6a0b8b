"""What one fleet run is: :class:`FleetConfig` and the groups it is made of.

A fleet run has four concerns that change for different reasons, so each is its own
frozen object and the runner reads each from one place:

- **who** (on :class:`FleetConfig` itself): how many devices over how many models, the
  world, the device and energy models, the features they push, this process's shard;
- **when** (:class:`FleetSchedule`): the simulated clock, the tick, progress reports and
  the conditions that end a run;
- **how sends go** (:class:`SendPolicy`): the producer's compression and timeouts and the
  back-pressure limits on pushes started per tick and in flight;
- **what is kept** (flags on :class:`FleetConfig`): per-device columns, audit ids.

``fedex devices`` builds one from its options; benches and tests build their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from device_sim.devices import DeviceParams
from device_sim.energy import EnergyModel
from pipeline.errors import ConfigError
from pipeline.records import Backbone, Cut

if TYPE_CHECKING:
    from device_sim.world import WorldConfig

Features = Literal["fresh", "bank", "live"]

#: Default simulated seconds per wall second: one simulated day every 3 minutes.
DEFAULT_TIME_SCALE = 480.0


@dataclass(frozen=True)
class FleetSchedule:
    """The run's clock and its end: every ``tick_s`` of wall time the simulated clock
    advances by ``tick_s x time_scale``; progress is reported every ``progress_s``; the
    run ends after ``duration_s`` wall seconds or ``max_pushes`` pushes (either may be
    ``None``: then only the stop event ends it)."""

    duration_s: float | None = None
    max_pushes: int | None = None
    time_scale: float = DEFAULT_TIME_SCALE
    tick_s: float = 0.1
    progress_s: float = 1.0

    def __post_init__(self) -> None:
        if self.time_scale <= 0 or self.tick_s <= 0:
            raise ConfigError("time_scale and tick_s must be > 0")

    def stop_reason(self, elapsed: float, pushes: int) -> str | None:
        """Why a run ``elapsed`` wall seconds in with ``pushes`` pushes is over, if it is."""
        if self.duration_s is not None and elapsed >= self.duration_s:
            return "duration"
        if self.max_pushes is not None and pushes >= self.max_pushes:
            return "max_pushes"
        return None


@dataclass(frozen=True)
class SendPolicy:
    """How the fleet's one producer sends: ``compression`` and ``send_timeout_s`` (a send
    not acknowledged by then fails and its device retries after backoff), the flush on
    stop (``drain_timeout_s``), and the back-pressure that keeps one tick short: at most
    ``max_sends_per_tick`` pushes start per tick and ``max_in_flight`` are outstanding."""

    compression: str | None = None
    send_timeout_s: float = 10.0
    drain_timeout_s: float = 15.0
    max_sends_per_tick: int = 1000
    max_in_flight: int = 2000


@dataclass(frozen=True)
class FleetConfig:
    """One fleet run. ``count`` devices over the world's first ``models`` models; this
    process simulates shard ``shard_index`` of ``shard_count`` (devices ``g`` with
    ``g % shard_count == shard_index``)."""

    count: int = 1000
    models: int = 2
    seed: int = 0
    world: WorldConfig | None = None
    params: DeviceParams = field(default_factory=DeviceParams)
    energy: EnergyModel = field(default_factory=EnergyModel.calibrated)
    # What devices push: where their features come from and what computed them.
    features: Features = "fresh"
    cut: Cut = Cut.FREEZE6
    backbone: Backbone = Backbone.INCEPTION_RESNET_V1
    #: Backbone weights of the world's bank: ``pretrained``, ``none`` or a file.
    weights: str = "pretrained"
    shard_index: int = 0
    shard_count: int = 1
    #: Register the world's models (base heads) before the run, and follow new versions.
    register: bool = True
    subscribe: bool = True
    schedule: FleetSchedule = field(default_factory=FleetSchedule)
    sending: SendPolicy = field(default_factory=SendPolicy)
    #: Keep per-device columns in the summary.
    per_device: bool = False
    #: Keep every settled push's sample ids in ``FleetRunner.pushed`` (tests, audits).
    audit: bool = False

    def __post_init__(self) -> None:
        if self.count < 1 or self.models < 1:
            raise ConfigError("a fleet needs ≥ 1 device and ≥ 1 model")
        if not 0 <= self.shard_index < self.shard_count:
            raise ConfigError(f"shard {self.shard_index}/{self.shard_count} does not exist")
        if self.features not in ("fresh", "bank", "live"):
            raise ConfigError(f"features must be fresh, bank or live, got {self.features!r}")

    def world_config(self) -> WorldConfig:
        from device_sim.world import WorldConfig  # the world pulls in torch; configs do not

        base = self.world or WorldConfig(seed=self.seed)
        models = tuple(f"faces-{i + 1}" for i in range(self.models))
        if self.world is None or len(base.models) != self.models:
            base = replace(base, models=models)
        return base
