"""Multi-GPU scaling of the WeatherMixer training step: one process mesh per launch.

Each launch builds the model on a (data, domain tile grid, tensor) mesh, trains
``--steps`` timed steps (the trainer's own step, :mod:`benchmarks.step_setup`, on the mesh) with random
in-memory batches or through each rank's zarr tile reader, and appends one JSON row:
ms/step (the slowest rank's median, CUDA events), samples/s, TFLOP/s per GPU (model FLOP
formula), MFU against an 8192^3 bf16 matmul timed on every GPU in the same run, peak memory
per GPU, and the communication model's prediction for the step: bytes per collective from
``benchmarks/parallel_layout.py``'s formulas divided by the bandwidth of the same
collectives measured on this mesh's groups. ``--report`` prints the table with speedups and
efficiencies against the one-GPU row, and projects the communication to larger meshes.

    bash benchmarks/scaling.sh 4 jigsaw-1b                     # every mesh of 1..4 GPUs
    deepspeed --num_gpus 4 --module benchmarks.scaling --mesh 1,2x2,1 --batch 1 --json rows.jsonl
    python -m benchmarks.scaling --report rows.jsonl
    deepspeed --num_gpus 2 --module benchmarks.scaling --device cpu --preset tiny --mesh 1,1x2,1  # CPU check

Mesh: ``DATA,LATxLON,TENSOR`` (data replicas, domain tile grid, tensor parts). NVLink
multicast stays off (``NCCL_NVLS_ENABLE=0``, set here unless the caller set it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch
import torch.distributed as dist

from benchmarks.step_setup import batch_source, benchmark_run, build_step
from benchmarks.timing import Timer, matmul_ceiling, synchronize
from benchmarks.parallel_layout import Plan, all_reduce
from parallel.mesh import MeshConfig, ProcessMesh
from weathermixer.config import PRESETS
from weathermixer.counts import forward_flops

ELEMENT_BYTES = 2  # bf16 activations and weights on the wire


def parse_mesh(text: str) -> MeshConfig:
    """``DATA,LATxLON,TENSOR`` or, with the sample axis, ``DATA,SAMPLE,LATxLON,TENSOR``."""
    try:
        parts = text.split(",")
        data, sample, domain, tensor = parts if len(parts) == 4 else (parts[0], "1", *parts[1:])
        lat, lon = domain.lower().split("x")
        return MeshConfig(data=int(data), sample=int(sample), domain=(int(lat), int(lon)), tensor=int(tensor))
    except ValueError as error:
        raise SystemExit(f"--mesh {text!r}: expected DATA,LATxLON,TENSOR or DATA,SAMPLE,LATxLON,TENSOR such as "
                         f"2,2x1,1 or 1,2,1x1,1 ({error})") from None


# ------------------------------------------------------------------------------ communication model
def collective_bandwidth(kind: str, group, device: torch.device, part_bytes: int = 64 * 2**20,
                         repeats: int = 10) -> float:
    """Bytes one rank sends per second in an all-gather (``kind="gather"``) or all-reduce of
    ``part_bytes`` per rank over ``group``, with the ring accounting of ``parallel_layout``."""
    if group is None:  # the mesh's convention for an axis of one rank: nothing to send
        return float("inf")
    parts = dist.get_world_size(group)
    x = torch.ones(part_bytes // 2, dtype=torch.bfloat16, device=device)
    out = torch.empty(parts * x.numel(), dtype=x.dtype, device=device)

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13

    def run():
        if kind == "gather":
            gather(out, x, group=group)
        else:
            dist.all_reduce(x, group=group)

    for _ in range(3):
        run()
    synchronize(device.type)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    synchronize(device.type)
    seconds = (time.perf_counter() - t0) / repeats
    sent = part_bytes * (parts - 1) if kind == "gather" else all_reduce(part_bytes, parts)
    return sent / seconds


def communication_model(model, batch: int, model_bw: float, replica_bw: float) -> dict:
    """Bytes this rank sends per step (forward + backward in the model group; gradients over the
    replicas) and the time they take at the measured bandwidths."""
    mesh, config = model.mesh, model.config
    plan = Plan(config, tuple(mesh.config.domain), mesh.config.tensor, mesh.domain_rank, mesh.tensor_rank, batch,
                ELEMENT_BYTES)
    model_bytes = plan.total("forward") + plan.total("backward")
    gradient_bytes = all_reduce(plan.total("params") * ELEMENT_BYTES, mesh.replicas) if mesh.replicas > 1 else 0
    return dict(model_comm_gb=model_bytes / 1e9, gradient_comm_gb=gradient_bytes / 1e9,
                model_bw_gbs=model_bw / 1e9, replica_bw_gbs=replica_bw / 1e9,
                predicted_comm_ms=1e3 * (model_bytes / model_bw + gradient_bytes / replica_bw))


# ------------------------------------------------------------------------------ one launch
def run(args) -> dict | None:
    from launch.runtime.distributed import init_distributed

    device = init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = ProcessMesh.build(parse_mesh(args.mesh), device.type)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{args.preset} on {mesh.describe()}, {world} {device.type} processes, micro-batch {args.batch} "
        f"per replica, {args.data} inputs", flush=True)
    ceiling = matmul_ceiling(device.type, 8192 if device.type == "cuda" else 256)
    t0 = time.perf_counter()
    run_config = benchmark_run(args.preset, args.batch, args.zero, args.precision, args.compile == "on",
                               args.device, store=args.store if args.data == "zarr" else None, readers=args.readers,
                               bayesian=args.bayesian, samples=args.samples, sample_ranks=mesh.config.sample)
    step = build_step(run_config, mesh, device)
    model, config = step.model, step.model.config
    say(f"built in {time.perf_counter() - t0:.0f} s; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters on rank 0", flush=True)
    source = batch_source(step, seed=1000 * rank)
    counter = itertools.count()  # the training step: each draws its own weights (a Bayesian model)
    for _ in range(args.warmup):
        step.micro_step(source.next(), 1, next(counter))
    synchronize(device.type)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    timers = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        with Timer(device.type) as timer:
            loss = step.micro_step(source.next(), 1, next(counter))
        timers.append(timer)
    synchronize(device.type)
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    median = statistics.median(timer.ms() for timer in timers)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    source.close()
    if not math.isfinite(float(loss[0])):
        raise RuntimeError(f"rank {rank}: non-finite loss {float(loss[0])}")

    model_bw = collective_bandwidth("gather", mesh.model_group, device)
    replica_bw = collective_bandwidth("reduce", mesh.replica_group, device)
    comm = communication_model(model, args.batch, model_bw, replica_bw)
    gathered = [None] * world
    dist.all_gather_object(gathered, dict(ms=median, wall_ms=wall_ms, peak=peak, ceiling=ceiling, **comm))
    if rank != 0:
        return None
    slowest = max(gathered, key=lambda g: g["ms"])
    ms = slowest["ms"]
    # the work of a step: forward-backward passes of one sample, over data samples and Monte Carlo samples
    samples = mesh.config.data * args.batch * args.samples
    flops = forward_flops(config)
    tflops_per_gpu = 3 * flops * samples / (ms * 1e-3) / 1e12 / world
    ceiling = min(g["ceiling"] for g in gathered)
    return dict(preset=args.preset, mesh=args.mesh, world=world, bayesian=args.bayesian, mc_samples=args.samples, device=(torch.cuda.get_device_name()
                if device.type == "cuda" else "cpu"), data=args.data, batch=args.batch, global_batch=samples,
                zero=args.zero, compiled=args.compile == "on", ms=ms, wall_ms=max(g["wall_ms"] for g in gathered),
                samples_per_s=samples / (ms * 1e-3), tflops_per_gpu=tflops_per_gpu, ceiling_tflops=ceiling,
                mfu=tflops_per_gpu / ceiling, peak_gib=max(g["peak"] for g in gathered),
                **{k: max(g[k] for g in gathered) for k in comm})


# ------------------------------------------------------------------------------ report
def report(paths: list[Path]) -> None:
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["preset"], row["data"], row["device"], row.get("bayesian", "none")), []).append(row)
    for (name, data, device, bayesian), members in groups.items():
        base = next((r for r in members if r["world"] == 1), None)
        print(f"\n{name} (Bayesian layers: {bayesian}), {data} inputs, {device}: speedup = samples/s against one GPU "
              f"(strong scaling where the global batch stayed the same, weak where it grew with the replicas)")
        print("| mesh (data,LATxLON,tensor) | GPUs | global batch | ms/step | samples/s | speedup | efficiency "
              "| TFLOP/s/GPU | MFU | peak GiB | comm GB/rank (model + grads) | predicted comm ms | overhead ms |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted(members, key=lambda r: (r["world"], r["global_batch"], r["mesh"])):
            speedup = r["samples_per_s"] / base["samples_per_s"] if base else float("nan")
            # the step minus a perfect share of the one-GPU work: what communication (and
            # smaller, less efficient kernels) cost; compare with the prediction
            share = base["ms"] * r["global_batch"] / (base["global_batch"] * r["world"]) if base else float("nan")
            print(f"| {r['mesh']} | {r['world']} | {r['global_batch']} | {r['ms']:.1f} | {r['samples_per_s']:.2f} "
                  f"| {speedup:.2f} | {speedup / r['world']:.2f} | {r['tflops_per_gpu']:.0f} | {r['mfu']:.1%} "
                  f"| {r['peak_gib']:.1f} | {r['model_comm_gb']:.2f} + {r['gradient_comm_gb']:.2f} "
                  f"| {r['predicted_comm_ms']:.1f} | {r['ms'] - share:.1f} |")
    print("\nProjection: the per-rank bytes of a mesh do not depend on the number of replicas except for the "
          "gradient all-reduce, 2 (D-1)/D x parameters/rank x 2 bytes: at 64 and 256 GPUs the model-group term "
          "stays as measured for that layout and the gradient term approaches 4 bytes x parameters/rank.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="jigsaw-1b", choices=sorted(PRESETS))
    parser.add_argument("--mesh", default="1,1x1,1", help="DATA,LATxLON,TENSOR or DATA,SAMPLE,LATxLON,TENSOR")
    parser.add_argument("--bayesian", default="none", help="model.bayesian: Bayesian layer groups (e.g. all)")
    parser.add_argument("--samples", type=int, default=1, help="training.samples: Monte Carlo samples per step")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "autocast", "master", "fp32"))
    parser.add_argument("--batch", type=int, default=1, help="micro-batch per data replica")
    parser.add_argument("--data", default="memory", choices=("memory", "zarr"))
    parser.add_argument("--store", default=None)
    parser.add_argument("--readers", type=int, default=4, help="reader threads per rank (--data zarr)")
    parser.add_argument("--zero", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--compile", default="on", choices=("on", "off"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="append the row here (rank 0)")
    parser.add_argument("--report", type=Path, nargs="+", default=None, help="print the table of these rows and exit")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.warmup = args.warmup if args.warmup is not None else (2 if cpu else 6)
    args.steps = args.steps if args.steps is not None else (3 if cpu else 20)
    if args.data == "zarr" and not args.store:
        parser.error("--data zarr needs --store")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        report(args.report)
        return
    row = run(args)
    if row is not None:
        print(json.dumps(row), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"row appended to {args.json}", flush=True)
    from launch.runtime.distributed import shutdown_distributed

    shutdown_distributed()


if __name__ == "__main__":
    main()
