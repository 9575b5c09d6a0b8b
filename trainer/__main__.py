"""``python -m trainer``: run a trainer process, or time one job's compute.

    python -m trainer [--device auto|cpu|cuda[:N]] [--max-jobs N] [--idle-timeout S]
    python -m trainer --bench-job [--samples 20000] [--classes 1000] [--epochs 5]

Settings come from ``FEDEX_*`` environment variables (``pipeline.settings``). The job bench
needs no broker: it runs the trainer's own job step on synthetic freeze6 features.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-jobs", type=int, default=None, help="stop after N triggers")
    parser.add_argument(
        "--idle-timeout", type=float, default=None, help="stop after S seconds without a trigger"
    )
    parser.add_argument("--bench-job", action="store_true", help="time one synthetic job, no Kafka")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if args.bench_job:
        from trainer.job import measure_job

        result = measure_job(
            samples=args.samples,
            num_classes=args.classes,
            epochs=args.epochs,
            batch_size=args.batch_size,
            device=args.device,
        )
        print(json.dumps(result, indent=2))
        return 0

    from pipeline.settings import Settings
    from trainer.worker import run_trainer

    run_trainer(
        Settings(), device=args.device, max_jobs=args.max_jobs, idle_timeout=args.idle_timeout
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
