"""The exactly-once audit, pure: topics' records in, a per-model account and violations out.

``fedex audit`` (:mod:`pipeline.audit_log` reads the topics) feeds an :class:`Auditor` the
model topic, the triggers, the dead letters, the agents' table changelog and then the
feature log, and asks it for an :class:`AuditReport`. The invariants it checks are the
ones in ``docs/invariants.md``:

1. Every record of the feature log is a push of a known model that fits it, or
   dead-lettered with a reason (``rejected_not_dead_lettered``, ``unknown_model``).
2. Every valid push is in exactly one place: the ranges of one trigger whose version is
   published (trained), the job in flight, or the agents' pending ranges; or beyond the
   offset the agents have counted so far (ingest lag, not yet counted). A push below that
   offset in none of them is ``orphaned`` (counted, then dropped: the lost update); one in
   two triggers is ``in_two_triggers``; one in a trigger that has no version and is not in
   flight is ``trigger_without_version``.
3. One trigger id has one set of ranges and one sample count (``trigger_ranges_differ``),
   equal to the version's ``trigger_ranges`` (``version_ranges_differ``), and counts the
   samples of the valid pushes in its ranges (``trigger_count_mismatch``).
4. One trigger id has one version (``versions_per_trigger``); a version is published once
   or identically (``version_republished``); versions are monotone (``versions_not_monotone``).
5. The trainer's reported train/validation counts equal those rebuilt from the log with the
   trainer's own rules (:mod:`pipeline.samples`: a sample is new in the job whose ranges
   hold its first copy; it is validation by :class:`~pipeline.samples.ValidationRule`, its
   device's hash or its key's) (``train_counts_differ``). Every sample is therefore new in
   exactly one version, trained or held out there. Samples a job replays from earlier jobs
   (``replay_samples`` in its metrics) are counted apart and are no violation.

Checks on offsets below the log's start (retention) are skipped and counted as aged out.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pipeline import codec
from pipeline.records import (
    DeadLetter,
    FeaturePush,
    ModelUpdate,
    OffsetRange,
    RecordError,
    TrainingTrigger,
    version_for_trigger,
)
from pipeline.samples import OTHER_MODEL, ModelFit, ValidationRule, accept_push

_VERSION = re.compile(r"v(?P<n>[0-9]+)")


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant: its ``kind`` (see the module docstring), the model, and a
    message with the ids and offsets to look at."""

    kind: str
    model_id: str | None
    detail: str


@dataclass(slots=True)
class ModelAccount:
    """Where one model's pushes and samples are. Sample counts include re-sent copies
    except ``distinct``, ``trained_samples`` and the train/val counts."""

    model_id: str
    pushes: int = 0
    samples: int = 0
    distinct: int = 0
    copies: int = 0
    trained_pushes: int = 0
    trained_samples: int = 0
    in_flight_pushes: int = 0
    pending_pushes: int = 0
    uncounted_pushes: int = 0
    orphaned_pushes: int = 0
    orphaned_samples: int = 0
    dead_lettered: int = 0
    triggers: int = 0
    versions: int = 0
    train_samples: int = 0
    val_samples: int = 0
    #: Samples the versions trained again from earlier jobs (each sample counts once per
    #: version that replayed it).
    replay_samples: int = 0


@dataclass(frozen=True, slots=True)
class AuditReport:
    models: tuple[ModelAccount, ...]
    violations: tuple[Violation, ...]
    feature_records: int
    dead_letters: int
    triggers: int
    updates: int
    aged_out_triggers: int = 0

    @property
    def clean(self) -> bool:
        return not self.violations

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "feature_records": self.feature_records,
            "dead_letters": self.dead_letters,
            "triggers": self.triggers,
            "updates": self.updates,
            "aged_out_triggers": self.aged_out_triggers,
            "models": [asdict(m) for m in self.models],
            "violations": [asdict(v) for v in self.violations],
        }


@dataclass(slots=True)
class _Pushes:
    """One model's valid pushes, columnar: one row per push, one per sample."""

    partitions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    sample_push: list[npt.NDArray[np.int64]] = field(default_factory=list)
    sample_device: list[npt.NDArray[np.int64]] = field(default_factory=list)
    sample_ids: list[npt.NDArray[np.uint64]] = field(default_factory=list)


class Auditor:
    """Folds the topics of one deployment, in this order: :meth:`add_dead_letter`,
    :meth:`add_update` (model topic), :meth:`add_trigger`, :meth:`add_state` (the agents'
    changelog, last value per model wins), :meth:`add_feature_record`; then
    :meth:`report`. ``log_start`` maps feature-log partitions to their first offset.
    ``val_fraction`` and ``val_device_fraction`` must be the trainers' (their validation
    rule is rebuilt)."""

    def __init__(
        self,
        *,
        features_topic: str,
        val_fraction: float,
        val_device_fraction: float = 0.0,
        max_push_samples: int = codec.DEFAULT_MAX_SAMPLES,
    ) -> None:
        self.features_topic = features_topic
        self.validation = ValidationRule(val_fraction, val_device_fraction)
        self.max_push_samples = max_push_samples
        self.log_start: dict[int, int] = {}
        self._fits: dict[str, ModelFit] = {}
        self._updates: dict[str, list[ModelUpdate]] = defaultdict(list)
        self._triggers: dict[str, list[TrainingTrigger]] = defaultdict(list)
        self._dead: dict[tuple[str, int, int], DeadLetter] = {}
        self._dead_count = 0
        self._states: dict[str, dict[str, Any]] = {}
        self._pushes: dict[str, _Pushes] = defaultdict(_Pushes)
        self._devices: dict[str, int] = {}
        self._records = 0
        self._violations: list[Violation] = []
        self._accounts: dict[str, ModelAccount] = {}

    # ----------------------------------------------------------------- input

    def add_update(self, update: ModelUpdate) -> None:
        self._updates[update.model_id].append(update)
        self._fits[update.model_id] = ModelFit(
            update.model_id,
            update.backbone,
            update.cut,
            update.num_classes,
            self.max_push_samples,
        )

    def add_trigger(self, trigger: TrainingTrigger) -> None:
        self._triggers[trigger.model_id].append(trigger)

    def add_dead_letter(self, letter: DeadLetter) -> None:
        self._dead_count += 1
        self._dead[(letter.topic, letter.partition, letter.offset)] = letter

    def dead_lettered(self, topic: str, partition: int, offset: int) -> bool:
        return (topic, partition, offset) in self._dead

    def undecodable(self, topic: str, partition: int, offset: int, exc: Exception) -> None:
        """A record of a control topic that does not decode and was not dead-lettered."""
        if not self.dead_lettered(topic, partition, offset):
            self._violate("undecodable", None, f"{topic}[{partition}]@{offset}: {exc}")

    def add_state(self, model_id: str, fields: Mapping[str, Any] | None) -> None:
        if fields is None:
            self._states.pop(model_id, None)
        else:
            self._states[model_id] = dict(fields)

    def add_feature_record(
        self, partition: int, offset: int, key: bytes | None, value: bytes | None
    ) -> None:
        self._records += 1
        self.log_start.setdefault(partition, offset)
        letter = self._dead.get((self.features_topic, partition, offset))
        model_id = codec.decode_key(key)
        if letter is not None:
            if model_id is not None and model_id in self._fits:
                self._account(model_id).dead_lettered += 1
            if not letter.reason:
                self._violate(
                    "dead_letter_without_reason", model_id, f"{partition}@{offset}: no reason"
                )
            return
        if model_id is None or model_id not in self._fits:
            self._violate(
                "unknown_model",
                model_id,
                f"record {partition}@{offset} (key {key!r:.40}) is of no model on the model "
                "topic and was not dead-lettered",
            )
            return
        accepted = accept_push(key, value, self._fits[model_id])
        if isinstance(accepted, str):
            reason = "key does not match the push's model" if accepted == OTHER_MODEL else accepted
            self._violate(
                "rejected_not_dead_lettered",
                model_id,
                f"record {partition}@{offset} is not a valid push ({reason}) and has no "
                "dead letter",
            )
            return
        self._keep(model_id, partition, offset, accepted)

    def _keep(self, model_id: str, partition: int, offset: int, push: FeaturePush) -> None:
        rows = self._pushes[model_id]
        index = len(rows.offsets)
        rows.partitions.append(partition)
        rows.offsets.append(offset)
        rows.sizes.append(push.n)
        device = self._devices.setdefault(push.device_id, len(self._devices))
        rows.sample_push.append(np.full(push.n, index, np.int64))
        rows.sample_device.append(np.full(push.n, device, np.int64))
        rows.sample_ids.append(np.asarray(push.sample_ids, np.uint64))

    # ----------------------------------------------------------------- checks

    def report(self) -> AuditReport:
        aged = 0
        models = sorted(set(self._fits) | set(self._triggers) | set(self._pushes))
        names = {index: name for name, index in self._devices.items()}
        for model_id in models:
            aged += self._check_model(model_id, names)
        return AuditReport(
            models=tuple(self._account(m) for m in models),
            violations=tuple(self._violations),
            feature_records=self._records,
            dead_letters=self._dead_count,
            triggers=sum(len(t) for t in self._triggers.values()),
            updates=sum(len(u) for u in self._updates.values()),
            aged_out_triggers=aged,
        )

    def _check_model(self, model_id: str, device_names: Mapping[int, str]) -> int:
        account = self._account(model_id)
        triggers = self._distinct_triggers(model_id)
        versions = self._versions(model_id)
        account.triggers = len(triggers)
        account.versions = sum(1 for v in versions if v != "v0")
        state = self._states.get(model_id) or {}
        flight = state.get("in_flight") or {}
        rows = self._pushes.get(model_id, _Pushes())
        partitions = np.asarray(rows.partitions, np.int64)
        offsets = np.asarray(rows.offsets, np.int64)
        sizes = np.asarray(rows.sizes, np.int64)
        account.pushes = len(offsets)
        account.samples = int(sizes.sum())

        # Where every push is.
        owner = np.full(len(offsets), -1, np.int64)  # index into `ids`, -1 none
        ids = sorted(triggers, key=_seq)
        for i, trigger_id in enumerate(ids):
            inside = _inside(partitions, offsets, triggers[trigger_id].ranges)
            twice = inside & (owner >= 0)
            for j in np.flatnonzero(twice)[:3].tolist():
                self._violate(
                    "in_two_triggers",
                    model_id,
                    f"push {partitions[j]}@{offsets[j]} is in {ids[owner[j]]} and {trigger_id}",
                )
            owner[inside & (owner < 0)] = i
        pending = _inside(partitions, offsets, _ranges(state.get("pending_ranges", [])))
        next_offsets = {int(p): int(o) for p, o in state.get("next_offsets", [])}
        counted = offsets < np.asarray([next_offsets.get(int(p), 0) for p in partitions], np.int64)
        trained_ids = {t for t in ids if version_for(t) in versions}
        in_flight_id = flight.get("trigger_id")
        trained = np.isin(owner, [ids.index(t) for t in trained_ids])
        flying = ~trained & (owner == (ids.index(in_flight_id) if in_flight_id in triggers else -2))
        # A job written ahead of its trigger, the trigger not (yet) on the topic.
        flying |= (owner < 0) & _inside(partitions, offsets, _ranges(flight.get("ranges", [])))
        without = (owner >= 0) & ~trained & ~flying
        for j in np.flatnonzero(without)[:3].tolist():
            self._violate(
                "trigger_without_version",
                model_id,
                f"push {partitions[j]}@{offsets[j]} is in {ids[owner[j]]}, which has no "
                "published version and is not the job in flight",
            )
        both = (owner >= 0) & pending
        for j in np.flatnonzero(both)[:3].tolist():
            self._violate(
                "in_two_triggers",
                model_id,
                f"push {partitions[j]}@{offsets[j]} is in {ids[owner[j]]} and still pending",
            )
        nowhere = (owner < 0) & ~pending & ~flying
        orphaned = nowhere & counted
        account.trained_pushes = int(trained.sum())
        account.in_flight_pushes = int(flying.sum())
        account.pending_pushes = int((pending & (owner < 0) & ~flying).sum())
        account.uncounted_pushes = int((nowhere & ~counted).sum())
        account.orphaned_pushes = int(orphaned.sum())
        account.orphaned_samples = int(sizes[orphaned].sum())
        if account.orphaned_pushes:
            where = ", ".join(
                f"{p}@{o}"
                for p, o in zip(partitions[orphaned][:8], offsets[orphaned][:8], strict=True)
            )
            self._violate(
                "orphaned",
                model_id,
                f"{account.orphaned_pushes} pushes ({account.orphaned_samples} samples) were "
                "counted by the agents but are in no trigger, not in flight and not "
                f"pending: {where}",
            )

        self._check_triggers(model_id, triggers, versions, partitions, offsets, sizes)
        self._check_versions(model_id)
        return self._check_samples(model_id, rows, ids, owner, versions, triggers, device_names)

    def _distinct_triggers(self, model_id: str) -> dict[str, TrainingTrigger]:
        """The first emission of every trigger id; differing re-emissions are violations."""
        first: dict[str, TrainingTrigger] = {}
        for trigger in self._triggers.get(model_id, []):
            seen = first.setdefault(trigger.trigger_id, trigger)
            if (seen.ranges, seen.sample_count) != (trigger.ranges, trigger.sample_count):
                self._violate(
                    "trigger_ranges_differ",
                    model_id,
                    f"{trigger.trigger_id} attempt {seen.attempt}: {_fmt(seen.ranges)} "
                    f"({seen.sample_count} samples); attempt {trigger.attempt}: "
                    f"{_fmt(trigger.ranges)} ({trigger.sample_count} samples)",
                )
        return first

    def _versions(self, model_id: str) -> dict[str, ModelUpdate]:
        out: dict[str, ModelUpdate] = {}
        for update in self._updates.get(model_id, []):
            out.setdefault(update.version, update)
        return out

    def _check_triggers(
        self,
        model_id: str,
        triggers: Mapping[str, TrainingTrigger],
        versions: Mapping[str, ModelUpdate],
        partitions: npt.NDArray[np.int64],
        offsets: npt.NDArray[np.int64],
        sizes: npt.NDArray[np.int64],
    ) -> None:
        by_trigger: dict[str, set[str]] = defaultdict(set)
        for published in self._updates.get(model_id, []):
            if published.trigger_id is not None:
                by_trigger[published.trigger_id].add(published.version)
        for trigger_id, names in sorted(by_trigger.items()):
            if len(names) > 1:
                self._violate(
                    "versions_per_trigger", model_id, f"{trigger_id} has versions {sorted(names)}"
                )
        for trigger_id, trigger in triggers.items():
            update = versions.get(version_for(trigger_id))
            if (
                update is not None
                and update.trigger_ranges
                and (update.trigger_ranges != trigger.ranges)
            ):
                self._violate(
                    "version_ranges_differ",
                    model_id,
                    f"{update.version} trained {_fmt(update.trigger_ranges)}, its trigger "
                    f"{trigger_id} names {_fmt(trigger.ranges)}",
                )
            if self._aged_out(trigger.ranges):
                continue
            counted = int(sizes[_inside(partitions, offsets, trigger.ranges)].sum())
            if counted != trigger.sample_count:
                self._violate(
                    "trigger_count_mismatch",
                    model_id,
                    f"{trigger_id} says {trigger.sample_count} samples; its ranges "
                    f"{_fmt(trigger.ranges)} hold {counted} in valid pushes",
                )

    def _check_versions(self, model_id: str) -> None:
        seen: dict[str, ModelUpdate] = {}
        last = -1
        for update in self._updates.get(model_id, []):
            earlier = seen.get(update.version)
            if earlier is not None:
                if (earlier.sha256, earlier.trigger_id) != (update.sha256, update.trigger_id):
                    self._violate(
                        "version_republished",
                        model_id,
                        f"{update.version} was published twice with different content",
                    )
                continue
            seen[update.version] = update
            match = _VERSION.fullmatch(update.version)
            number = int(match["n"]) if match else -1
            if number <= last:
                self._violate(
                    "versions_not_monotone",
                    model_id,
                    f"{update.version} was published after v{last}",
                )
            last = max(last, number)

    def _check_samples(
        self,
        model_id: str,
        rows: _Pushes,
        ids: list[str],
        owner: npt.NDArray[np.int64],
        versions: Mapping[str, ModelUpdate],
        triggers: Mapping[str, TrainingTrigger],
        device_names: Mapping[int, str],
    ) -> int:
        """Rebuilds every trained job's new samples (first copy in its ranges) and compares
        its train/val counts (the trainers' validation rule) with the version's. Returns
        the triggers not checked because their ranges begin before the log does."""
        account = self._account(model_id)
        if not rows.sample_push:
            return 0
        push = np.concatenate(rows.sample_push)
        device = np.concatenate(rows.sample_device)
        sample = np.concatenate(rows.sample_ids)
        partitions = np.asarray(rows.partitions, np.int64)[push]
        offsets = np.asarray(rows.offsets, np.int64)[push]
        # First copy per (device, sample id): sort by key, then by log position.
        order = np.lexsort((offsets, partitions, sample, device))
        key_change = np.ones(len(order), np.bool_)
        key_change[1:] = (device[order][1:] != device[order][:-1]) | (
            sample[order][1:] != sample[order][:-1]
        )
        first = order[key_change]
        account.distinct = len(first)
        account.copies = len(order) - len(first)
        first_owner = owner[push[first]]
        aged = 0
        for i, trigger_id in enumerate(ids):
            update = versions.get(version_for(trigger_id))
            if update is None:
                continue
            rows_of_job = first[first_owner == i]
            account.trained_samples += len(rows_of_job)
            keys = [(device_names[int(device[r])], int(sample[r])) for r in rows_of_job.tolist()]
            val = int(self.validation.mask(model_id, keys).sum()) if keys else 0
            train = len(keys) - val
            account.train_samples += update.metrics.train_samples
            account.val_samples += update.metrics.val_samples
            account.replay_samples += update.metrics.replay_samples
            if self._aged_out(triggers[trigger_id].ranges):
                aged += 1
                continue
            if (train, val) != (update.metrics.train_samples, update.metrics.val_samples):
                self._violate(
                    "train_counts_differ",
                    model_id,
                    f"{update.version} ({trigger_id}) reports {update.metrics.train_samples} "
                    f"train / {update.metrics.val_samples} val samples; the log gives "
                    f"{train} / {val} (first copies in its ranges, validation by device and "
                    "sample hash)",
                )
        return aged

    # ----------------------------------------------------------------- helpers

    def _aged_out(self, ranges: Iterable[OffsetRange]) -> bool:
        return any(r.start < self.log_start.get(r.partition, 0) for r in ranges if r.end > r.start)

    def _account(self, model_id: str) -> ModelAccount:
        account = self._accounts.get(model_id)
        if account is None:
            account = self._accounts[model_id] = ModelAccount(model_id)
        return account

    def _violate(self, kind: str, model_id: str | None, detail: str) -> None:
        self._violations.append(Violation(kind, model_id, detail))


def version_for(trigger_id: str) -> str:
    try:
        return version_for_trigger(trigger_id)
    except RecordError:
        return f"?{trigger_id}"


def _seq(trigger_id: str) -> tuple[int, str]:
    match = _VERSION.fullmatch(version_for(trigger_id))
    return (int(match["n"]) if match else -1, trigger_id)


def _ranges(raw: Iterable[Iterable[int]]) -> tuple[OffsetRange, ...]:
    return tuple(OffsetRange(int(p), int(s), int(e)) for p, s, e in raw)


def _inside(
    partitions: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
    ranges: Iterable[OffsetRange],
) -> npt.NDArray[np.bool_]:
    mask = np.zeros(len(offsets), np.bool_)
    for r in ranges:
        mask |= (partitions == r.partition) & (offsets >= r.start) & (offsets < r.end)
    return mask


def _fmt(ranges: Iterable[OffsetRange]) -> str:
    return ", ".join(f"{r.partition}:[{r.start},{r.end})" for r in ranges) or "no ranges"
