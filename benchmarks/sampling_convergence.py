"""Sampling parallelism against data parallelism at equal ranks and equal steps, on CPU ranks.

Trains the Bayesian demo run (``configs/train/demo-bayesian.yaml``) twice on the same store and
the same number of processes: **sampling**: ``mesh.sample = N``, every rank sees the same batch
with its own weight draw and input noise (N Monte Carlo samples per step); **data**:
``mesh.data = N``, every rank its own batch with one sample (N times the data per step). Prints
the validation NLL (the loss) and RMSE of z500 and t2m against steps and epochs, and draws them.

    python -m benchmarks.sampling_convergence --store outputs/demo/era5.zarr --ranks 2 --steps 300

Results and the command go into ``benchmarks/SAMPLING.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

CONFIG = "configs/train/demo-bayesian.yaml"
MODES = {"sampling": lambda n: ["--set", f"mesh.sample={n}", "--set", "mesh.data=1", "--set", f"training.samples={n}"],
         "data": lambda n: ["--set", "mesh.sample=1", "--set", f"mesh.data={n}", "--set", "training.samples=1"]}


def train(mode: str, args) -> Path:
    run_dir = args.output / mode
    launcher = Path(sys.executable).parent / "deepspeed"
    command = [str(launcher), "--num_gpus", str(args.ranks), "--master_port", str(args.port + len(mode)),
               "launch/train.py", "--config", CONFIG, "--quiet", "--set", f"data.store={args.store}",
               "--set", f"checkpoint.dir={run_dir}", "--set", f"training.steps={args.steps}",
               "--set", f"logging.validate_every={args.validate_every}", *MODES[mode](args.ranks)]
    if not (run_dir / "model.pt").exists():
        print(f"{mode}: {' '.join(command)}", flush=True)
        subprocess.run(command, check=True, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    return run_dir


def validation(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "validation_loss" in r]


def report(runs: dict[str, list[dict]], ranks: int, micro_batch: int, n_train: int, output: Path) -> None:
    print(f"\nvalidation (mean weights) against steps; epochs = steps x distinct samples per step / {n_train}")
    print("| mode | step | epochs | validation NLL | RMSE z500 | RMSE t2m |")
    print("|---|---|---|---|---|---|")
    for mode, records in runs.items():
        per_step = micro_batch * (ranks if mode == "data" else 1)
        for r in records:
            print(f"| {mode} | {r['step']} | {r['step'] * per_step / n_train:.2f} | {r['validation_loss']:.4f} "
                  f"| {r.get('rmse_z500', float('nan')):.1f} | {r.get('rmse_t2m', float('nan')):.3f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, records in runs.items():
        per_step = micro_batch * (ranks if mode == "data" else 1)
        steps = np.array([r["step"] for r in records])
        loss = [r["validation_loss"] for r in records]
        axes[0].plot(steps, loss, marker="o", label=f"{mode} parallel")
        axes[1].plot(steps * per_step / n_train, loss, marker="o", label=f"{mode} parallel")
    for axis, xlabel in zip(axes, ("training step", "epochs (distinct samples seen / training set)")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("validation NLL (weighted MSE, mean weights)")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"Bayesian demo WeatherMixer on {ranks} CPU ranks: sampling vs data parallelism")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    print(f"\nplot written to {output}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampling_convergence",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="the demo store (bash launch/demo.sh writes one)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--validate-every", type=int, default=50)
    parser.add_argument("--output", type=Path, default=Path("outputs/sampling-convergence"))
    parser.add_argument("--port", type=int, default=29650)
    args = parser.parse_args(argv)
    runs = {mode: validation(train(mode, args)) for mode in MODES}
    from data.sampler import valid_time_indices
    from launch.training.config import load_run_config
    from data.reader import TileReader

    run = load_run_config(CONFIG, [f"data.store={args.store}"])
    reader = TileReader(args.store, lat_range=(0, 1), lon_range=(0, 1))
    n_train = len(valid_time_indices(reader.times, run.training.max_rollout, *run.data.train,
                                     step=np.timedelta64(reader.step_hours, "h")))
    report(runs, args.ranks, run.training.micro_batch, n_train, args.output / "validation.png")


if __name__ == "__main__":
    main()
