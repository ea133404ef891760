"""Step times of a whole training run around its epoch boundaries, against the median step.

Runs ``launch/train.py`` in this process (a world of one) with a run config whose every step is
logged (``logging.every = 1``: the host waits for each step, so each row of ``metrics.jsonl``
times one step), the whole store as the training period, no validation and one checkpoint at
the end; then prints the steps within ``--around`` steps of each epoch's first step and the
slowest of them against the median step (the steps of ``--warmup``, compilation among them,
left out):

    python -m benchmarks.train_step --make-store /tmp/era5.zarr --store-times 16
    python -m benchmarks.epoch_boundaries --config configs/train/jigsaw-1b-one-gpu.yaml --store /tmp/era5.zarr

Results go into ``benchmarks/GPU.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from launch.training.config import load_run_config


def run_overrides(store: str, steps: int, run_dir: Path) -> list[str]:
    """The ``--set`` entries that turn a run config into this benchmark's run."""
    return [f"data.store={store}", "data.train=[1900-01-01, 2200-01-01]", "data.validation=null",
            f"training.steps={steps}", "logging.every=1", "logging.tensorboard=false",
            f"checkpoint.every={steps}", f"checkpoint.dir={run_dir}"]


def step_rows(run_dir: Path, samples_per_step: int) -> list[tuple[int, int, float]]:
    """(step, epoch, ms) of each logged step of the run in ``run_dir``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["epoch"], 1e3 * samples_per_step / r["samples_per_s"]) for r in rows if "samples_per_s" in r]


def report(rows: list[tuple[int, int, float]], around: int, warmup: int) -> None:
    steady = [ms for step, _, ms in rows if step > warmup]
    if not steady:
        raise SystemExit(f"epoch_boundaries: no step after the {warmup} warm-up steps; raise --steps")
    median = statistics.median(steady)
    starts = [step for (step, epoch, _), (_, before, _) in zip(rows[1:], rows) if epoch != before]
    near = [(step, epoch, ms) for step, epoch, ms in rows
            if step > warmup and any(abs(step - start) <= around for start in starts)]
    print("| step | epoch | ms | x median |\n| --- | --- | --- | --- |")
    for step, epoch, ms in near:
        print(f"| {step}{' (epoch start)' if step in starts else ''} | {epoch} | {ms:.1f} | {ms / median:.2f} |")
    print(f"\nmedian step {median:.1f} ms (steps {warmup + 1}..{rows[-1][0]}); epochs start at steps {starts}")
    if not near:
        print("no epoch starts after the warm-up: raise --steps")
        return
    step, _, worst = max(near, key=lambda row: row[2])
    print(f"slowest step within {around} steps of an epoch start: step {step}, {worst:.1f} ms = "
          f"{worst / median:.2f} x the median")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML, e.g. configs/train/jigsaw-1b-one-gpu.yaml")
    parser.add_argument("--store", required=True, help="zarr store to train on (all of its times)")
    parser.add_argument("--steps", type=int, default=70)
    parser.add_argument("--around", type=int, default=2, help="steps either side of an epoch's first step")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the median (compilation)")
    parser.add_argument("--run-dir", type=Path, default=None, help="where the run writes (default: a new temporary "
                        "folder); must not hold a run, which would be resumed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="further config overrides, as launch/train.py takes them")
    args = parser.parse_args(argv)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="epoch_boundaries_"))
    if (run_dir / "metrics.jsonl").exists():
        parser.error(f"--run-dir {run_dir} holds a run (metrics.jsonl); pass an empty or new folder")
    overrides = run_overrides(args.store, args.steps, run_dir) + args.set
    t = load_run_config(args.config, overrides).training

    from launch.train import main as train

    train(["--config", args.config, "--quiet", *(item for entry in overrides for item in ("--set", entry))])
    print(f"{args.config} on {args.store}, {args.steps} steps, run in {run_dir}\n")
    report(step_rows(run_dir, t.micro_batch * t.gradient_accumulation), args.around, args.warmup)


if __name__ == "__main__":
    main()
