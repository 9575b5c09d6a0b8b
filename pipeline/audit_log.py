"""``fedex audit``: reads a deployment's topics into an :class:`~pipeline.audit.Auditor`.

Group-less reads of every partition up to its end at the start of each read, so the audit
changes nothing on the cluster and can run at any time, against any cluster
(``FEDEX_KAFKA_BOOTSTRAP``, ``FEDEX_TOPIC_PREFIX``). While the system is live, pushes the
agents have not counted yet show as ``uncounted``; for a verdict on everything, let the
system settle first (no new pushes, jobs answered).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline import codec
from pipeline.audit import Auditor, AuditReport
from pipeline.tail import iter_topic
from pipeline.topics import Topics

if TYPE_CHECKING:
    from pipeline.settings import Settings

log = logging.getLogger(__name__)


async def audit_deployment(settings: Settings) -> tuple[AuditReport, float]:
    """Audit the topics of ``settings``' deployment; returns the report and seconds taken.
    Records that do not decode on the model, trigger, dead-letter or changelog topics are
    violations of their own (``undecodable``)."""
    started = time.perf_counter()
    topics = Topics(settings.topic_prefix)
    auditor = Auditor(
        features_topic=topics.features,
        val_fraction=settings.val_fraction,
        val_device_fraction=settings.val_device_fraction,
        max_push_samples=settings.max_push_samples,
    )
    bootstrap = settings.bootstrap
    client = "fedex-audit"
    folds: list[tuple[str, Callable[[bytes], Any], Callable[[Any], None]]] = [
        (topics.deadletter, codec.decode_dead_letter, auditor.add_dead_letter),
        (topics.models, codec.decode_update, auditor.add_update),
        (topics.triggers, codec.decode_trigger, auditor.add_trigger),
    ]
    for topic, decode, add in folds:  # dead letters first: they excuse what follows
        async for _, records in iter_topic(bootstrap, topic, client_id=client):
            for r in records:
                if r.value is None:  # a compaction tombstone
                    continue
                try:
                    add(decode(r.value))
                except codec.CodecError as exc:
                    auditor.undecodable(topic, r.partition, r.offset, exc)
    if await _exists(bootstrap, topics.agents_changelog):
        async for _, records in iter_topic(bootstrap, topics.agents_changelog, client_id=client):
            for r in records:
                model_id = codec.decode_key(r.key)
                if model_id is None:
                    continue
                try:
                    fields = None if r.value is None else codec.decode_model_state(r.value)
                except codec.CodecError as exc:
                    auditor.undecodable(topics.agents_changelog, r.partition, r.offset, exc)
                    continue
                auditor.add_state(model_id, fields)
    async for partition, records in iter_topic(bootstrap, topics.features, client_id=client):
        for r in records:
            auditor.add_feature_record(partition, r.offset, r.key, r.value)
    report = auditor.report()
    return report, time.perf_counter() - started


async def _exists(bootstrap: str, topic: str) -> bool:
    from pipeline.clients import make_admin

    admin = make_admin(bootstrap=bootstrap, client_id="fedex-audit")
    await admin.start()
    try:
        return topic in await admin.list_topics()
    finally:
        await admin.close()


def print_report(report: AuditReport, seconds: float) -> None:
    """The report as a person reads it: one row per model, then every violation."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedex audit: {report.feature_records:,} feature records")
    for column in (
        "model", "pushes", "samples", "distinct", "copies", "trained", "in flight", "pending",
        "uncounted", "orphaned", "dead-lettered", "triggers", "versions", "train/val/replay",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column == "model" else "right")
    for m in report.models:
        table.add_row(
            m.model_id,
            f"{m.pushes:,}",
            f"{m.samples:,}",
            f"{m.distinct:,}",
            f"{m.copies:,}",
            f"{m.trained_pushes:,}",
            f"{m.in_flight_pushes:,}",
            f"{m.pending_pushes:,}",
            f"{m.uncounted_pushes:,}",
            f"[red]{m.orphaned_pushes:,}[/red]" if m.orphaned_pushes else "0",
            f"{m.dead_lettered:,}",
            f"{m.triggers:,}",
            f"{m.versions:,}",
            f"{m.train_samples:,}/{m.val_samples:,}/{m.replay_samples:,}",
        )
    console = Console()
    console.print(table)
    for v in report.violations:
        console.print(f"[red]VIOLATION[/red] {v.kind} {v.model_id or '-'}: {v.detail}")
    verdict = "clean" if report.clean else f"{len(report.violations)} violations"
    aged = (
        f", {report.aged_out_triggers} triggers partly past retention"
        if report.aged_out_triggers
        else ""
    )
    console.print(
        f"{verdict}: {report.triggers:,} triggers, {report.updates:,} updates, "
        f"{report.dead_letters:,} dead letters{aged}; {seconds:.1f} s"
    )
