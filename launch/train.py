"""Train a WeatherMixer: ``deepspeed --num_gpus N launch/train.py --config configs/train/<run>.yaml``.

Also runs under ``torchrun --nproc_per_node N`` and as one plain ``python`` process. The
world size must equal data x sample x domain x tensor of the config's mesh (``mesh.data``
may be left out and is then inferred). ``--set key=value`` overrides any config entry.
A run whose ``checkpoint.dir`` holds a complete checkpoint resumes from it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

from launch.training.config import RunConfigError, load_run_config  # noqa: E402
from launch.training.profiling import parse_step_window  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="launch/train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML (configs/train/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry, e.g. --set optimizer.lr=3e-4 (repeatable)")
    parser.add_argument("--init-from", help="start from these weights (consolidated .pt or checkpoint folder, "
                        "any mesh) instead of a fresh initialisation")
    parser.add_argument("--resume-from", metavar="FOLDER", help="resume from this checkpoint folder "
                        "(<run>/checkpoints/step_<N>, any mesh) instead of the newest complete one in checkpoint.dir")
    parser.add_argument("--stop-after", type=int, metavar="STEPS", help="checkpoint and exit after this many "
                        "steps of this invocation (for job time limits); the same command resumes")
    parser.add_argument("--profile", metavar="FIRST:LAST", help="record steps FIRST..LAST on every rank: "
                        "<checkpoint.dir>/profile/rank<r>.json (timeline) and rank<r>.txt (table)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        run = load_run_config(args.config, args.set)
        profile = parse_step_window(args.profile) if args.profile else None
    except (RunConfigError, ValueError) as error:
        parser.error(str(error))
    if profile and profile[1] > run.training.steps:
        parser.error(f"--profile {args.profile}: the run has {run.training.steps} steps (training.steps)")

    import torch.distributed as dist

    from launch.runtime.distributed import CollectiveTimeout, init_distributed, shutdown_distributed
    from data.schema import StoreError
    from launch.training.checkpoint_format import CheckpointError
    from launch.training.loop import Trainer
    from parallel.fp8 import FP8Error
    from parallel.mesh import MeshError

    device = init_distributed(run.training.device, timeout_seconds=run.training.collective_timeout_seconds)
    together = False  # whether every rank ends here together (then they wait for each other)
    try:
        try:
            run.mesh.resolve(dist.get_world_size())
            trainer = Trainer(run, device, init_from=args.init_from, quiet=args.quiet, resume_from=args.resume_from)
            result = trainer.train(stop_after=args.stop_after, profile=profile)
            together = True
            return result
        except (MeshError, StoreError, CheckpointError, FloatingPointError, FP8Error) as error:  # every rank: one says it
            together = True
            if dist.get_rank() == 0:
                print(f"launch/train.py: {error}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        except CollectiveTimeout as error:  # the ranks that were waiting say it
            print(f"launch/train.py: {error}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
    finally:
        shutdown_distributed(barrier=together)

if __name__ == "__main__":
    main()
