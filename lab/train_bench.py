"""``fedex bench train``: how fast the cloud trains each freeze level's head, on this device.

For every freeze level the benchmark builds the real head (InceptionResnetV1 split by
:mod:`pipeline.zoo`, 8,631 classes like the paper's VGGFace2 classifier), feeds it synthetic
features of the level's shape, and times the recipe's own training step
(:func:`trainer.recipe.train_step`: AdamW, cross-entropy, bf16 autocast on CUDA). Each level
is set beside two references:

* the paper's Table 1 server throughput (Titan Xp, images/s), and
* the device's own matmul ceiling, measured with a large matmul (fp32 sgemm on CPU, bf16
  on CUDA) *interleaved* with the training: each level runs ``rounds`` rounds of one short
  ceiling window and one timed training slice, after untimed warm-up steps. The level's
  rate is the median of its rounds (min–max beside it); the ceiling is the best window of
  the whole run, so a busy moment of a shared CPU can only make the utilisation read low.

Work is counted exactly (:func:`pipeline.zoo.head_train_flops_per_sample`): per layer as
computed, forward, weight gradients, and input gradients only where one is needed (none
for the first thawed layer: the features need no gradient). The usual 3 x forward
convention is kept in the JSON beside it (it reads 1.5x high for freeze6, one Linear).

Runs without a broker and imports nothing of Kafka, Faust, pydantic or orjson, so it runs on
the accelerator machine as ``python -m lab.train_bench --device cuda:0 --out …``.
Each level has a time budget (after warm-up, at least ``min_steps`` steps), and per-level
batch sizes keep the slow CPU levels bounded: the whole CPU run ends in about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from lab import measure
from pipeline.records import FEATURE_SHAPES, Backbone, Cut
from pipeline.zoo import (
    build_backbone,
    head_flops_per_sample,
    head_train_flops_per_sample,
    split,
    thawed_parameter_count,
)
from trainer.recipe import (
    TrainConfig,
    configure_threads,
    make_optimizer,
    resolve_device,
    train_step,
)

#: Paper's Table 1: server training throughput per freeze level (Titan Xp, images/s).
PAPER_TABLE1_IMG_PER_S: dict[Cut, float] = {
    Cut.FULL: 487.56,
    Cut.FREEZE1: 573.36,
    Cut.FREEZE2: 699.13,
    Cut.FREEZE3: 963.26,
    Cut.FREEZE4: 2_963.88,
    Cut.FREEZE5: 28_078.46,
    Cut.FREEZE6: 41_869.68,
}

DEFAULT_LEVELS: tuple[Cut, ...] = (
    Cut.FREEZE1,
    Cut.FREEZE2,
    Cut.FREEZE3,
    Cut.FREEZE4,
    Cut.FREEZE5,
    Cut.FREEZE6,
)

#: Batch per level. CPU: small for the convolutional heads so a step stays around a second;
#: 512 for the linear heads, measured best on a 2-core EPYC (32 MiB L3): the logits of 512
#: samples x 8,631 classes (17.7 MB) stay in cache through softmax and backward, 2048 runs
#: about half as fast, and the fused AdamW step (~2 ms for 4.4 M params) is already amortised.
#: CUDA: enough to fill the GPU.
CPU_BATCH: dict[Cut, int] = {
    Cut.FULL: 4,
    Cut.FREEZE1: 4,
    Cut.FREEZE2: 4,
    Cut.FREEZE3: 8,
    Cut.FREEZE4: 64,
    Cut.FREEZE5: 512,
    Cut.FREEZE6: 512,
}
CUDA_BATCH: dict[Cut, int] = {
    Cut.FULL: 256,
    Cut.FREEZE1: 256,
    Cut.FREEZE2: 256,
    Cut.FREEZE3: 256,
    Cut.FREEZE4: 1024,
    Cut.FREEZE5: 8192,
    Cut.FREEZE6: 8192,
}


@dataclass(frozen=True, slots=True)
class LevelResult:
    level: str
    feature_shape: list[int]
    batch_size: int
    steps: int
    seconds: float
    samples_per_s: float
    samples_per_s_min: float
    samples_per_s_max: float
    rounds: int
    paper_img_per_s: float | None
    vs_paper: float | None
    head_params: int
    flops_per_sample: int
    convention_flops_per_sample: int
    achieved_flops_per_s: float
    peak_flops_per_s: float
    utilisation: float
    convention_utilisation: float


# --------------------------------------------------------------------------- measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device: torch.device, *, seconds: float = 1.0) -> tuple[float, str]:
    """Best FLOP/s of a large square matmul: fp32 sgemm on CPU, bf16 on CUDA."""
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 2048, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2.0 * n**3
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    a @ b
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    reps = max(1, int(seconds / 5 / one))
    best = 0.0
    for _ in range(5):  # the best of five windows: peak, not the average under noise
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, reps * flops / (time.perf_counter() - t0))
    return best, "bf16" if dtype is torch.bfloat16 else "fp32"


@dataclass(frozen=True, slots=True)
class LevelRun:
    """One level's interleaved rounds: (steps, seconds) per training slice, and every
    ceiling window measured between them (FLOP/s)."""

    slices: list[tuple[int, float]]
    peaks: list[float]
    batch_size: int

    @property
    def rates(self) -> list[float]:
        return [steps * self.batch_size / seconds for steps, seconds in self.slices]


def _train_slice(
    head: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    device: torch.device,
    amp: bool,
    seconds: float,
    min_steps: int,
) -> tuple[int, float]:
    """Training steps until ``seconds`` passed and ``min_steps`` were taken. On CUDA the
    host synchronises only every ~0.1 s (steps queue back to back in between), so the
    clock reads GPU time, not launch overhead."""
    steps, chunk = 0, 1
    t0 = time.perf_counter()
    while True:
        for _ in range(chunk):
            train_step(head, optimizer, x, y, amp=amp)
        steps += chunk
        _sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and steps >= min_steps:
            return steps, elapsed
        if device.type == "cuda":
            chunk = max(1, min(1000, int(0.1 * steps / max(elapsed, 1e-9))))


def measure_level(
    head: torch.nn.Module,
    feature_shape: Sequence[int],
    *,
    num_classes: int,
    batch_size: int,
    device: torch.device,
    amp: bool,
    seconds: float,
    rounds: int = 5,
    peak_seconds: float = 0.2,
    min_steps: int = 3,
    warmup_steps: int = 1,
    seed: int = 0,
) -> LevelRun:
    """``rounds`` x (one ceiling window, one training slice of ``seconds / rounds``), then
    a last ceiling window, after ``warmup_steps`` untimed steps (allocations, oneDNN/cuDNN
    kernel selection). Each slice takes at least ``min_steps`` steps."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch_size, *feature_shape, generator=generator).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    head.to(device).train()
    optimizer = make_optimizer(head, TrainConfig(seed=seed), device)
    for _ in range(warmup_steps):
        train_step(head, optimizer, x, y, amp=amp)
    _sync(device)
    slices, peaks = [], []
    for _ in range(rounds):
        peaks.append(measure_peak_flops(device, seconds=peak_seconds)[0])
        slices.append(
            _train_slice(
                head,
                optimizer,
                x,
                y,
                device=device,
                amp=amp,
                seconds=seconds / rounds,
                min_steps=min_steps,
            )
        )
    peaks.append(measure_peak_flops(device, seconds=peak_seconds)[0])
    del optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return LevelRun(slices, peaks, batch_size)


# --------------------------------------------------------------------------- the benchmark


def device_label(device: torch.device) -> str:
    """A file-name friendly name for the device: ``cpu`` or e.g. ``nvidia-h200``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"
    return device.type


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else _cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        from importlib.metadata import version

        env["facenet_pytorch"] = version("facenet-pytorch")
    except Exception:  # carried as a bare package, no metadata
        env["facenet_pytorch"] = None
    return env


def level_result(
    backbone: Backbone, cut: Cut, head: torch.nn.Module, run: LevelRun, num_classes: int
) -> LevelResult:
    """One level's figures; its utilisation is judged later against the run's best ceiling."""
    rates = run.rates
    rate = statistics.median(rates)
    paper = PAPER_TABLE1_IMG_PER_S.get(cut) if backbone is Backbone.INCEPTION_RESNET_V1 else None
    exact = head_train_flops_per_sample(backbone, cut, num_classes)
    convention = head_flops_per_sample(backbone, cut, num_classes)
    peak = max(run.peaks)
    return LevelResult(
        level=str(cut),
        feature_shape=list(FEATURE_SHAPES[backbone][cut]),
        batch_size=run.batch_size,
        steps=sum(steps for steps, _ in run.slices),
        seconds=round(sum(seconds for _, seconds in run.slices), 4),
        samples_per_s=rate,
        samples_per_s_min=min(rates),
        samples_per_s_max=max(rates),
        rounds=len(rates),
        paper_img_per_s=paper,
        vs_paper=rate / paper if paper else None,
        head_params=thawed_parameter_count(head),
        flops_per_sample=exact,
        convention_flops_per_sample=convention,
        achieved_flops_per_s=exact * rate,
        peak_flops_per_s=peak,
        utilisation=exact * rate / peak,
        convention_utilisation=convention * rate / peak,
    )


def judged_against(results: list[LevelResult], peak: float) -> list[LevelResult]:
    """The levels with their utilisation against ``peak`` (the run's best ceiling)."""
    return [
        replace(
            r,
            peak_flops_per_s=peak,
            utilisation=r.achieved_flops_per_s / peak,
            convention_utilisation=r.convention_flops_per_sample * r.samples_per_s / peak,
        )
        for r in results
    ]


def _prepare(device: str) -> torch.device:
    dev = resolve_device(device)
    if dev.type == "cpu":
        configure_threads(None)
    elif dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return dev


def run_train_bench(
    *,
    device: str = "auto",
    levels: Iterable[Cut | str] = DEFAULT_LEVELS,
    backbone: Backbone | str = Backbone.INCEPTION_RESNET_V1,
    num_classes: int = 8631,
    batch_size: int | None = None,
    seconds_per_level: float | None = None,
    rounds: int = 5,
    min_steps: int = 3,
    amp: bool = True,
    peak_seconds: float = 1.0,
    out: Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Measure head training throughput per freeze level; print a table, write JSON.

    ``batch_size`` None picks a per-level batch (:data:`CPU_BATCH` / :data:`CUDA_BATCH`);
    ``seconds_per_level`` None means 5 s, split over ``rounds`` interleaved rounds. The
    matmul ceiling is measured for ``peak_seconds`` first, then for ``peak_seconds / 5``
    between the rounds. ``out`` None writes ``bench/results/train-<device>.json``.
    """
    # a log file or CI pipe gets the whole table, not 80 columns of ellipses
    console = console or Console(stderr=True, width=None if sys.stderr.isatty() else 150)
    measure.begin(["python", "-m", "lab.train_bench", *sys.argv[1:]])
    dev = _prepare(device)
    backbone = Backbone(backbone)
    budget = seconds_per_level if seconds_per_level is not None else 5.0
    batches = CUDA_BATCH if dev.type == "cuda" else CPU_BATCH
    use_amp = amp and dev.type == "cuda"

    console.log(f"bench train: {backbone} on {dev} ({torch.get_num_threads()} threads)")
    first_peak, peak_dtype = measure_peak_flops(dev, seconds=peak_seconds)
    console.log(f"matmul ceiling ({peak_dtype}): {first_peak / 1e12:.3f} TFLOP/s")
    peaks = [first_peak]
    model = build_backbone(backbone, num_classes=num_classes).to(dev)
    results: list[LevelResult] = []
    for cut in (Cut(level) for level in levels):
        head = split(model, backbone, cut).head
        run = measure_level(
            head,
            FEATURE_SHAPES[backbone][cut],
            num_classes=num_classes,
            batch_size=batch_size or batches[cut],
            device=dev,
            amp=use_amp,
            seconds=budget,
            rounds=rounds,
            peak_seconds=peak_seconds / 5,
            min_steps=min_steps,
        )
        peaks += run.peaks
        results.append(level_result(backbone, cut, head, run, num_classes))
        r = results[-1]
        console.log(
            f"{cut}: {r.samples_per_s:,.1f} samples/s median of {r.rounds} rounds "
            f"({r.samples_per_s_min:,.1f}–{r.samples_per_s_max:,.1f}, batch {r.batch_size})"
        )
    results = judged_against(results, max(peaks))
    config = {
        "backbone": str(backbone),
        "num_classes": num_classes,
        "amp_bf16": use_amp,
        "optimizer": "AdamW (fused)",
        "seconds_per_level": budget,
        "rounds": rounds,
        "min_steps": min_steps,
        "flops_convention": "exact: forward + weight grads + needed input grads, per layer",
    }
    report = build_report(dev, config, peak_dtype, peaks, results)
    console.print(render_table(report))
    path = out if out is not None else Path("bench/results") / f"train-{device_label(dev)}.json"
    write_report(report, path)
    console.log(f"wrote {path}")
    return report


def build_report(
    dev: torch.device,
    config: dict[str, Any],
    peak_dtype: str,
    peaks: list[float],
    results: list[LevelResult],
) -> dict[str, Any]:
    return {
        "benchmark": "train",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "conditions": measure.conditions(),
        "environment": environment(dev),
        "config": config,
        "peak": {
            "dtype": peak_dtype,
            "flops_per_s": max(peaks),
            "min_flops_per_s": min(peaks),
            "windows": len(peaks),
        },
        "levels": [asdict(r) for r in results],
    }


def write_report(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def render_table(report: dict[str, Any]) -> Table:
    env, peak = report["environment"], report["peak"]
    table = Table(
        title=f"head training throughput — {report['config']['backbone']}, "
        f"{report['config']['num_classes']} classes, {env['device_name']}",
        caption=f"{peak['dtype']} matmul ceiling {peak['min_flops_per_s'] / 1e12:.3f}-"
        f"{peak['flops_per_s'] / 1e12:.3f} TFLOP/s over {peak.get('windows', '?')} windows "
        "interleaved with the training; utilisation = exact FLOPs/sample x median samples/s "
        "÷ the run's best window (the 3 x forward convention in brackets)",
    )
    for name in ("level", "features", "batch", "samples/s", "paper img/s", "x paper"):
        table.add_column(name, justify="left" if name in ("level", "features") else "right")
    for name in ("thawed params", "GFLOP/sample", "TFLOP/s", "utilisation"):
        table.add_column(name, justify="right")
    for r in report["levels"]:
        table.add_row(
            r["level"],
            "x".join(str(d) for d in r["feature_shape"]),
            str(r["batch_size"]),
            f"{r['samples_per_s']:,.1f}",
            f"{r['paper_img_per_s']:,.2f}" if r["paper_img_per_s"] else "—",
            f"{r['vs_paper']:.2f}" if r["vs_paper"] else "—",
            f"{r['head_params']:,}",
            f"{r['flops_per_sample'] / 1e9:.3f}",
            f"{r['achieved_flops_per_s'] / 1e12:.3f}",
            f"{r['utilisation']:.1%} ({r['convention_utilisation']:.1%})",
        )
    return table


def _parse_levels(text: str) -> list[Cut]:
    if text == "all":
        return [Cut.FULL, *DEFAULT_LEVELS]
    return [Cut(part.strip()) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.train_bench", description="Benchmark head training per freeze level."
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:0 …")
    parser.add_argument(
        "--levels",
        default=",".join(DEFAULT_LEVELS),
        help="comma-separated freeze levels, or 'all' (adds full)",
    )
    parser.add_argument("--backbone", default=str(Backbone.INCEPTION_RESNET_V1))
    parser.add_argument("--num-classes", type=int, default=8631)
    parser.add_argument("--batch-size", type=int, default=None, help="default: per level")
    parser.add_argument("--seconds", type=float, default=None, help="time budget per level")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per level")
    parser.add_argument("--min-steps", type=int, default=3)
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    run_train_bench(
        device=args.device,
        levels=_parse_levels(args.levels),
        backbone=args.backbone,
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        seconds_per_level=args.seconds,
        rounds=args.rounds,
        min_steps=args.min_steps,
        amp=not args.no_amp,
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
