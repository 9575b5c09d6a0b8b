"""The trainer's training step: a job's window of the cache → a judged candidate.

Owns what a job's training depends on besides its data and champion: the recipe's settings
(epochs, batch size, learning rate, weight decay, weight averaging, promotion margin), the
validation rule and the caps on the validation set and the replay, the device and thread
cap, the heads built so far (reused across jobs) and the hook tests hold a job with. Pure
of Kafka; :mod:`trainer.worker` fetches the champion and reads the log, then runs
:meth:`JobTraining.assemble` and :meth:`JobTraining.train` in worker threads so that the
event loop keeps heartbeating.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.records import TrainingTrigger
from pipeline.samples import ValidationRule
from trainer.job import Candidate, HeadCache, JobAbandoned, assemble_job, train_candidate
from trainer.recipe import EpochStats, TrainConfig

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.registry import ModelEntry
    from pipeline.settings import Settings
    from trainer.dataset import Dataset, FeatureCache
    from trainer.replay import JobPlan

log = logging.getLogger(__name__)

JobHook = Callable[[TrainingTrigger], None]


@dataclass(eq=False)
class JobTraining:
    """Assembles and trains one job at a time from the process's settings.

    ``should_stop`` is asked after every epoch: when it says yes the job ends with
    :class:`~trainer.job.JobAbandoned` (a stopping trainer does not publish half a job).
    ``on_job_started`` is called in the training thread right before training.
    """

    settings: Settings
    device: str
    threads: int | None
    should_stop: Callable[[], bool]
    on_job_started: JobHook | None = None
    _heads: HeadCache = field(default_factory=HeadCache, init=False)

    def assemble(
        self, cache: FeatureCache, trigger: TrainingTrigger, seed: int
    ) -> tuple[Dataset, Dataset, JobPlan]:
        """The job's training samples, the model's validation set and their plan."""
        return assemble_job(
            cache,
            trigger,
            ValidationRule(self.settings.val_fraction, self.settings.val_device_fraction),
            val_max_samples=self.settings.val_max_samples,
            replay_max_samples=self.settings.replay_max_samples,
            seed=seed,
        )

    def config(self, seed: int) -> TrainConfig:
        """The recipe for a job seeded ``seed``."""
        return TrainConfig(
            epochs=self.settings.train_epochs,
            batch_size=self.settings.train_batch_size,
            lr=self.settings.train_lr,
            weight_decay=self.settings.train_weight_decay,
            seed=seed,
            device=self.device,
            threads=self.threads,
            swa_start=self.settings.train_swa_start,
        )

    def train(
        self,
        entry: ModelEntry,
        trigger: TrainingTrigger,
        champion: Mapping[str, Tensor],
        data: tuple[Dataset, Dataset, JobPlan],
        cfg: TrainConfig,
    ) -> Candidate:
        """Runs in a worker thread: builds the head, trains and judges it."""
        train, val, plan = data
        head = self._heads.get(entry.backbone, entry.cut, entry.num_classes)
        if self.on_job_started is not None:
            self.on_job_started(trigger)
        log.info(
            "job %s: training %s/%s (%d classes) on %d new + %d replayed samples "
            "(%d new held out; validation set %d), %d epochs, %s",
            trigger.trigger_id, entry.backbone, entry.cut, entry.num_classes,
            len(plan.train), len(plan.replay), plan.held_out, len(val), cfg.epochs,
            cfg.device,
        )  # fmt: skip

        def on_epoch(stats: EpochStats) -> None:
            if stats.seconds > 2.0:
                log.info(
                    "job %s: epoch %d/%d loss %.4f, %.0f samples/s",
                    trigger.trigger_id, stats.epoch + 1, cfg.epochs, stats.mean_loss,
                    stats.samples_per_s,
                )  # fmt: skip
            if self.should_stop():
                raise JobAbandoned("the trainer is stopping")

        return train_candidate(
            head,
            champion,
            train,
            val,
            cfg,
            on_epoch=on_epoch,
            margin=self.settings.promote_margin,
            replay_samples=len(plan.replay),
            held_out=plan.held_out,
        )
