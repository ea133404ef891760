"""Forecast from a checkpoint into a WeatherBench2-layout zarr store, on one process or a mesh.

    python launch/forecast.py --checkpoint CKPT --store STORE.zarr --output FORECAST.zarr \\
        --init 2020-01-01T00:2020-01-31T12:12 --steps 40
    torchrun --nproc_per_node 4 launch/forecast.py ... --domain 2x1 --tensor 2
    deepspeed --num_gpus 8 launch/forecast.py ... --device cuda --domain 2x2 --tensor 2 --dtype bfloat16
    torchrun --nproc_per_node 4 launch/forecast.py ... --members 8 --sample 4     # an ensemble

Under a launcher (RANK / WORLD_SIZE / MASTER_ADDR set) torch.distributed starts from the
environment: gloo on CPU, nccl on GPU. Processes beyond one model replica (domain x
tensor) form more replicas: the sample axis shares the ensemble members out, the data axis
(whatever the world size leaves) the init times. ``--members M`` writes an ensemble (a
``realization`` dim): members of a Bayesian checkpoint use their own weight samples, and
each member's initial state is perturbed when the input noise is above 0 (default: the
noise the checkpoint trained with). Members that share the weights (a checkpoint without
Bayesian layers) roll out together, up to ``--batch-size`` (init time, member) pairs at a
time. A rerun of an interrupted forecast with the same arguments keeps the (init time,
member) pairs it had written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from data.schema import StoreError  # noqa: E402
from launch.training.checkpoint_format import CheckpointError  # noqa: E402
from launch.runtime.distributed import DeviceError, init_distributed, shutdown_distributed  # noqa: E402
from launch.inference.forecaster import ForecastError, Members, run_forecast  # noqa: E402
from parallel.fp8 import FP8Error  # noqa: E402
from parallel.mesh import MeshConfig, MeshError  # noqa: E402
from parallel.sharding import ShardingError  # noqa: E402
from weathermixer.config import ConfigError  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tile_grid(text: str) -> tuple[int, int]:
    try:
        lat, lon = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--domain {text!r}: expected LATxLON tiles, e.g. 2x1") from None
    return lat, lon


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="consolidated .pt file or checkpoint folder step_<N>")
    parser.add_argument("--store", required=True, help="zarr store with the initial states (same channels)")
    parser.add_argument("--output", required=True, help="forecast zarr store to write")
    parser.add_argument("--init", required=True, help="init times START[:END[:EVERY_HOURS]], ISO, END inclusive")
    parser.add_argument("--steps", type=int, default=40, help="forecast steps of the model's time step")
    parser.add_argument("--domain", type=tile_grid, default=(1, 1), help="domain tile grid LATxLON")
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel ranks")
    parser.add_argument("--sample", type=int, default=1, help="sample ranks (members are spread over them)")
    parser.add_argument("--members", type=int, default=None, help="ensemble members (default: one deterministic "
                        "forecast, a Bayesian model's mean weights)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the members' weight samples and perturbations")
    parser.add_argument("--input-noise", type=float, default=None, help="members' initial-state perturbation, a "
                        "fraction of each channel's std (default: the checkpoint's training.input_noise)")
    parser.add_argument("--initial-members", action="store_true", help="start member m from member m mod N of "
                        "an ensemble analysis (a --store with a member dimension of N)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch-size", type=int, default=1, help="forecasts rolled out together: init times, and "
                        "the members of a model without Bayesian layers (they share its weights)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--compile", action="store_true",
                        help="compile the model step (torch.compile): ~2x faster rollouts on a GPU after the first")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = init_distributed(args.device, deepspeed=False)
        mesh = MeshConfig(sample=args.sample, domain=args.domain, tensor=args.tensor)
        members = Members(args.members, args.seed, args.input_noise, from_analysis=args.initial_members)
        output = run_forecast(args.checkpoint, args.store, args.output, args.init, args.steps, mesh=mesh,
                              device=device, dtype=DTYPES[args.dtype], batch_size=args.batch_size,
                              overwrite=args.overwrite, compile=args.compile, members=members)
    except (ForecastError, StoreError, CheckpointError, MeshError, ShardingError, ConfigError, DeviceError,
            FP8Error) as error:
        print(f"forecast: error: {error}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"forecast written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
