"""Every topic of the system, its partitions and configs, in one place.

No other module spells a topic name: they ask ``Topics`` for it. ``ensure_topics``
creates what is missing and brings the configs of what exists back to the spec, so it
can run at every start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import FedexError, KafkaUnavailableError
from pipeline.settings import Settings

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    FEATURES = "features"
    TRIGGERS = "triggers"
    MODELS = "models"
    DEADLETTER = "deadletter"
    # The aggregation agents' own topics.
    AGENTS_TICKS = "agents-ticks"
    AGENTS_SUMMARIES = "agents-summaries"
    # The FedAvg baseline's (``lab``), apart from the product's: see fedavg_topic_specs.
    FEDAVG_ROUNDS = "fedavg-rounds"
    FEDAVG_UPDATES = "fedavg-updates"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    role: Role
    name: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str]
    purpose: str


class _RoleTopic:
    """A deployment's topic of one role as an attribute (``topics.features``)."""

    def __init__(self, role: Role) -> None:
        self.role = role

    def __get__(self, topics: Topics, owner: type[Topics] | None = None) -> str:
        return topics.name(self.role)


class _AgentsTopic:
    """One of the aggregation agents' own topics, ``<agents app id>-<suffix>``."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def __get__(self, topics: Topics, owner: type[Topics] | None = None) -> str:
        return f"{topics.agents_app_id}-{self.suffix}"


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names for one deployment (one prefix)."""

    prefix: str

    def name(self, role: Role) -> str:
        return f"{self.prefix}.{role.value}"

    features = _RoleTopic(Role.FEATURES)
    triggers = _RoleTopic(Role.TRIGGERS)
    models = _RoleTopic(Role.MODELS)
    deadletter = _RoleTopic(Role.DEADLETTER)

    # The aggregation agents' own topics (created by the worker; named here so that every
    # reader, ``fedex audit`` included, agrees on them).
    @property
    def agents_app_id(self) -> str:
        """The agents' Faust app id and consumer group."""
        return f"{self.prefix}-agents"

    agents_ticks = _AgentsTopic("ticks")
    agents_summaries = _AgentsTopic("summaries")
    #: The changelog of the agents' per-model table (Faust's ``<app>-<table>-changelog``).
    agents_changelog = _AgentsTopic("models-changelog")

    # The FedAvg baseline's, apart from the product's.
    fedavg_rounds = _RoleTopic(Role.FEDAVG_ROUNDS)
    fedavg_updates = _RoleTopic(Role.FEDAVG_UPDATES)


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The specs of every topic, derived from the settings."""
    topics = Topics(settings.topic_prefix)
    rf = settings.replication_factor
    # Pushes are keyed by model id; one push must fit with headroom for the batch framing.
    feature_max = str(settings.max_push_bytes + 64 * 1024)
    return [
        TopicSpec(
            Role.FEATURES,
            topics.features,
            settings.features_partitions,
            rf,
            {
                "cleanup.policy": "delete",
                "retention.ms": str(settings.training_window_ms),
                "max.message.bytes": feature_max,
            },
            "feature+label pushes from devices; the training set (retention = training window)",
        ),
        TopicSpec(
            Role.TRIGGERS,
            topics.triggers,
            settings.triggers_partitions,
            rf,
            {"cleanup.policy": "delete", "retention.ms": str(settings.training_window_ms)},
            "training jobs emitted by the aggregation agents",
        ),
        TopicSpec(
            Role.MODELS,
            topics.models,
            settings.models_partitions,
            rf,
            {
                # Keyed <model_id>/<version>, sent to the model's partition (co-partitioned
                # with the feature log for the agents). Compaction keeps every version (the
                # best included); only closed segments are compacted.
                "cleanup.policy": "compact",
                "max.message.bytes": str(settings.max_message_bytes),
                "min.compaction.lag.ms": "60000",
            },
            "model updates (checkpoint inline when it fits); the model registry",
        ),
        TopicSpec(
            Role.DEADLETTER,
            topics.deadletter,
            1,
            rf,
            {
                "cleanup.policy": "delete",
                "retention.ms": str(settings.training_window_ms),
                "max.message.bytes": feature_max,
            },
            "records that failed validation, with their origin and reason",
        ),
        # The agents' own (their table's changelog is Faust's to create): co-partitioned
        # with the feature log.
        TopicSpec(
            Role.AGENTS_TICKS,
            topics.agents_ticks,
            settings.features_partitions,
            rf,
            {"cleanup.policy": "delete", "retention.ms": str(3_600_000)},
            "agents-internal: timer ticks, one per owned partition and tick",
        ),
        TopicSpec(
            Role.AGENTS_SUMMARIES,
            topics.agents_summaries,
            settings.features_partitions,
            rf,
            # A summary not yet counted is pending data: kept as long as the feature log.
            {"cleanup.policy": "delete", "retention.ms": str(settings.training_window_ms)},
            "agents-internal: batch summaries of validated pushes",
        ),
    ]


def fedavg_topic_specs(settings: Settings) -> list[TopicSpec]:
    """The FedAvg baseline's topics (``lab``): not the product's, so ``topic_specs`` and
    ``fedex topics ensure`` leave them out. One partition each, so a run's records stay in
    order."""
    topics = Topics(settings.topic_prefix)
    config = {
        "cleanup.policy": "delete",
        "retention.ms": str(settings.training_window_ms),
        "max.message.bytes": str(settings.max_message_bytes),
    }
    rf = settings.replication_factor
    return [
        TopicSpec(
            Role.FEDAVG_ROUNDS,
            topics.fedavg_rounds,
            1,
            rf,
            config,
            "FedAvg baseline: the server's global head per round, and who trains on it",
        ),
        TopicSpec(
            Role.FEDAVG_UPDATES,
            topics.fedavg_updates,
            1,
            rf,
            config,
            "FedAvg baseline: devices' model deltas (or gradients) per round",
        ),
    ]


# --------------------------------------------------------------------------- ensure / describe
#
# The comparison of wanted and actual state is pure (``plan_topic``); the admin calls
# around it are a thin shell. Kafka's (non-incremental) AlterConfigs *replaces* every
# dynamic config of a topic, so an alteration sends our wanted configs merged over the
# topic's other dynamic overrides, which therefore survive.
#
# aiokafka is imported inside the functions: importing this module for topic names must
# work where aiokafka is not installed (the trainer's GPU image runs without Kafka).

#: DescribeConfigs ``config_source`` of a value set on the topic itself.
CONFIG_SOURCE_TOPIC = 1
#: Kafka's CreateTopics error for a topic that appeared since we looked (a concurrent ensure).
TOPIC_ALREADY_EXISTS = 36
#: Configs ``describe_topics`` reports even when a spec does not set them.
REPORTED_CONFIGS = ("cleanup.policy", "retention.ms", "max.message.bytes")


class TopicsError(FedexError):
    """A topic could not be created, resized or reconfigured; the message says which and why."""


class TopicAction(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class TopicState:
    """A topic as the cluster has it. ``config`` maps every config name to its effective
    value; ``dynamic`` is the subset set on the topic itself (not broker defaults)."""

    name: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str]
    dynamic: Mapping[str, str]
    #: Every partition has a leader (a new partition lacks one for a moment).
    has_leaders: bool = True


@dataclass(frozen=True, slots=True)
class TopicPlan:
    """What ``ensure_topics`` does to one topic. Empty plan = nothing to do."""

    spec: TopicSpec
    create: bool = False
    new_partitions: int | None = None
    config_changes: Mapping[str, tuple[str | None, str]] = dataclasses.field(default_factory=dict)
    alter_configs: Mapping[str, str] | None = None
    warnings: tuple[str, ...] = ()

    @property
    def action(self) -> TopicAction:
        if self.create:
            return TopicAction.CREATED
        if self.new_partitions is not None or self.config_changes:
            return TopicAction.UPDATED
        return TopicAction.UNCHANGED


@dataclass(frozen=True, slots=True)
class TopicReport:
    name: str
    action: TopicAction
    partitions: int
    #: config name -> (value before, value now); ``None`` before = was unset/default.
    config_changes: Mapping[str, tuple[str | None, str]]
    partitions_before: int | None
    warnings: tuple[str, ...]

    def changes(self) -> list[str]:
        """What was changed on an existing topic, one phrase per change."""
        parts = []
        if self.partitions_before is not None and self.partitions_before != self.partitions:
            parts.append(f"partitions {self.partitions_before} -> {self.partitions}")
        parts += [f"{k} {old!r} -> {new!r}" for k, (old, new) in self.config_changes.items()]
        return parts

    def describe(self) -> str:
        parts = [f"{self.name}: {self.action}", *self.changes()]
        parts += [f"WARNING {w}" for w in self.warnings]
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class EnsureReport:
    """The outcome of ``ensure_topics``, one entry per spec in spec order."""

    topics: tuple[TopicReport, ...]

    def names(self, action: TopicAction) -> list[str]:
        return [t.name for t in self.topics if t.action is action]

    @property
    def created(self) -> list[str]:
        return self.names(TopicAction.CREATED)

    @property
    def updated(self) -> list[str]:
        return self.names(TopicAction.UPDATED)

    @property
    def unchanged(self) -> list[str]:
        return self.names(TopicAction.UNCHANGED)

    @property
    def changed(self) -> bool:
        return any(t.action is not TopicAction.UNCHANGED for t in self.topics)

    @property
    def warnings(self) -> list[str]:
        return [f"{t.name}: {w}" for t in self.topics for w in t.warnings]

    def summary(self) -> str:
        return (
            f"{len(self.created)} created, {len(self.updated)} updated, "
            f"{len(self.unchanged)} unchanged"
        )


@dataclass(frozen=True, slots=True)
class TopicDescription:
    """A spec next to what the cluster has (``state`` None = the topic does not exist)."""

    spec: TopicSpec
    state: TopicState | None

    @property
    def exists(self) -> bool:
        return self.state is not None

    def config(self, name: str) -> str | None:
        return self.state.config.get(name) if self.state else None

    @property
    def drift(self) -> Mapping[str, tuple[str | None, str]]:
        """Configs whose effective value differs from the spec (all of them if missing)."""
        actual = self.state.config if self.state else {}
        return diff_configs(self.spec.config, actual)


def normalize_config_value(name: str, value: str) -> str:
    """Canonical form for comparison: list-valued configs are order-insensitive sets."""
    value = value.strip()
    if name == "cleanup.policy":
        return ",".join(sorted(p.strip() for p in value.split(",") if p.strip()))
    return value


def diff_configs(
    wanted: Mapping[str, str], actual: Mapping[str, str]
) -> dict[str, tuple[str | None, str]]:
    """Wanted configs whose actual effective value differs: name -> (actual or None, wanted).
    Configs the spec does not mention are not compared."""
    changes: dict[str, tuple[str | None, str]] = {}
    for name, want in wanted.items():
        have = actual.get(name)
        if have is None or normalize_config_value(name, have) != normalize_config_value(name, want):
            changes[name] = (have, want)
    return changes


def plan_topic(spec: TopicSpec, state: TopicState | None) -> TopicPlan:
    """Compare a spec with the cluster's state of that topic; decide what to change.

    Partitions only grow (Kafka cannot shrink a topic); a replication factor that differs
    is reported, not changed (that needs a reassignment, an operator's decision).
    """
    if state is None:
        return TopicPlan(spec=spec, create=True)
    warnings: list[str] = []
    new_partitions = None
    if state.partitions < spec.partitions:
        new_partitions = spec.partitions
    elif state.partitions > spec.partitions:
        warnings.append(
            f"has {state.partitions} partitions, spec says {spec.partitions}; "
            "Kafka cannot shrink a topic, leaving it"
        )
    if state.replication_factor != spec.replication_factor:
        warnings.append(
            f"replication factor is {state.replication_factor}, spec says "
            f"{spec.replication_factor}; change it with a partition reassignment"
        )
    changes = diff_configs(spec.config, state.config)
    alter = {**state.dynamic, **spec.config} if changes else None
    return TopicPlan(
        spec=spec,
        new_partitions=new_partitions,
        config_changes=changes,
        alter_configs=alter,
        warnings=tuple(warnings),
    )


def _check_error(what: str, name: str, code: int, message: str | None) -> None:
    if code:
        from aiokafka.errors import for_code

        err = for_code(code).__name__
        raise TopicsError(f"{what} {name!r} failed: {err} ({code}) {message or ''}".rstrip())


async def _read_states(admin: Any, names: list[str]) -> dict[str, TopicState]:
    """The states of those of ``names`` that exist."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    # Metadata of *all* topics: asking for named topics makes a broker with
    # auto.create.topics.enable (the default) create them with broker defaults.
    wanted = set(names)
    metadata = await admin.describe_topics(None)
    layout: dict[str, tuple[int, int, bool]] = {}
    for topic in metadata:
        parts = topic["partitions"]
        if topic["topic"] in wanted and topic["error_code"] == 0 and parts:
            replicas = max(len(p["replicas"]) for p in parts)
            leaders = all(p["leader"] >= 0 for p in parts)
            layout[topic["topic"]] = (len(parts), replicas, leaders)
    if not layout:
        return {}
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name) for name in layout]
    )
    states: dict[str, TopicState] = {}
    for response in responses:
        for resource in response.to_object()["resources"]:
            name = resource["resource_name"]
            _check_error("describing configs of topic", name, resource["error_code"], None)
            config: dict[str, str] = {}
            dynamic: dict[str, str] = {}
            for entry in resource["config_entries"]:
                key, value = entry["config_names"], entry["config_value"]
                if value is None:
                    continue
                config[key] = value
                if entry.get("config_source") == CONFIG_SOURCE_TOPIC:
                    dynamic[key] = value
            partitions, replicas, leaders = layout[name]
            states[name] = TopicState(name, partitions, replicas, config, dynamic, leaders)
    return states


async def _wait_until_applied(admin: Any, specs: Sequence[TopicSpec], within: float) -> None:
    """Changes go through the KRaft controller and reach the broker's metadata a moment
    later. Wait until the broker shows them (and new partitions have leaders) so that the
    caller gets usable topics and an immediate second ensure reports "unchanged"."""
    deadline = time.monotonic() + within
    while True:
        states = await _read_states(admin, [s.name for s in specs])
        pending = [
            spec.name
            for spec in specs
            if (state := states.get(spec.name)) is None
            or not state.has_leaders
            or plan_topic(spec, state).action is not TopicAction.UNCHANGED
        ]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TopicsError(
                f"topics {pending} do not show the changes (or have no leader) {within:g} s "
                "after they were made; check the broker log"
            )
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _admin(bootstrap: str) -> AsyncIterator[Any]:
    from pipeline.clients import make_admin

    admin = make_admin(bootstrap=bootstrap)
    try:
        await admin.start()
    except Exception as exc:
        await admin.close()
        raise KafkaUnavailableError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    try:
        yield admin
    finally:
        await admin.close()


async def ensure_topics(
    bootstrap: str, specs: Sequence[TopicSpec], *, settle_timeout: float = 30.0
) -> EnsureReport:
    """Bring the cluster's topics to ``specs``: create what is missing, add partitions where
    there are fewer, reset configs that differ. Idempotent; safe to run at every start-up and
    from several processes at once. Returns what it did, per topic."""
    from aiokafka.admin import NewPartitions, NewTopic

    names = [s.name for s in specs]
    async with _admin(bootstrap) as admin:
        states = await _read_states(admin, names)
        plans = [plan_topic(spec, states.get(spec.name)) for spec in specs]

        to_create = [p.spec for p in plans if p.create]
        raced: set[str] = set()
        if to_create:
            response = await admin.create_topics(
                [
                    NewTopic(
                        s.name, s.partitions, s.replication_factor, topic_configs=dict(s.config)
                    )
                    for s in to_create
                ]
            )
            for error in response.topic_errors:
                name, code = error[0], error[1]
                message = error[2] if len(error) > 2 else None
                if code == TOPIC_ALREADY_EXISTS:
                    raced.add(name)  # a concurrent ensure won; re-plan it below
                    continue
                _check_error("creating topic", name, code, message)
        if raced:
            raced_states = await _read_states(admin, sorted(raced))
            plans = [
                plan_topic(p.spec, raced_states.get(p.spec.name)) if p.spec.name in raced else p
                for p in plans
            ]

        grow = {p.spec.name: NewPartitions(p.new_partitions) for p in plans if p.new_partitions}
        if grow:
            await admin.create_partitions(grow)

        from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

        alters = [
            ConfigResource(ConfigResourceType.TOPIC, p.spec.name, dict(p.alter_configs))
            for p in plans
            if p.alter_configs is not None
        ]
        if alters:
            for response in await admin.alter_configs(alters):
                for resource in response.to_object()["resources"]:
                    _check_error(
                        "altering configs of topic",
                        resource["resource_name"],
                        resource["error_code"],
                        resource["error_message"],
                    )

        if to_create or grow or alters:
            await _wait_until_applied(admin, specs, settle_timeout)

    reports = []
    for plan in plans:
        before = states.get(plan.spec.name)
        partitions = plan.new_partitions or (before.partitions if before else plan.spec.partitions)
        changes = dict(plan.config_changes) if before else {}
        report = TopicReport(
            name=plan.spec.name,
            action=plan.action,
            partitions=partitions,
            config_changes=changes,
            partitions_before=before.partitions if before else None,
            warnings=plan.warnings,
        )
        if report.action is not TopicAction.UNCHANGED or report.warnings:
            log.info("topic %s", report.describe())
        reports.append(report)
    return EnsureReport(tuple(reports))


async def describe_topics(bootstrap: str, specs: Sequence[TopicSpec]) -> list[TopicDescription]:
    """Each spec with the cluster's partitions and effective configs of that topic."""
    async with _admin(bootstrap) as admin:
        states = await _read_states(admin, [s.name for s in specs])
    return [TopicDescription(spec, states.get(spec.name)) for spec in specs]
