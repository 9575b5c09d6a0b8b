"""One training job, pure of Kafka: the candidate a trigger yields and how it is judged.

:func:`train_candidate` warm-starts the head from the champion, evaluates the champion on
the model's validation set, trains (the job's new samples and its replay, planned by
:mod:`trainer.replay`), evaluates the challenger on the same set and applies the recipe's
champion/challenger rule (a tie is not a win). :func:`assemble_job` takes the job's samples
and validation set from the cache; :class:`JobReport` says what a trigger came to;
:class:`HeadCache` keeps built heads across jobs. The trainer process
(:mod:`trainer.worker`) is the I/O shell around this.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError, FedexError
from pipeline.records import Backbone, Cut, ModelMetrics, ModelUpdate, TrainingTrigger
from pipeline.samples import ValidationRule
from trainer.dataset import Dataset, FeatureCache
from trainer.ledger import format_ranges
from trainer.recipe import (
    EpochStats,
    TrainConfig,
    TrainResult,
    Verdict,
    champion_challenger,
    evaluate,
    resolve_device,
    train_head,
    warm_start,
)
from trainer.replay import JobPlan, plan_job


class JobError(FedexError):
    """A trigger cannot be trained (unknown model, no samples, no champion checkpoint).
    The trigger is committed and skipped: the agents re-fire it if it still matters."""


class JobAbandoned(Exception):
    """The job stops without publishing or committing (partition lost, trainer stopping);
    the trigger stays for the partition's next owner."""


class JobOutcome(enum.StrEnum):
    """What one trigger came to in the trainer (the ``outcome`` label of its jobs metric)."""

    PUBLISHED = "published"
    ALREADY_PUBLISHED = "already_published"
    SKIPPED = "skipped"
    ABANDONED = "abandoned"
    #: Dead-lettered, never trained: undecodable, or an id seen with other ranges.
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class JobReport:
    """What one trigger came to. Accuracies are on the model's validation set
    (``eval_samples``); ``train_samples``/``val_samples`` split the trigger's new samples,
    ``replay_samples`` were trained again from earlier jobs."""

    trigger_id: str
    model_id: str
    version: str | None
    outcome: JobOutcome
    reason: str = ""
    offset: int = -1
    train_samples: int = 0
    val_samples: int = 0
    replay_samples: int = 0
    eval_samples: int = 0
    records_read: int = 0
    champion_version: str | None = None
    champion_accuracy: float | None = None
    challenger_accuracy: float | None = None
    is_best: bool | None = None
    train_seconds: float = 0.0
    seconds: float = 0.0
    samples_per_s: float = 0.0
    update: ModelUpdate | None = None

    @classmethod
    def published(
        cls,
        trigger: TrainingTrigger,
        version: str,
        offset: int,
        candidate: Candidate,
        *,
        records_read: int,
        champion_version: str,
        seconds: float,
        update: ModelUpdate,
    ) -> JobReport:
        """The report of a trigger trained into ``candidate`` and published as ``update``:
        the candidate's counts, accuracies and verdict, read here so the trainer's shell
        need not know the report's fields."""
        return cls(
            trigger_id=trigger.trigger_id,
            model_id=trigger.model_id,
            version=version,
            outcome=JobOutcome.PUBLISHED,
            reason=candidate.verdict.reason,
            offset=offset,
            train_samples=candidate.train_samples,
            val_samples=candidate.val_samples,
            replay_samples=candidate.replay_samples,
            eval_samples=candidate.eval_samples,
            records_read=records_read,
            champion_version=champion_version,
            champion_accuracy=candidate.champion_accuracy,
            challenger_accuracy=candidate.challenger_accuracy,
            is_best=candidate.verdict.is_best,
            train_seconds=candidate.result.seconds,
            seconds=seconds,
            samples_per_s=candidate.result.samples_per_s,
            update=update,
        )

    def summary(self) -> str:
        head = f"job {self.trigger_id} -> {self.version or '?'}: {self.outcome}"
        if self.outcome is not JobOutcome.PUBLISHED:
            return f"{head} ({self.reason})" if self.reason else head
        inline = self.update is not None and self.update.checkpoint is not None
        return (
            f"{head}; {self.train_samples} new + {self.replay_samples} replayed train / "
            f"{self.val_samples} held-out samples ({self.records_read} records read), val acc "
            f"({self.eval_samples} samples) {_fmt(self.champion_accuracy)} "
            f"({self.champion_version}) -> {_fmt(self.challenger_accuracy)} "
            f"{'best' if self.is_best else 'not best'}; train {self.train_seconds:.2f} s, "
            f"{self.samples_per_s:,.0f} samples/s, job {self.seconds:.2f} s; "
            f"checkpoint {self.update.size if self.update else 0:,} B "
            f"{'inline' if inline else 'by reference'}"
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


# --------------------------------------------------------------------------- the pure step


@dataclass(frozen=True, slots=True)
class Candidate:
    """A trained challenger next to its champion, judged on one validation set.
    ``train_samples`` new samples and ``replay_samples`` earlier ones were trained,
    ``val_samples`` new ones held out; ``eval_samples`` is the validation set's size."""

    state_dict: dict[str, Tensor]
    champion_accuracy: float
    challenger_accuracy: float
    verdict: Verdict
    result: TrainResult
    train_samples: int
    val_samples: int
    replay_samples: int = 0
    eval_samples: int = 0

    def metrics(self) -> ModelMetrics:
        # A NaN cannot travel (JSON): an empty validation split reads 0.0 with val_samples 0.
        def number(value: float) -> float:
            return 0.0 if math.isnan(value) else value

        return ModelMetrics(
            val_accuracy=number(self.challenger_accuracy),
            champion_val_accuracy=None
            if math.isnan(self.champion_accuracy)
            else self.champion_accuracy,
            train_samples=self.train_samples,
            val_samples=self.val_samples,
            train_seconds=self.result.seconds,
            epochs=len(self.result.epochs),
            replay_samples=self.replay_samples,
            eval_samples=self.eval_samples,
        )


def train_candidate(
    head: nn.Module,
    champion: Mapping[str, Tensor] | None,
    train: Dataset,
    val: Dataset,
    cfg: TrainConfig,
    *,
    on_epoch: Callable[[EpochStats], None] | None = None,
    margin: float = 0.0,
    replay_samples: int = 0,
    held_out: int | None = None,
) -> Candidate:
    """Warm-start ``head`` from ``champion`` (None: train from the head as it is), evaluate
    it on ``val``, train it on ``train``, evaluate it again on the same ``val`` and judge
    (the challenger must beat the champion by more than ``margin``). The last
    ``replay_samples`` of ``train`` are replayed earlier samples, the rest the job's new
    ones; ``held_out`` counts the job's new samples that are validation (default: all of
    ``val``). With nothing to train on (every new sample held out, nothing to replay) the
    champion is republished unchanged and kept. Pure apart from ``head``, which ends
    trained."""
    if len(train) == 0 and champion is None:
        raise JobError("no training samples: every sample fell in the validation split")
    if not 0 <= replay_samples <= len(train):
        raise ValueError(f"replay_samples {replay_samples} is not within the {len(train)} trained")
    if champion is not None:
        warm_start(head, champion)
    device = str(resolve_device(cfg.device))
    judged = len(val) > 0
    champion_acc = math.nan
    if champion is not None and judged:
        champion_acc = evaluate(head, val.features, val.labels, device=device)
    if len(train) == 0:
        result = TrainResult()
        challenger_acc = champion_acc
        verdict = Verdict(False, "no training samples: every new sample is held out; champion kept")
    else:
        result = train_head(head, train.features, train.labels, cfg, on_epoch=on_epoch)
        challenger_acc = (
            evaluate(head, val.features, val.labels, device=device) if judged else math.nan
        )
        if champion is not None and not judged:
            # The recipe reads a NaN champion as "no champion"; with nothing to judge on, the
            # champion stays.
            verdict = Verdict(False, "empty validation split: champion kept")
        else:
            verdict = champion_challenger(
                challenger_acc,
                None if champion is None else champion_acc,
                val_samples=len(val),
                margin=margin,
            )
    state = {key: value.detach().to("cpu", copy=True) for key, value in head.state_dict().items()}
    return Candidate(
        state_dict=state,
        champion_accuracy=champion_acc,
        challenger_accuracy=challenger_acc,
        verdict=verdict,
        result=result,
        train_samples=len(train) - replay_samples,
        val_samples=len(val) if held_out is None else held_out,
        replay_samples=replay_samples,
        eval_samples=len(val),
    )


def job_seed(trigger_id: str) -> int:
    """Training seed of a trigger: a retrained trigger repeats its shuffles."""
    return int.from_bytes(hashlib.blake2b(trigger_id.encode(), digest_size=4).digest(), "little")


class HeadCache:
    """Built heads per (backbone, cut, num_classes), least recently used evicted. Building
    a backbone costs seconds; every job re-loads the champion's state into the head."""

    def __init__(self, size: int = 2) -> None:
        self._size = size
        self._heads: OrderedDict[tuple[Backbone, Cut, int], nn.Module] = OrderedDict()

    def get(self, backbone: Backbone, cut: Cut, num_classes: int) -> nn.Module:
        from pipeline.zoo import build_backbone, split

        key = (backbone, cut, num_classes)
        head = self._heads.get(key)
        if head is None:
            model = build_backbone(backbone, num_classes=num_classes)
            head = split(model, backbone, cut).head
            self._heads[key] = head
            while len(self._heads) > self._size:
                self._heads.popitem(last=False)
        self._heads.move_to_end(key)
        return head


def check_device(device: str) -> str:
    try:
        resolved = resolve_device(device)
    except RuntimeError as exc:
        raise ConfigError(
            f"device {device!r} is not a torch device: use auto, cpu, cuda or cuda:N"
        ) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA devices here"
            )
    elif resolved.type != "cpu":
        raise ConfigError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return str(resolved)


def synthetic_dataset(
    samples: int, num_classes: int, *, dim: int = 512, seed: int = 0, spread: float = 1.0
) -> Dataset:
    """Separable float16 features (a centre per class plus noise) for tests and benches."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(seed + 1).normal(size=(num_classes, dim)) * spread
    labels = rng.integers(0, num_classes, size=samples)
    features = (centres[labels] + rng.normal(size=(samples, dim))).astype(np.float16)
    return Dataset(
        features=features,
        labels=labels.astype(np.int64),
        device_ids=tuple(f"dev-{i % 100:03d}" for i in range(samples)),
        sample_ids=np.arange(samples, dtype=np.uint64),
    )


def assemble_job(
    cache: FeatureCache,
    trigger: TrainingTrigger,
    rule: ValidationRule,
    *,
    val_max_samples: int,
    replay_max_samples: int,
    seed: int,
) -> tuple[Dataset, Dataset, JobPlan]:
    """The job's training samples (new, then replayed), the model's validation set, and
    the plan they come from, taken from the job's window of the cache. Pure: the trainer
    runs it in a thread, since hashing a large window's rows takes a while."""
    rows, new = cache.window(trigger.ranges)
    if not new.any():
        raise JobError(
            f"no samples of {trigger.model_id!r} in {format_ranges(trigger.ranges)} "
            f"({cache.stats.rejected_records} records rejected so far)"
        )
    plan = plan_job(
        new=new,
        validation=cache.validation(rule)[rows],
        labels=cache.labels_of(rows),
        devices=cache.devices_of(rows),
        val_max_samples=val_max_samples,
        replay_max_samples=replay_max_samples,
        seed=seed,
    )
    return cache.take(rows[plan.trained]), cache.take(rows[plan.val]), plan
