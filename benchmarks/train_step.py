"""The trainer's training step on one device, timed: forward, loss, backward and engine step.

Builds the step exactly as ``launch/train.py`` does (:mod:`benchmarks.step_setup`, through
:class:`launch.training.step.TrainingStep`) for a preset (default ``jigsaw-1b`` at 720 x 1440)
on the serial mesh, for each combination of micro-batch size, ``torch.compile`` on/off and input
path (random batches resident in device memory, or the zarr tile reader with reader threads or
processes), and prints one table row per combination: ms/step (median over the timed steps,
CUDA events), TFLOP/s from the model's forward FLOPs (a training step = 3 x forward), MFU against
an 8192^3 bf16 matmul timed in the same process, and peak device memory.

    python -m benchmarks.train_step --batch 1 4 --compile on --data memory --zero 0 --precision master
    python -m benchmarks.train_step --make-store /tmp/era5.zarr --store-times 16   # synthetic 0.25 deg store
    python -m benchmarks.train_step --batch 1 4 --compile on --data zarr --store /tmp/era5.zarr --readers 8 \
        --reader-kind process --zero 0 --precision master
    python -m benchmarks.train_step --device cpu --preset tiny --batch 1 2 --compile off on --data memory zarr \
        --store /tmp/tiny.zarr

A plain ``python`` process is a world of one (``launch.runtime.distributed``); results and
commands go into ``benchmarks/GPU.md``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.step_setup import ERA5_LEVELS, batch_source, benchmark_run, build_step
from benchmarks.timing import Timer, copy_ceiling, matmul_ceiling, synchronize
from launch.training.step import TrainingStep
from parallel.mesh import ProcessMesh
from weathermixer.config import PRESETS
from weathermixer.counts import forward_flops


def run_case(args, batch: int, compiled: bool, data: str, ceiling: float) -> dict:
    """Build the case's step, warm it up, time ``args.steps`` steps; one result row."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    run = benchmark_run(args.preset, batch, args.zero, args.precision, compiled, args.device,
                        store=args.store if data == "zarr" else None, readers=args.readers,
                        reader_kind=args.reader_kind, checkpointing=args.checkpointing, dropout=args.dropout,
                        bayesian=args.bayesian, samples=args.samples, fp8=args.fp8,
                        fp8_groups=args.fp8_groups.split(",") if args.fp8_groups else None,
                        fp8_backward_groups=args.fp8_backward_groups.split(",") if args.fp8_backward_groups else None)
    step = build_step(run, ProcessMesh.build(run.mesh, device.type), device)
    source = batch_source(step)
    counter = itertools.count()  # the training step: each draws its own weights (a Bayesian model)
    t_warm = time.perf_counter()
    losses = [step.micro_step(source.next(), 1, next(counter)) for _ in range(args.warmup)]
    synchronize(device.type)
    warm_s = time.perf_counter() - t_warm
    static_memory = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if hasattr(source, "wait_ms"):
        source.wait_ms.clear()
    times = []
    for _ in range(args.steps):
        with Timer(device.type) as timer:
            losses.append(step.micro_step(source.next(), 1, next(counter)))
        times.append(timer)
    synchronize(device.type)
    step_ms = [timer.ms() for timer in times]
    loss_values = [float(loss[0]) for loss in losses]
    if not all(math.isfinite(v) for v in loss_values):
        raise RuntimeError(f"non-finite loss in {data} batch={batch} compiled={compiled}: {loss_values}")
    flops = forward_flops(step.model.config)
    median = statistics.median(step_ms)
    tflops = 3 * flops * batch * args.samples / (median * 1e-3) / 1e12
    row = dict(preset=args.preset, batch=batch, compiled=compiled, data=data, zero=args.zero,
               precision=args.precision, checkpointing=args.checkpointing, dropout=step.model.config.dropout,
               bayesian=args.bayesian, samples=args.samples, fp8=args.fp8,
               ms=median, ms_p10=float(np.percentile(step_ms, 10)), ms_p90=float(np.percentile(step_ms, 90)),
               tflops=tflops, mfu=tflops / ceiling if ceiling else float("nan"), flops_per_sample=flops,
               parameters=sum(p.numel() for p in step.model.parameters()), warmup_s=warm_s,
               build_s=t_warm - t_build, loss_first=loss_values[0], loss_last=loss_values[-1], **compiled_graphs())
    if device.type == "cuda":
        row.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                   reserved_gib=torch.cuda.max_memory_reserved() / 2**30, static_gib=static_memory / 2**30)
    if hasattr(source, "wait_ms"):
        row["data_wait_ms"] = statistics.median(source.wait_ms)
    if args.profile and device.type == "cuda":
        row["profile"] = profile_steps(step, source, args.profile_rows,
                                       args.profile_out / f"kernels-b{batch}.json" if args.profile_out else None)
    source.close()
    del step, source
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def compiled_graphs() -> dict:
    """Graphs dynamo compiled and graph breaks it took in this process (a whole-model graph: 1 and 0)."""
    from torch._dynamo.utils import counters

    return dict(graphs=int(counters["stats"]["unique_graphs"]),
                graph_breaks=int(sum(counters["graph_break"].values())),
                graph_break_reasons=[reason.splitlines()[0] for reason in counters["graph_break"]][:4])


# kernel name patterns -> the part of the step they belong to (first match wins)
KERNEL_KINDS = (
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")),
    ("fused element-wise (triton)", ("triton",)),
    ("the project's Triton kernels", ("_draw_kernel", "_cast_transpose_kernel")),
    ("optimizer (Adam)", ("adam",)),
    ("collectives", ("nccl",)),
    ("dropout masks or positions (aten)", ("dropout", "distribution", "philox", "bernoulli", "poisson")),
    ("copies", ("memcpy", "memset", "copy", "catarray", "fill")),
    ("norms, reductions (aten)", ("reduce_kernel", "norm")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, patterns in KERNEL_KINDS:
        if any(pattern in lowered for pattern in patterns):
            return kind
    return "other aten element-wise"


def profile_steps(step: TrainingStep, source, rows: int, out: Path | None = None, steps: int = 3) -> str:
    """The kernel table of ``steps`` steps, and the device time per step by kind of kernel;
    with ``out``, every kernel (full name, calls and ms per step) as JSON there."""
    from torch.profiler import ProfilerActivity, profile

    timers = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with Timer("cuda") as timer:
                step.micro_step(source.next(), 1, 0)
            timers.append(timer)
        torch.cuda.synchronize()
    events = prof.key_averages()
    if out is not None:
        kernels = [dict(name=event.key, kind=kernel_kind(event.key), calls_per_step=event.count / steps,
                        ms_per_step=event.self_device_time_total / 1e3 / steps) for event in events
                   if event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0
                   and not getattr(event, "is_user_annotation", False)]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(sorted(kernels, key=lambda k: -k["ms_per_step"]), indent=1))
        trace = out.with_name(out.stem.replace("kernels", "trace") + ".json")
        prof.export_chrome_trace(str(trace))
        print(f"kernel list written to {out}, timeline to {trace}", flush=True)
    kinds: dict[str, float] = {}
    for event in events:
        if (event.device_type == torch.autograd.DeviceType.CUDA and event.self_device_time_total > 0
                and not getattr(event, "is_user_annotation", False)):  # kernels only, not annotated ranges
            kind = kernel_kind(event.key)
            kinds[kind] = kinds.get(kind, 0.0) + event.self_device_time_total / 1e3 / steps
    step_ms = statistics.median(timer.ms() for timer in timers)
    busy = sum(kinds.values())
    summary = [f"device time per step by kind of kernel (profiled step {step_ms:.1f} ms, kernels {busy:.1f} ms, "
               f"idle {step_ms - busy:.1f} ms):"]
    summary += [f"  {kind:<30} {ms:8.1f} ms" for kind, ms in sorted(kinds.items(), key=lambda item: -item[1])]
    table = events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=90)
    return table + "\n" + "\n".join(summary)


def print_table(rows: list[dict], ceiling: float, config_name: str) -> None:
    print(f"\n{config_name}: TFLOP/s = 3 x forward FLOPs x batch x samples / step; MFU against the {ceiling:.0f} "
          f"TFLOP/s bf16 matmul ceiling measured in this process")
    head = (f"{'fp8':>10} {'bayesian':>14} {'S':>2} {'batch':>5} {'compile':>7} {'data':>6} {'ZeRO':>4} {'precision':>9} {'ckpt':>4} {'ms/step':>8} "
            f"{'p10-p90':>13} {'TFLOP/s':>7} {'MFU':>6} {'peak GiB':>8} {'states GiB':>10} {'wait ms':>7} {'graphs':>6} {'breaks':>6}")
    print(head)
    for r in rows:
        print(f"{r['fp8']:>10} {r['bayesian']:>14} {r['samples']:>2} {r['batch']:>5} {('on' if r['compiled'] else 'off'):>7} {r['data']:>6} {r['zero']:>4} "
              f"{r['precision']:>9} {('on' if r['checkpointing'] else 'off'):>4} {r['ms']:>8.1f} "
              f"{r['ms_p10']:>6.1f}-{r['ms_p90']:<6.1f} {r['tflops']:>7.1f} {r['mfu']:>6.1%} "
              f"{r.get('peak_gib', float('nan')):>8.1f} {r.get('static_gib', float('nan')):>10.1f} "
              f"{r.get('data_wait_ms', float('nan')):>7.2f} {r.get('graphs', 0):>6} {r.get('graph_breaks', 0):>6}")


def run_isolated(args, argv, cases) -> list[dict]:
    """Each case in a child process of this script; rows collected from their JSON output."""
    import subprocess
    import tempfile

    argv = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], 0
    for item in argv:  # drop the case lists; each child gets one value of each
        if skip and not item.startswith("--"):
            continue
        skip = item in ("--batch", "--compile", "--data")
        if not skip:
            kept.append(item)
    rows = []
    for data, compiled, batch in cases:
        with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
            command = [sys.executable, "-m", "benchmarks.train_step", *kept, "--batch", str(batch), "--compile", compiled, "--data", data,
                       "--json", out.name, "--in-process"]
            result = subprocess.run(_strip_json(command, out.name))
            lines = Path(out.name).read_text().splitlines()
        if result.returncode or not lines:
            print(f"case data={data} compile={compiled} batch={batch}: child exited with {result.returncode}",
                  flush=True)
            continue
        row = json.loads(lines[-1])
        rows.append(row)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print_table(rows, rows[0]["ceiling_tflops"] if rows else float("nan"), f"{args.preset} on {args.device}")
    return rows


def _strip_json(command: list[str], keep: str) -> list[str]:
    """Drop every ``--json PATH`` except ``--json keep``."""
    out, i = [], 0
    while i < len(command):
        if command[i] == "--json" and i + 1 < len(command) and command[i + 1] != keep:
            i += 2
            continue
        out.append(command[i])
        i += 1
    return out


# ------------------------------------------------------------------------------ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="jigsaw-1b", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="micro-batch sizes")
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=("off", "on"))
    parser.add_argument("--data", nargs="+", default=["memory"], choices=("memory", "zarr"))
    parser.add_argument("--zero", type=int, default=1, choices=(0, 1, 2), help="configs/deepspeed/zero<N>.json")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "autocast", "master", "fp32"),
                        help="bf16: DeepSpeed bf16 (bf16 weights, fp32 master copy in its optimizer); "
                             "autocast: fp32 weights under torch.autocast(bf16); master: bf16 weights, fp32 "
                             "master weights in the optimizer (optimizer.master_weights, ZeRO-0)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per mixer block")
    parser.add_argument("--dropout", type=float, default=None, help="override the preset's dropout probability")
    parser.add_argument("--bayesian", default="none", help="model.bayesian: Bayesian layer groups (e.g. all)")
    parser.add_argument("--fp8", default="none", choices=("none", "tensorwise", "delayed"),
                        help="model.fp8: FP8 matrix products (the mixing layers, and the embedding's and "
                             "decoder's gradient products)")
    parser.add_argument("--fp8-groups", default=None,
                        help="model.fp8_groups, comma-separated (e.g. all, or token_mixing,channel_mixing,embedding)")
    parser.add_argument("--fp8-backward-groups", default=None,
                        help="model.fp8_backward_groups, comma-separated: layer groups whose gradient products "
                             "alone run in FP8 (default the model's: embedding,decoder; none for none)")
    parser.add_argument("--samples", type=int, default=1, help="training.samples: Monte Carlo samples per step")
    parser.add_argument("--warmup", type=int, default=None, help="steps before timing (default 8 on cuda)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on cuda)")
    parser.add_argument("--store", default=None, help="zarr store for --data zarr")
    parser.add_argument("--readers", type=int, default=4, help="reader threads or processes (data.workers)")
    parser.add_argument("--reader-kind", default="thread", choices=("thread", "process"), help="data.worker_kind")
    parser.add_argument("--make-store", type=Path, default=None, help="write a synthetic store here and exit")
    parser.add_argument("--store-times", type=int, default=16)
    parser.add_argument("--store-codec", default="blosc", choices=("blosc", "none"),
                        help="blosc: the store contract's Blosc lz4 + shuffle; none: uncompressed")
    parser.add_argument("--store-grid", default=None, help="NLATxNLON (default: the preset's grid)")
    parser.add_argument("--profile", action="store_true", help="print a kernel profile of 3 steps per case")
    parser.add_argument("--profile-rows", type=int, default=30)
    parser.add_argument("--profile-out", type=Path, default=None,
                        help="with --profile: every kernel (name, calls, ms per step) to DIR/kernels-b<batch>.json "
                             "and the profiled steps' timeline to DIR/trace-b<batch>.json")
    parser.add_argument("--in-process", action="store_true",
                        help="run all cases in this process (default on cuda: one child process per case, "
                             "because a DeepSpeed engine does not give all its device memory back)")
    parser.add_argument("--json", type=Path, default=None, help="append result rows here (JSON lines)")
    parser.add_argument("--skip-ceiling", action="store_true")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.warmup = args.warmup if args.warmup is not None else (2 if cpu else 8)
    args.steps = args.steps if args.steps is not None else (3 if cpu else 30)
    if "zarr" in args.data and not args.store and args.make_store is None:
        parser.error("--data zarr needs --store PATH (make one with --make-store PATH)")
    return args


def make_store(args) -> None:
    from data.synthetic import write_synthetic_store
    from weathermixer.config import preset

    config = preset(args.preset)
    grid = tuple(int(v) for v in args.store_grid.lower().split("x")) if args.store_grid else (config.lat, config.lon)
    levels = ERA5_LEVELS if config.in_channels == 69 else (500, 850)
    t0 = time.perf_counter()
    write_synthetic_store(args.make_store, grid, levels, args.store_times, compressed=args.store_codec != "none")
    size = sum(f.stat().st_size for f in args.make_store.rglob("*") if f.is_file())
    print(f"wrote {args.make_store}: grid {grid[0]}x{grid[1]}, {len(levels)} levels, {args.store_times} times, "
          f"{size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.make_store is not None:
        make_store(args)
        return []
    cases = list(itertools.product(args.data, args.compile, args.batch))
    if args.device == "cuda" and len(cases) > 1 and not args.in_process:
        return run_isolated(args, argv, cases)  # before any process group: the children need the port
    from launch.runtime.distributed import init_distributed, shutdown_distributed

    init_distributed(args.device)
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ceiling = float("nan") if args.skip_ceiling else matmul_ceiling(args.device, 8192 if args.device == "cuda"
                                                                    else 512)
    bandwidth = copy_ceiling(args.device, 2**31 if args.device == "cuda" else 2**24)
    print(f"ceilings: bf16 matmul {ceiling:.0f} TFLOP/s, device copy {bandwidth:.0f} GB/s (read + write)", flush=True)
    rows = []
    for data, compiled, batch in cases:
        try:
            row = run_case(args, batch, compiled == "on", data, ceiling)
        except torch.OutOfMemoryError as error:
            print(f"batch={batch} compile={compiled} data={data}: out of memory ({str(error).splitlines()[0]})",
                  flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        row.update(ceiling_tflops=ceiling, copy_gbs=bandwidth)
        profile = row.pop("profile", None)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if profile:
            print(profile, flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print_table(rows, ceiling, f"{args.preset} on {args.device}")
    shutdown_distributed()
    return rows


if __name__ == "__main__":
    main()
