"""The device model: thousands of simulated phones as one struct of numpy arrays.

No per-device Python object and no per-device task: a :class:`DeviceFleet` holds one array
per attribute (profile, tiers, availability rhythm, cache ring, push state, counters) and
advances all devices with a few vectorised calls on a *simulated* clock (seconds since the
run started). The fleet runner (:mod:`device_sim.fleet`) is the I/O shell that feeds it the
clock, encodes the pushes it asks for and reports acknowledgements and failures back.

What one device does:

- **Profile** (from the world): its model, vendor camera (a per-vendor data shift, the
  system-induced heterogeneity of HeteroSwitch) and the identities its user photographs.
- **Tiers** in the spirit of FedScale's device traces: a compute tier tied to the vendor
  (flagship vendors are fast, legacy ones slow; it scales inference time and energy and
  the length of the charging window), and a network tier (:mod:`device_sim.network`).
- **Availability**: a daily rhythm in the device's time zone: a nightly charging window
  and, for some devices, a daytime idle window. ``availability="always"`` (tests, benches):
  always online and in use at once.
- **Inference** while in use (not available): a Poisson stream at the device's rate. Each
  inference is right with the probability of the active head's accuracy on that device.
- **Feedback**: the user confirms a right prediction with ``confirm_rate`` and corrects a
  wrong one with ``correct_rate``; a ``wrong_label_fraction`` of feedback labels is wrong
  (a random other identity). Only feedback becomes a sample (feature row + label).
- **Cache**: a ring of ``cache_capacity`` samples; the oldest is evicted (and counted)
  when a new one does not fit. Samples of a push in flight are pinned until it is settled.
- **Push policy**: when available, not already pushing, and the cache holds at least
  ``push_batch`` samples, push the oldest ``push_max`` of them as one FeaturePush.
- **Transfer**: the push's bytes over the device's link take simulated time
  (:func:`device_sim.network.transfer_seconds`); a push is *settled* when the broker has
  acknowledged it **and** that time has passed. Only then do its samples leave the cache.
- **Retries**: a failed send (broker unreachable, timeout) keeps the push pinned and
  retries the same samples (same ids) after exponential backoff with full jitter.
- **Versions**: a new best version is downloaded (simulated time) and then activated;
  the device's accuracy becomes that version's accuracy on its held-out data.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from device_sim.accounting import DeviceCounters, FreshnessLog
from device_sim.network import DEFAULT_MIX, TierArrays, assign_tiers
from pipeline.errors import ConfigError

HOUR = 3600.0
DAY = 24 * HOUR

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

#: ``draw(model_index, devices, identities, rng) -> feature rows``: one row per event.
DrawRows = Callable[[int, I64, I64, np.random.Generator], I64]


@dataclass(frozen=True, slots=True)
class ComputeTier:
    """A class of phone: inference speed relative to the reference phone (energy.py),
    the length range of its nightly charging window (hours), and the chance that it also
    has a daytime idle window (on a charger at a desk)."""

    name: str
    compute_speed: float
    night_hours: tuple[float, float]
    day_idle_probability: float


COMPUTE_TIERS: tuple[ComputeTier, ...] = (
    ComputeTier("flagship", 2.0, (6.0, 9.0), 0.5),
    ComputeTier("mid", 1.0, (5.0, 8.0), 0.3),
    ComputeTier("legacy", 0.4, (3.0, 7.0), 0.15),
)


def compute_tier_of_vendor(vendor: npt.ArrayLike, vendors: int) -> I64:
    """Vendors 1..V map to tiers flagship → legacy in order (the world's camera severity
    rises with the vendor index too: a legacy phone has a worse camera and a slower SoC)."""
    v = np.asarray(vendor, dtype=np.int64)
    return np.minimum((v - 1) * len(COMPUTE_TIERS) // max(1, vendors), len(COMPUTE_TIERS) - 1)


class Availability(enum.StrEnum):
    RHYTHM = "rhythm"
    ALWAYS = "always"


@dataclass(frozen=True, slots=True)
class DeviceParams:
    """How devices behave. Times are simulated seconds/hours."""

    inferences_per_hour: float = 6.0
    confirm_rate: float = 0.3
    correct_rate: float = 0.7
    wrong_label_fraction: float = 0.05
    cache_capacity: int = 64
    push_batch: int = 10
    push_max: int = 64
    backoff_base_s: float = 60.0
    backoff_max_s: float = 3600.0
    availability: Availability = Availability.RHYTHM
    timezone_spread_h: float = 24.0
    initial_backlog: bool = True
    prior_accuracy: float = 0.5
    simulate_transfer: bool = True
    network_mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))

    def __post_init__(self) -> None:
        for name in ("confirm_rate", "correct_rate", "wrong_label_fraction", "prior_accuracy"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.inferences_per_hour < 0:
            raise ConfigError("inferences_per_hour must be ≥ 0")
        if not 1 <= self.push_batch <= self.cache_capacity:
            raise ConfigError(
                f"need 1 ≤ push_batch ({self.push_batch}) ≤ cache_capacity ({self.cache_capacity})"
            )
        if not self.push_batch <= self.push_max:
            raise ConfigError(f"push_max ({self.push_max}) must be ≥ push_batch")
        if not 0 < self.backoff_base_s <= self.backoff_max_s:
            raise ConfigError("need 0 < backoff_base_s ≤ backoff_max_s")
        if not 0.0 <= self.timezone_spread_h <= 24.0:
            raise ConfigError("timezone_spread_h must be in [0, 24]")


class PushState(enum.IntEnum):
    IDLE = 0  # nothing pinned
    SENDING = 1  # sent, waiting for the broker's answer
    ACKED = 2  # acknowledged, waiting for the simulated transfer to finish
    BACKOFF = 3  # failed; retry the same samples at ``retry_at``


def backoff_seconds(
    attempt: npt.ArrayLike, base: float, cap: float, rng: np.random.Generator
) -> F64:
    """Exponential backoff with full jitter (AWS's): uniform in [0, min(cap, base·2^(a-1))]
    for the ``a``-th failure, but at least ``base / 10`` so a retry never spins."""
    a = np.asarray(attempt, dtype=np.float64)
    ceiling = np.minimum(cap, base * np.exp2(np.maximum(a, 1.0) - 1.0))
    return np.asarray(np.maximum(rng.random(a.shape) * ceiling, base / 10.0))


@dataclass(frozen=True, slots=True)
class Settled:
    """Pushes whose samples left the caches in one :meth:`DeviceFleet.settle` call."""

    devices: I64
    samples: I64
    partitions: I64
    offsets: I64
    oldest_s: F64
    sample_ids: list[npt.NDArray[np.uint64]] | None = None


class DeviceFleet:
    """The state of ``n`` devices and the pure rules that advance it (module docstring).

    ``model_of[k]`` indexes ``model_ids``; ``identities[k]`` are device ``k``'s classes;
    ``global_index[k]`` is its index in the whole fleet (its id and static draws derive
    from it, so a device is the same whichever process simulates it).
    """

    def __init__(
        self,
        *,
        model_ids: Sequence[str],
        model_of: npt.ArrayLike,
        vendor: npt.ArrayLike,
        identities: Sequence[npt.ArrayLike],
        num_classes: int,
        vendors: int,
        global_index: npt.ArrayLike,
        params: DeviceParams,
        seed: int = 0,
    ) -> None:
        self.params = params
        self.model_ids = tuple(model_ids)
        self.model_of = np.asarray(model_of, dtype=np.int64)
        self.vendor = np.asarray(vendor, dtype=np.int64)
        self.global_index = np.asarray(global_index, dtype=np.int64)
        n = self.n = int(self.model_of.shape[0])
        if not (self.vendor.shape == self.global_index.shape == (n,)) or len(identities) != n:
            raise ConfigError("model_of, vendor, identities and global_index differ in length")
        self.num_classes = num_classes
        self.device_ids = [
            f"{self.model_ids[m]}-dev{g:06d}"
            for m, g in zip(self.model_of.tolist(), self.global_index.tolist(), strict=True)
        ]
        sizes = np.asarray([np.asarray(s).size for s in identities], dtype=np.int64)
        if (sizes == 0).any():
            raise ConfigError("every device needs at least one identity")
        self.identity_count = sizes
        self.identity_table = np.zeros((n, int(sizes.max(initial=1))), dtype=np.int64)
        for k, s in enumerate(identities):
            self.identity_table[k, : sizes[k]] = np.asarray(s, dtype=np.int64).ravel()

        self._draw_rhythm(vendors, seed)
        self._allocate_caches()
        # Model versions (indices into the runner's version ledger; -1 = none yet).
        self.active_version = np.full(n, -1, dtype=np.int64)
        self.accuracy = np.full(n, np.nan, dtype=np.float32)
        #: Accuracy with the first version a device activated (its base model).
        self.first_accuracy = np.full(n, np.nan, dtype=np.float32)
        self.pending_version = np.full(n, -1, dtype=np.int64)
        self.pending_accuracy = np.full(n, np.nan, dtype=np.float32)
        self.pending_at = np.zeros(n, dtype=np.float64)
        self.activated_at = np.zeros(n, dtype=np.float64)

        self.counters = DeviceCounters(n)
        self.freshness = FreshnessLog()
        #: Called with the feature rows of samples that leave the fleet (evicted, dropped,
        #: or pushed and settled): a live feature store frees them.
        self.release: Callable[[I64], None] | None = None

    def _draw_rhythm(self, vendors: int, seed: int) -> None:
        """Compute tier, daily windows, time zone, usage rate and network tier: static
        per-device draws, a function of (seed, global index) alone."""
        p = self.params
        static = _static_draws(self.global_index, seed)
        self.compute_tier = compute_tier_of_vendor(self.vendor, vendors)
        tiers = COMPUTE_TIERS
        self.compute_speed = np.asarray([tiers[t].compute_speed for t in self.compute_tier])
        lo = np.asarray([tiers[t].night_hours[0] for t in self.compute_tier])
        hi = np.asarray([tiers[t].night_hours[1] for t in self.compute_tier])
        self.night_len_h = lo + (hi - lo) * static[:, 0]
        self.night_start_h = 21.0 + 3.0 * static[:, 1]
        day_p = np.asarray([tiers[t].day_idle_probability for t in self.compute_tier])
        has_day = static[:, 2] < day_p
        self.day_start_h = 9.0 + 8.0 * static[:, 3]
        self.day_len_h = np.where(has_day, 0.5 + 1.5 * static[:, 4], 0.0)
        self.phase_h = p.timezone_spread_h * static[:, 5]
        # Heavy-ish tailed usage: lognormal around the mean rate, per simulated second.
        self.inference_rate = (
            p.inferences_per_hour / HOUR * np.exp(0.5 * _normal(static[:, 6]) - 0.125)
        )
        net_rng = np.random.default_rng([seed, 0x6E6574])
        tier_all = assign_tiers(int(self.global_index.max(initial=-1)) + 1, net_rng, p.network_mix)
        self.network = TierArrays.of(list(p.network_mix))
        self.network_tier = tier_all[self.global_index].astype(np.int64)

    def _allocate_caches(self) -> None:
        """The cache ring and the pinned push, one row per device."""
        n, p = self.n, self.params
        c, pm = p.cache_capacity, p.push_max
        self.cache_rows, self.cache_labels, self.cache_ids, self.cache_ts = _sample_slots(n, c)
        self.cache_head = np.zeros(n, dtype=np.int64)
        self.cache_count = np.zeros(n, dtype=np.int64)
        self.push_rows, self.push_labels, self.push_ids, self.push_ts = _sample_slots(n, pm)
        self.push_count = np.zeros(n, dtype=np.int64)
        self.push_state = np.zeros(n, dtype=np.int8)
        self.push_attempt = np.zeros(n, dtype=np.int64)
        self.push_done_at = np.zeros(n, dtype=np.float64)
        self.push_partition = np.full(n, -1, dtype=np.int64)
        self.push_offset = np.full(n, -1, dtype=np.int64)
        self.retry_at = np.zeros(n, dtype=np.float64)
        self.next_sample_id = np.zeros(n, dtype=np.uint64)

    # ---------------------------------------------------------------- rhythm

    def available(self, now: float) -> npt.NDArray[np.bool_]:
        """Charging and idle now: inside the nightly or the daytime window."""
        if self.params.availability is Availability.ALWAYS:
            return np.ones(self.n, dtype=np.bool_)
        hour = (now / HOUR + self.phase_h) % 24.0
        night = (hour - self.night_start_h) % 24.0 < self.night_len_h
        day = (hour - self.day_start_h) % 24.0 < self.day_len_h
        return np.asarray(night | day)

    def in_use(self, now: float) -> npt.NDArray[np.bool_]:
        """In the user's hands (inferring): outside the windows; always in the test mode
        ``availability="always"``, where devices are online and in use at once."""
        if self.params.availability is Availability.ALWAYS:
            return np.ones(self.n, dtype=np.bool_)
        return ~self.available(now)

    # ---------------------------------------------------------------- inference + feedback

    def seed_backlog(self, draw: DrawRows, rng: np.random.Generator, now: float = 0.0) -> int:
        """Give every device the feedback it gathered before the run: uniform in
        [0, cache_capacity] samples labelled during the past day (so a fleet started
        at any hour has devices ready to push). Returns the samples added."""
        if not self.params.initial_backlog:
            return 0
        counts = rng.integers(0, self.params.cache_capacity + 1, self.n)
        devices = np.repeat(np.arange(self.n, dtype=np.int64), counts)
        ages = rng.random(devices.size) * DAY
        order = np.lexsort((-ages, devices))  # per device, oldest first
        devices, ages = devices[order], ages[order]
        return self._label_and_cache(devices, now - ages, draw, rng, feedback_only=True)

    def infer(self, now: float, dt: float, draw: DrawRows, rng: np.random.Generator) -> int:
        """Inferences of the ``dt`` seconds up to ``now`` on devices in use (Poisson per
        device) and the feedback they get; feedback samples enter the caches. Returns the
        number of samples cached."""
        if dt <= 0:
            return 0
        in_use = self.in_use(now)
        lam = np.where(in_use, self.inference_rate * dt, 0.0)
        events = rng.poisson(lam)
        total = int(events.sum())
        if total == 0:
            return 0
        devices = np.repeat(np.arange(self.n, dtype=np.int64), events)
        times = now - dt + np.sort(rng.random(total)) * dt  # order within a device is kept
        self.counters.add("inferences", devices)
        return self._label_and_cache(devices, times, draw, rng, feedback_only=False)

    def _label_and_cache(
        self,
        devices: I64,
        times: F64,
        draw: DrawRows,
        rng: np.random.Generator,
        *,
        feedback_only: bool,
    ) -> int:
        p = self.params
        acc = np.where(np.isfinite(self.accuracy), self.accuracy, p.prior_accuracy)[devices]
        right = rng.random(devices.size) < acc
        if feedback_only:
            keep = np.ones(devices.size, dtype=np.bool_)
        else:
            keep = np.where(right, rng.random(devices.size) < p.confirm_rate, False) | np.where(
                ~right, rng.random(devices.size) < p.correct_rate, False
            )
        devices, times, right = devices[keep], times[keep], right[keep]
        if devices.size == 0:
            return 0
        self.counters.add("backlog" if feedback_only else "feedback", devices)
        if not feedback_only:
            self.counters.add("confirmed", devices[right])
            self.counters.add("corrected", devices[~right])
        pick = (rng.random(devices.size) * self.identity_count[devices]).astype(np.int64)
        truth = self.identity_table[devices, pick]
        rows = np.zeros(devices.size, dtype=np.int64)
        for m in range(len(self.model_ids)):
            sel = np.flatnonzero(self.model_of[devices] == m)
            if sel.size:
                rows[sel] = draw(m, devices[sel], truth[sel], rng)
        labels = truth.copy()
        wrong = rng.random(devices.size) < p.wrong_label_fraction
        if wrong.any() and self.num_classes > 1:
            shift = rng.integers(1, self.num_classes, int(wrong.sum()))
            labels[wrong] = (truth[wrong] + shift) % self.num_classes
            self.counters.add("wrong_labels", devices[wrong])
        self._append(devices, rows, labels.astype(np.int32), times)
        return int(devices.size)

    def _append(self, devices: I64, rows: I64, labels: npt.NDArray[np.int32], ts: F64) -> None:
        """Append samples (grouped by device, oldest first) to the rings, evicting the
        oldest unpinned samples that no longer fit."""
        c = self.params.cache_capacity
        n_new = np.bincount(devices, minlength=self.n)
        first = np.concatenate([[0], np.cumsum(n_new)[:-1]])
        rank = np.arange(devices.size) - first[devices]
        room = c - self.push_count  # pinned samples take their place in the cache
        kept_n = np.minimum(n_new, room)
        dropped = n_new - kept_n  # newer than the ring holds: only the last fit
        keep = rank >= dropped[devices]
        overflow = np.maximum(0, self.cache_count + kept_n - room)
        evicted = overflow + dropped
        if evicted.any():
            self.counters["evicted"][:] += evicted
            if self.release is not None:
                j = np.arange(int(overflow.max()))
                gone = j[None, :] < overflow[:, None]
                pos = (self.cache_head[:, None] + j[None, :]) % c
                self.release(
                    np.concatenate([self.cache_rows[np.nonzero(gone)[0], pos[gone]], rows[~keep]])
                )
        self.cache_head = (self.cache_head + overflow) % c
        self.cache_count -= overflow
        d, r = devices[keep], rank[keep] - dropped[devices[keep]]
        pos = (self.cache_head[d] + self.cache_count[d] + r) % c
        # Ids count every sample, dropped ones too: an id is never reused.
        ids = self.next_sample_id[d] + rank[keep].astype(np.uint64)
        self.next_sample_id += n_new.astype(np.uint64)
        self.cache_rows[d, pos] = rows[keep]
        self.cache_labels[d, pos] = labels[keep]
        self.cache_ids[d, pos] = ids
        self.cache_ts[d, pos] = ts[keep]
        self.cache_count += kept_n

    # ---------------------------------------------------------------- push policy

    def due(self, now: float) -> I64:
        """Devices that should send now: available, and either a new push (idle with at
        least ``push_batch`` cached) or a retry whose backoff has passed."""
        avail = self.available(now)
        new = (self.push_state == PushState.IDLE) & (self.cache_count >= self.params.push_batch)
        retry = (self.push_state == PushState.BACKOFF) & (self.retry_at <= now)
        return np.flatnonzero(avail & (new | retry)).astype(np.int64)

    def begin(self, devices: I64) -> None:
        """Pin the next push of ``devices`` (the oldest ``push_max`` cached samples of an
        idle device; a retry keeps its pinned samples) and mark them sending."""
        devices = np.asarray(devices, dtype=np.int64)
        fresh = devices[self.push_state[devices] == PushState.IDLE]
        if fresh.size:
            c, pm = self.params.cache_capacity, self.params.push_max
            take = np.minimum(self.cache_count[fresh], pm)
            j = np.arange(pm)
            valid = j[None, :] < take[:, None]
            pos = (self.cache_head[fresh, None] + j[None, :]) % c
            rows_d = np.broadcast_to(fresh[:, None], pos.shape)
            dd, pp, jj = rows_d[valid], pos[valid], np.broadcast_to(j, pos.shape)[valid]
            self.push_rows[dd, jj] = self.cache_rows[dd, pp]
            self.push_labels[dd, jj] = self.cache_labels[dd, pp]
            self.push_ids[dd, jj] = self.cache_ids[dd, pp]
            self.push_ts[dd, jj] = self.cache_ts[dd, pp]
            self.push_count[fresh] = take
            self.cache_head[fresh] = (self.cache_head[fresh] + take) % c
            self.cache_count[fresh] -= take
            self.push_attempt[fresh] = 0
        self.push_state[devices] = PushState.SENDING
        self.push_attempt[devices] += 1
        self.counters.add("push_attempts", devices)

    def pushed(self, k: int) -> tuple[I64, npt.NDArray[np.int32], npt.NDArray[np.uint64], F64]:
        """Device ``k``'s pinned push: bank rows, labels, sample ids, label times."""
        n = int(self.push_count[k])
        return (
            self.push_rows[k, :n],
            self.push_labels[k, :n],
            self.push_ids[k, :n],
            self.push_ts[k, :n],
        )

    def sent(self, devices: I64, nbytes: I64, now: float) -> None:
        """The pushes' bytes went on the wire: count them and price the transfer."""
        devices = np.asarray(devices, dtype=np.int64)
        nbytes = np.asarray(nbytes, dtype=np.int64)
        self.counters.add("bytes_up", devices, nbytes)
        seconds = (
            self.network.upload_seconds(nbytes, self.network_tier[devices])
            if self.params.simulate_transfer
            else np.zeros(devices.size)
        )
        self.push_done_at[devices] = now + seconds

    def acked(self, devices: I64, partitions: I64, offsets: I64) -> None:
        devices = np.asarray(devices, dtype=np.int64)
        self.push_state[devices] = PushState.ACKED
        self.push_partition[devices] = partitions
        self.push_offset[devices] = offsets

    def failed(self, devices: I64, now: float, rng: np.random.Generator) -> None:
        """Sends that failed: keep the samples pinned, retry after backoff."""
        devices = np.asarray(devices, dtype=np.int64)
        p = self.params
        self.push_state[devices] = PushState.BACKOFF
        self.retry_at[devices] = now + backoff_seconds(
            self.push_attempt[devices], p.backoff_base_s, p.backoff_max_s, rng
        )
        self.counters.add("retries", devices)

    def settle(
        self, now: float, *, ignore_transfer: bool = False, keep_ids: bool = False
    ) -> Settled:
        """Acknowledged pushes whose transfer time has passed leave the cache
        (``keep_ids``: the result lists their sample ids, for audits)."""
        done = self.push_state == PushState.ACKED
        if not ignore_transfer:
            done &= self.push_done_at <= now
        devices = np.flatnonzero(done).astype(np.int64)
        samples = self.push_count[devices].copy()
        oldest = self.push_ts[devices, 0].copy()
        ids = None
        if keep_ids:
            ids = [self.push_ids[k, :n].copy() for k, n in zip(devices, samples, strict=True)]
        settled = Settled(
            devices, samples, self.push_partition[devices], self.push_offset[devices], oldest, ids
        )
        if devices.size:
            if self.release is not None:
                j = np.arange(self.params.push_max)
                self.release(self.push_rows[devices][j[None, :] < samples[:, None]])
            self.counters.add("pushes", devices)
            self.counters.add("samples_pushed", devices, samples)
            self.freshness.record(devices, settled.partitions, settled.offsets, oldest)
            self.push_state[devices] = PushState.IDLE
            self.push_count[devices] = 0
            self.push_attempt[devices] = 0
        return settled

    # ---------------------------------------------------------------- versions

    def offer(
        self,
        model_index: int,
        version: int,
        accuracy: npt.ArrayLike,
        size_bytes: int,
        now: float,
        *,
        download: bool = True,
    ) -> I64:
        """A new best version of a model: its devices download it (simulated time) and
        activate it when :meth:`activate` sees the download done (``download=False``: it
        is already on the device, e.g. the base model shipped with the app). ``accuracy``
        is per device of that model, in fleet order. Returns those devices."""
        devices = np.flatnonzero(self.model_of == model_index).astype(np.int64)
        acc = np.asarray(accuracy, dtype=np.float32)
        if acc.shape != devices.shape:
            raise ConfigError(f"{acc.shape[0]} accuracies for {devices.size} devices")
        if download:
            self.counters.add("bytes_down", devices, size_bytes)
            self.counters.add("downloads", devices)
        seconds = (
            self.network.download_seconds(
                np.full(devices.size, size_bytes), self.network_tier[devices]
            )
            if self.params.simulate_transfer and download
            else np.zeros(devices.size)
        )
        self.pending_version[devices] = version
        self.pending_accuracy[devices] = acc
        self.pending_at[devices] = now + seconds
        return devices

    def activate(self, now: float) -> tuple[I64, I64, npt.NDArray[np.float32]]:
        """Downloads that finished by ``now`` become the active head. Returns (devices,
        versions, accuracy before) of those activated, and resolves freshness."""
        ready = np.flatnonzero((self.pending_version >= 0) & (self.pending_at <= now))
        versions = self.pending_version[ready].copy()
        before = self.accuracy[ready].copy()
        if ready.size:
            self.active_version[ready] = versions
            self.accuracy[ready] = self.pending_accuracy[ready]
            first = ready[np.isnan(self.first_accuracy[ready])]
            self.first_accuracy[first] = self.accuracy[first]
            self.activated_at[ready] = np.maximum(self.pending_at[ready], 0.0)
            self.pending_version[ready] = -1
            self.counters.add("versions_applied", ready)
            self.freshness.resolve(self.active_version, self.activated_at)
        return ready.astype(np.int64), versions, before

    # ---------------------------------------------------------------- views

    @property
    def cached(self) -> I64:
        """Samples each device holds: ring plus pinned push."""
        return self.cache_count + self.push_count

    def cached_ids(self, k: int) -> npt.NDArray[np.uint64]:
        """Sample ids device ``k`` holds (pinned first, then the ring, oldest first)."""
        c = self.params.cache_capacity
        ring = (self.cache_head[k] + np.arange(self.cache_count[k])) % c
        return np.concatenate([self.push_ids[k, : self.push_count[k]], self.cache_ids[k, ring]])

    def devices_of(self, model_index: int) -> I64:
        return np.flatnonzero(self.model_of == model_index).astype(np.int64)


def _sample_slots(
    n: int, width: int
) -> tuple[I64, npt.NDArray[np.int32], npt.NDArray[np.uint64], F64]:
    """``width`` empty sample slots per device: bank row, label, sample id, capture time."""
    return (
        np.zeros((n, width), dtype=np.int64),
        np.zeros((n, width), dtype=np.int32),
        np.zeros((n, width), dtype=np.uint64),
        np.zeros((n, width), dtype=np.float64),
    )


def _static_draws(global_index: I64, seed: int, columns: int = 8) -> F64:
    """Uniforms [n, columns] that depend on (seed, global index) only: one Philox stream
    per device would cost a Generator each; instead hash index and column with SplitMix64."""
    g = global_index.astype(np.uint64)[:, None]
    col = np.arange(columns, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        x = (g * np.uint64(0x9E3779B97F4A7C15)) ^ (col * np.uint64(0xBF58476D1CE4E5B9))
        x = x + np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return np.asarray((x >> np.uint64(11)).astype(np.float64) / float(1 << 53))


def _normal(u: F64) -> F64:
    """Standard normal quantile of uniforms (Acklam-free: a logistic approximation is
    plenty for spreading usage rates)."""
    u = np.clip(u, 1e-9, 1 - 1e-9)
    return np.asarray(np.log(u / (1 - u)) / 1.702)
