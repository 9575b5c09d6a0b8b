"""The trainer process: ``fedex trainer`` runs :func:`run_trainer` (signals, the broker
noise filter, the optional metrics endpoint, a clean stop)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pipeline.broker_health import install_noise_filter
from pipeline.lifecycle import stop_on_signals
from pipeline.metrics_http import MetricsServer
from trainer.job import JobOutcome
from trainer.worker import Trainer

if TYPE_CHECKING:
    from pipeline.settings import Settings

log = logging.getLogger(__name__)


def run_trainer(
    settings: Settings,
    *,
    device: str = "auto",
    max_jobs: int | None = None,
    idle_timeout: float | None = None,
) -> None:
    """Run a trainer until SIGINT/SIGTERM, ``max_jobs`` handled or ``idle_timeout`` idle.
    Blocking; the entry point of ``fedex trainer``."""
    asyncio.run(_serve(settings, device=device, max_jobs=max_jobs, idle_timeout=idle_timeout))


async def _serve(
    settings: Settings, *, device: str, max_jobs: int | None, idle_timeout: float | None
) -> None:
    stop_requested = asyncio.Event()
    trainer = Trainer(settings, device=device)
    install_noise_filter(trainer.health)
    metrics = MetricsServer(
        trainer.metrics_registry, host=settings.server_host, port=settings.trainer_metrics_port
    )
    with stop_on_signals(stop_requested.set):
        async with trainer, metrics:
            run = asyncio.create_task(trainer.run(max_jobs=max_jobs, idle_timeout=idle_timeout))
            stop = asyncio.create_task(stop_requested.wait())
            await asyncio.wait([run, stop], return_when=asyncio.FIRST_COMPLETED)
            if not run.done():
                log.info("stopping: finishing the current epoch, leaving the job uncommitted")
                await trainer.stop()
            stop.cancel()
            handled = await run
    published = sum(1 for j in trainer.jobs if j.outcome is JobOutcome.PUBLISHED)
    log.info("trainer stopped: %d triggers handled, %d versions published", handled, published)
