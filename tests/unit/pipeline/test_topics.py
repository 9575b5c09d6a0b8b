"""Topic specs and the pure planning behind ensure_topics; no broker."""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.settings import Settings
from pipeline.topics import (
    EnsureReport,
    Role,
    TopicAction,
    TopicDescription,
    TopicReport,
    Topics,
    TopicSpec,
    TopicState,
    diff_configs,
    fedavg_topic_specs,
    plan_topic,
    topic_specs,
)


def _spec(partitions: int = 6, config: Mapping[str, str] | None = None) -> TopicSpec:
    return TopicSpec(
        Role.MODELS,
        "p.models",
        partitions,
        1,
        config if config is not None else {"cleanup.policy": "compact", "retention.ms": "1000"},
        "models",
    )


def _state(
    partitions: int = 6,
    config: Mapping[str, str] | None = None,
    dynamic: Mapping[str, str] | None = None,
    replication_factor: int = 1,
) -> TopicState:
    config = dict(config if config is not None else {"cleanup.policy": "compact"})
    config.setdefault("retention.ms", "1000")
    return TopicState("p.models", partitions, replication_factor, config, dynamic or {})


# --------------------------------------------------------------------------- specs


def test_specs_cover_every_role_with_prefixed_names() -> None:
    settings = Settings(topic_prefix="t1")
    product, fedavg = topic_specs(settings), fedavg_topic_specs(settings)
    assert [s.role for s in [*product, *fedavg]] == list(Role)
    # The FedAvg baseline's topics are not the product's: `fedex topics ensure` skips them.
    assert {s.role for s in fedavg} == {Role.FEDAVG_ROUNDS, Role.FEDAVG_UPDATES}
    topics = Topics("t1")
    names = {s.role: s.name for s in [*product, *fedavg]}
    agents = {
        Role.AGENTS_TICKS: topics.agents_ticks,
        Role.AGENTS_SUMMARIES: topics.agents_summaries,
    }
    assert all(names[r] == agents.get(r, topics.name(r)) for r in Role)
    assert all(n.startswith(("t1.", "t1-agents-")) for n in names.values())


def test_model_topic_is_compacted_and_sized_from_settings() -> None:
    settings = Settings(max_message_bytes=2 * 1024 * 1024)
    models = next(s for s in topic_specs(settings) if s.role is Role.MODELS)
    assert models.config["cleanup.policy"] == "compact"
    assert models.config["max.message.bytes"] == str(2 * 1024 * 1024)


# --------------------------------------------------------------------------- diff


def test_diff_configs_equal_is_empty() -> None:
    assert diff_configs({"a": "1"}, {"a": "1", "b": "2"}) == {}


def test_diff_configs_reports_changed_and_missing() -> None:
    assert diff_configs({"a": "1", "b": "2"}, {"a": "9"}) == {"a": ("9", "1"), "b": (None, "2")}


def test_diff_configs_cleanup_policy_is_order_insensitive() -> None:
    wanted = {"cleanup.policy": "compact,delete"}
    assert diff_configs(wanted, {"cleanup.policy": "delete, compact"}) == {}
    assert diff_configs(wanted, {"cleanup.policy": "compact"}) == {
        "cleanup.policy": ("compact", "compact,delete")
    }


def test_diff_configs_ignores_surrounding_whitespace() -> None:
    assert diff_configs({"retention.ms": "1000"}, {"retention.ms": " 1000 "}) == {}


# --------------------------------------------------------------------------- plan


def test_missing_topic_is_created() -> None:
    plan = plan_topic(_spec(), None)
    assert plan.create
    assert plan.action is TopicAction.CREATED


def test_matching_topic_is_unchanged() -> None:
    plan = plan_topic(_spec(), _state())
    assert plan.action is TopicAction.UNCHANGED
    assert plan.alter_configs is None
    assert plan.new_partitions is None
    assert plan.warnings == ()


def test_fewer_partitions_grow_to_the_spec() -> None:
    plan = plan_topic(_spec(partitions=6), _state(partitions=2))
    assert plan.new_partitions == 6
    assert plan.action is TopicAction.UPDATED


def test_more_partitions_warn_and_are_left_alone() -> None:
    plan = plan_topic(_spec(partitions=2), _state(partitions=6))
    assert plan.new_partitions is None
    assert plan.action is TopicAction.UNCHANGED
    assert "cannot shrink" in plan.warnings[0]


def test_replication_factor_mismatch_is_only_reported() -> None:
    plan = plan_topic(_spec(), _state(replication_factor=3))
    assert plan.action is TopicAction.UNCHANGED
    assert "replication factor is 3" in plan.warnings[0]


def test_drifted_config_is_altered_keeping_other_overrides() -> None:
    state = _state(
        config={"cleanup.policy": "delete", "segment.ms": "60000"},
        dynamic={"cleanup.policy": "delete", "segment.ms": "60000"},
    )
    plan = plan_topic(_spec(), state)

    assert plan.action is TopicAction.UPDATED
    assert plan.config_changes == {"cleanup.policy": ("delete", "compact")}
    # AlterConfigs replaces every dynamic config: the unrelated override must be resent.
    assert plan.alter_configs == {
        "cleanup.policy": "compact",
        "retention.ms": "1000",
        "segment.ms": "60000",
    }


# --------------------------------------------------------------------------- reports


def _report(
    name: str,
    action: TopicAction,
    *,
    partitions_before: int | None = 6,
    config_changes: Mapping[str, tuple[str | None, str]] | None = None,
    warnings: tuple[str, ...] = (),
) -> TopicReport:
    return TopicReport(name, action, 6, config_changes or {}, partitions_before, warnings)


def test_ensure_report_groups_and_summarises() -> None:
    report = EnsureReport(
        (
            _report("a", TopicAction.CREATED, partitions_before=None),
            _report(
                "b",
                TopicAction.UPDATED,
                partitions_before=2,
                config_changes={"retention.ms": ("1", "2")},
            ),
            _report("c", TopicAction.UNCHANGED, warnings=("odd",)),
        )
    )
    assert report.created == ["a"]
    assert report.updated == ["b"]
    assert report.unchanged == ["c"]
    assert report.changed
    assert report.warnings == ["c: odd"]
    assert report.summary() == "1 created, 1 updated, 1 unchanged"
    assert report.topics[1].changes() == ["partitions 2 -> 6", "retention.ms '1' -> '2'"]
    assert "WARNING odd" in report.topics[2].describe()


def test_unchanged_report_is_not_a_change() -> None:
    assert not EnsureReport((_report("c", TopicAction.UNCHANGED),)).changed


def test_description_of_missing_topic_drifts_on_everything() -> None:
    spec = _spec()
    missing = TopicDescription(spec, None)
    assert not missing.exists
    assert missing.config("cleanup.policy") is None
    assert set(missing.drift) == set(spec.config)
    assert TopicDescription(spec, _state()).drift == {}
