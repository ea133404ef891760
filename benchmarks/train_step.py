"""The real WeatherMixer training step on one device: DeepSpeed engine, WeightedMSE, bf16.

Times ``forward -> WeightedMSE -> engine.backward -> engine.step`` of a preset (default
``jigsaw-1b`` at 720 x 1440) on the serial mesh, for each combination of micro-batch size,
``torch.compile`` on/off and input path (random batches resident in device memory, or the
zarr tile reader with reader threads or processes, ``--reader-kind``), and prints one table row per
combination: ms/step (median over the timed steps, CUDA events), TFLOP/s from the model's
forward FLOPs (a training step = 3 x forward), MFU against an 8192^3 bf16 matmul timed in
the same process, and peak device memory.

    python benchmarks/train_step.py --batch 1 4 --compile off on --data memory
    python benchmarks/train_step.py --batch 1 4 --compile on --data memory --zero 0 --precision master   # fastest on one GPU
    python benchmarks/train_step.py --make-store /tmp/era5.zarr --store-times 16   # synthetic 0.25 deg store
    python benchmarks/train_step.py --batch 1 4 --compile on --data zarr --store /tmp/era5.zarr --readers 8 --reader-kind process
    python benchmarks/train_step.py --device cpu --preset tiny --batch 1 2 --compile off on --data memory zarr

Single process: RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/LOCAL_RANK default to a world of
one when unset, so plain ``python`` works (the ``deepspeed`` launcher sets them itself).
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from weathermixer.config import PRESETS, preset  # noqa: E402
from weathermixer.loss import WeightedMSE, channel_weights, latitude_weights  # noqa: E402
from weathermixer.model import WeatherMixer  # noqa: E402

ERA5_LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)


# ------------------------------------------------------------------------------ setup
def init_distributed(device: str) -> None:
    """A world of one unless a launcher set the rendezvous variables."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29531")):
        os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Timer:
    """Per-step durations in ms: CUDA events on the GPU, the host clock after a sync elsewhere."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self) -> "Timer":
        if self.device == "cuda":
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            self.end.record()
        else:
            self.t1 = time.perf_counter()

    def ms(self) -> float:
        if self.device == "cuda":
            self.end.synchronize()
            return self.start.elapsed_time(self.end)
        return (self.t1 - self.t0) * 1e3


def matmul_ceiling(device: str, n: int, repeats: int = 30) -> float:
    """TFLOP/s of an ``n^3`` bf16 matmul on random operands (median of ``repeats``)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        torch.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        with Timer(device) as timer:
            torch.matmul(a, b, out=out)
        times.append(timer.ms())
    del a, b, out
    return 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12


def copy_ceiling(device: str, n_bytes: int, repeats: int = 20) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus written."""
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        with Timer(device) as timer:
            dst.copy_(src)
        times.append(timer.ms())
    del src, dst
    return 2 * n_bytes / (statistics.median(times) * 1e-3) / 1e9


# ------------------------------------------------------------------------------ model, loss, engine
def era5_channel_names() -> tuple[list[str], list[str], list[int | None]]:
    from data.schema import SURFACE, UPPER_AIR

    variables = list(SURFACE) + [v for v in UPPER_AIR for _ in ERA5_LEVELS]
    levels = [None] * len(SURFACE) + [lev for _ in UPPER_AIR for lev in ERA5_LEVELS]
    names = [v if lev is None else f"{v}{lev}" for v, lev in zip(variables, levels)]
    return names, variables, levels


def build_loss(model: WeatherMixer, device: str | torch.device) -> WeightedMSE:
    """The loss of ``model``'s tile and channel slice on its mesh: latitude weights of the model
    grid (store latitudes ascending, cropped rows dropped) and ERA5 channel weights when the
    channel count is ERA5's, else uniform ones."""
    config = model.config
    latitudes = np.linspace(-90.0, 90.0, config.lat)[: config.model_lat]
    names, variables, levels = era5_channel_names()
    if config.out_channels == len(names):
        weights = channel_weights(names, variables, levels)
    else:
        weights = torch.ones(config.out_channels, dtype=torch.float64)
    (lat0, lat1), _ = model.layers.tile_bounds()
    local = model.out_channels.indices[model.mesh.tensor_rank].cpu()
    return WeightedMSE(latitude_weights(latitudes)[lat0:lat1], weights[local], config.model_lat * config.model_lon,
                       float(weights.sum()), model.mesh).to(device)


def forward_flops(model: WeatherMixer, batch: int, device: str, dtype: torch.dtype) -> tuple[float, str]:
    """Forward FLOPs of one sample: ``weathermixer.counts`` if present, else the matmul count of
    ``torch.utils.flop_counter`` over one forward at ``batch`` samples."""
    try:
        from weathermixer import counts  # noqa: F401

        for name in ("forward_flops", "flops_per_sample", "forward_flops_per_sample"):
            if hasattr(counts, name):
                return float(getattr(counts, name)(model.config)), f"weathermixer.counts.{name}"
    except ImportError:
        pass
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model).to(device, dtype)
    state, static, forcings, _ = random_batch(model, batch, device, dtype, seed=99)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(state, static, forcings)
    del model
    return counter.get_total_flops() / batch, "torch.utils.flop_counter (one forward)"


def analytic_forward_flops(config) -> float:
    """Matmul FLOPs of one forward sample, written out (a cross-check of the counter)."""
    tokens, hidden = config.n_tokens, config.hidden
    patch_in = config.patch_size * config.input_channels
    patch_out = config.patch_size * config.out_channels
    block = 2 * 2 * tokens * config.token_hidden * hidden + 2 * 2 * tokens * hidden * config.channel_hidden
    decoder_in = 2 * hidden if config.decoder_skip else hidden
    flops = 2 * tokens * patch_in * hidden + config.depth * config.latent_steps * block
    flops += 2 * tokens * decoder_in * patch_out
    if config.residual == "linear":
        points = config.model_lat * config.model_lon
        flops += 2 * points * (config.out_channels + config.in_channels) * config.out_channels
    return float(flops)


def build_model(config, device: str, keep_on_device: bool = False) -> WeatherMixer:
    """The model on the host, its weights drawn on ``device`` from the same law as
    ``reset_parameters`` (U(+-1/sqrt(fan_in)), LayerNorm 1 and 0): the keyed host streams
    that make initialisation mesh-independent take ~40 s for 1B parameters and change
    nothing in the step being timed."""
    from parallel.linear import ShardedModule

    def init_uniform(module, seed, prefix, fan_in):
        bound = 1 / math.sqrt(fan_in)
        for param in module.parameters(recurse=False):
            param.uniform_(-bound, bound)

    original = ShardedModule.init_uniform
    ShardedModule.init_uniform = init_uniform
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = WeatherMixer(config)
    finally:
        ShardedModule.init_uniform = original
    return model if keep_on_device else model.cpu()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases and LayerNorm affines undecayed."""
    decay, plain = [], []
    for param in model.parameters():
        (decay if param.dim() >= 2 else plain).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def deepspeed_config(zero: int, precision: str, batch: int) -> dict:
    config = json.loads((REPO_ROOT / "configs" / "deepspeed" / f"zero{zero}.json").read_text())
    config["train_micro_batch_size_per_gpu"] = batch
    if precision == "autocast":  # fp32 parameters, bf16 matmuls under torch.autocast
        config.pop("bf16", None)
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "master":  # bf16 parameters; the optimizer keeps the fp32 master weights
        if zero != 0:
            raise SystemExit(f"--precision master runs with ZeRO stage 0 (MasterWeightAdam is the optimizer "
                             f"DeepSpeed steps); got --zero {zero}")
        config.pop("bf16", None)
    return config


def build_engine(config, args, batch: int, compiled: bool):
    from launch.engine import initialize_engine

    model = build_model(config.replace(activation_checkpointing=args.checkpointing), args.device, keep_on_device=True)
    optimizer = build_optimizer(model, args.precision, compiled)
    if compiled:
        model.compile(dynamic=False)
    engine, _, _ = initialize_engine(model, optimizer, deepspeed_config(args.zero, args.precision, batch), model.mesh)
    if args.reduce_one_replica:  # DeepSpeed's default, for the comparison
        engine.enable_backward_allreduce = True
    if args.deepspeed_clipping and engine.clip_in_step is not None:  # likewise
        engine.clip_in_step.handle.remove()
        engine.optimizer.grad_scale = engine.optimizer.found_inf = None
        engine._config.gradient_clipping = engine.clip_in_step.max_norm
    return engine


def build_optimizer(model: torch.nn.Module, precision: str, compiled: bool) -> torch.optim.Optimizer:
    """AdamW, decay on matrices: torch's fused one, or for ``--precision master`` the one that
    keeps fp32 master weights of the bf16 parameters (it turns them into bf16)."""
    hyper = dict(lr=1e-4, betas=(0.9, 0.95))
    if precision == "master":
        from launch.master_weights import MasterWeightAdam

        return MasterWeightAdam(param_groups(model, 0.01), decoupled_weight_decay=True, compile=compiled, **hyper)
    return torch.optim.AdamW(param_groups(model, 0.01), fused=True, **hyper)


def input_dtype(args) -> torch.dtype:
    return torch.float32 if args.precision == "autocast" else torch.bfloat16


# ------------------------------------------------------------------------------ inputs
def random_batch(model: WeatherMixer, batch: int, device: str | torch.device, dtype: torch.dtype, seed: int):
    """``(state, static, forcings, target)`` of ``model``'s tile and channel slice (all of them on
    the serial mesh)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    config, rank = model.config, model.mesh.tensor_rank
    lat, lon = model.tile_shape
    channels = lambda n: len(model.layers.channels(n).indices[rank])  # noqa: E731

    def draw(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32, generator=generator).to(dtype)

    return (draw(batch, lat, lon, channels(config.in_channels)), draw(lat, lon, channels(config.static_channels)),
            draw(batch, lat, lon, channels(config.forcing_channels)),
            draw(batch, lat, lon, channels(config.out_channels)))


class MemoryBatches:
    """A few distinct random batches resident on the device, handed out in turn."""

    def __init__(self, model: WeatherMixer, batch: int, device: str | torch.device, dtype: torch.dtype,
                 count: int = 3, seed: int = 0):
        self.batches = [random_batch(model, batch, device, dtype, seed=seed + k) for k in range(count)]
        self.step = 0

    def next(self):
        self.step += 1
        return self.batches[self.step % len(self.batches)]

    def close(self) -> None:
        self.batches.clear()


class ZarrBatches:
    """Batches as the trainer gets them: ``TileReader`` samples read ahead by a prefetcher
    (``readers`` threads, or processes that fill shared page-locked slots) and moved to the
    device one micro-batch ahead on a side stream (``launch.device_batches.DeviceBatches``):
    samples cross in their channel-first float32 memory and the device stacks, normalises,
    casts and exposes the channel-last view (``launch.tiles.RankInputs``), so reading, the
    transfer and the step overlap."""

    def __init__(self, store: str, model: WeatherMixer, batch: int, device: str, dtype: torch.dtype,
                 readers: int, kind: str = "thread"):
        from data.process_prefetch import PREFETCHERS
        from data.sampler import valid_time_indices
        from launch.device_batches import DeviceBatches
        from launch.tiles import RankInputs

        inputs = RankInputs(store, model, pin_memory=device == "cuda")
        indices = valid_time_indices(inputs.reader.times, 1)
        rng = np.random.default_rng(0)
        order = itertools.chain.from_iterable(rng.permutation(indices) for _ in range(10_000))
        self.prefetcher = PREFETCHERS[kind](inputs.reader, (), lead_steps=1, depth=2 * readers + batch,
                                            workers=readers)
        self.batches = DeviceBatches(self.prefetcher, inputs, batch, device, dtype)
        self.batches.start_epoch(int(i) for i in order)
        self.wait_ms: list[float] = []

    def next(self):
        t0 = time.perf_counter()
        state, static, forcings, target = self.batches.next()
        self.wait_ms.append((time.perf_counter() - t0) * 1e3)  # the host's: the next batch's reading and staging
        return state, static, forcings[:, 0], target[:, 0]  # lead 1: the input and one target time

    def close(self) -> None:
        self.prefetcher.close()


# ------------------------------------------------------------------------------ the benchmark
def train_step(engine, loss_fn, state, static, forcings, target) -> torch.Tensor:
    cudagraphs = torch._inductor.config.triton.cudagraphs
    if cudagraphs:  # --cudagraphs: a new step, whose replays may overwrite the last step's outputs
        torch.compiler.cudagraph_mark_step_begin()
    prediction = engine(state, static, forcings)
    loss = loss_fn(prediction, target)
    engine.backward(loss)
    engine.step()
    return loss.detach().clone() if cudagraphs else loss


def run_case(base, args, batch: int, compiled: bool, data: str, ceiling: float, flops_per_sample: float) -> dict:
    device = args.device
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before_engine = torch.cuda.memory_allocated() if device == "cuda" else 0
    t_build = time.perf_counter()
    engine = build_engine(base.config, args, batch, compiled)
    loss_fn = build_loss(base, device)
    if compiled and not args.eager_loss:
        from weathermixer.compile import compiled as compile_function

        loss_fn = compile_function(loss_fn)
    dtype = input_dtype(args)
    if data == "memory":
        source = MemoryBatches(base, batch, device, dtype)
    else:
        source = ZarrBatches(args.store, base, batch, device, dtype, args.readers, args.reader_kind)
    t_warm = time.perf_counter()
    losses = []
    for _ in range(args.warmup):
        losses.append(train_step(engine, loss_fn, *source.next()))
    synchronize(device)
    warm_s = time.perf_counter() - t_warm
    static_memory = torch.cuda.memory_allocated() if device == "cuda" else 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if hasattr(source, "wait_ms"):
        source.wait_ms.clear()
    times = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        with Timer(device) as timer:
            losses.append(train_step(engine, loss_fn, *source.next()))
        times.append(timer)
    synchronize(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    step_ms = [timer.ms() for timer in times]
    loss_values = [float(loss.detach()) for loss in losses]
    if not all(math.isfinite(v) for v in loss_values):
        raise RuntimeError(f"non-finite loss in {data} batch={batch} compiled={compiled}: {loss_values}")
    median = statistics.median(step_ms)
    # data-parallel replicas would multiply this; on one device samples/s = batch / step
    tflops = 3 * flops_per_sample * batch / (median * 1e-3) / 1e12
    row = dict(batch=batch, compiled=compiled, data=data, zero=args.zero, precision=args.precision,
               dropout=base.config.dropout, rng=args.rng, inductor=args.inductor, cudagraphs=args.cudagraphs,
               reduce_one_replica=args.reduce_one_replica, deepspeed_clipping=args.deepspeed_clipping,
               eager_loss=args.eager_loss,
               checkpointing=args.checkpointing, ms=median, ms_p10=float(np.percentile(step_ms, 10)),
               ms_p90=float(np.percentile(step_ms, 90)), wall_ms=wall_ms, tflops=tflops,
               mfu=tflops / ceiling if ceiling else float("nan"), warmup_s=warm_s,
               build_s=t_warm - t_build, loss_first=loss_values[0], loss_last=loss_values[-1],
               **compiled_graphs())
    if device == "cuda":
        row.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                   reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                   static_gib=(static_memory - before_engine) / 2**30)
    if hasattr(source, "wait_ms"):
        row["data_wait_ms"] = statistics.median(source.wait_ms)
    if args.profile and device == "cuda":
        row["profile"] = profile_steps(engine, loss_fn, source, args.profile_rows,
                                       args.profile_out / f"kernels-b{batch}.json" if args.profile_out else None)
    source.close()
    del engine, source, loss_fn
    gc.collect()
    if device == "cuda":
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
    ("optimizer (Adam)", ("adam",)),
    ("collectives", ("nccl",)),
    ("dropout masks (aten)", ("dropout", "distribution", "philox", "bernoulli")),
    ("copies", ("memcpy", "memset", "copy", "catarray", "fill")),
    ("norms, reductions (aten)", ("reduce_kernel", "norm")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, patterns in KERNEL_KINDS:
        if any(pattern in lowered for pattern in patterns):
            return kind
    return "other aten element-wise"


def profile_steps(engine, loss_fn, source, rows: int, out: Path | None = None, steps: int = 3) -> str:
    """The kernel table of ``steps`` steps, and the device time per step by kind of kernel;
    with ``out``, every kernel (full name, calls and ms per step) as JSON there."""
    from torch.profiler import ProfilerActivity, profile

    timers = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with Timer("cuda") as timer:
                train_step(engine, loss_fn, *source.next())
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
    print(f"\n{config_name}: TFLOP/s = 3 x forward FLOPs x batch / step; MFU against the {ceiling:.0f} TFLOP/s "
          f"bf16 matmul ceiling measured in this process")
    head = (f"{'batch':>5} {'compile':>7} {'data':>6} {'ZeRO':>4} {'precision':>9} {'ckpt':>4} {'ms/step':>8} "
            f"{'p10-p90':>13} {'TFLOP/s':>7} {'MFU':>6} {'peak GiB':>8} {'states GiB':>10} {'wait ms':>7} {'graphs':>6} {'breaks':>6}")
    print(head)
    for r in rows:
        print(f"{r['batch']:>5} {('on' if r['compiled'] else 'off'):>7} {r['data']:>6} {r['zero']:>4} "
              f"{r['precision']:>9} {('on' if r['checkpointing'] else 'off'):>4} {r['ms']:>8.1f} "
              f"{r['ms_p10']:>6.1f}-{r['ms_p90']:<6.1f} {r['tflops']:>7.1f} {r['mfu']:>6.1%} "
              f"{r.get('peak_gib', float('nan')):>8.1f} {r.get('static_gib', float('nan')):>10.1f} "
              f"{r.get('data_wait_ms', float('nan')):>7.2f} {r.get('graphs', 0):>6} {r.get('graph_breaks', 0):>6}")


# ------------------------------------------------------------------------------ synthetic store
def make_store(path: Path, grid: tuple[int, int], levels, n_times: int, tile_grid=(1, 1), codec: str = "blosc") -> Path:
    """A store that follows ``data/schema.py`` filled with ``data.synthetic.SyntheticEarth`` fields.

    Uses ``launch/preprocess.py`` on synthetic netCDF files when that module exists;
    otherwise writes the contract store directly (xarray, zarr v3, chunks time=1, level=1,
    one spatial chunk per tile), as ``tests/data/store_fixtures.py`` does.
    """
    import pandas as pd
    import xarray as xr

    from data.schema import STATIC, SURFACE, UPPER_AIR, StoreAttrs, model_channel_order
    from data.synthetic import STATIC_FILE_VARIABLES, SyntheticEarth

    n_lat, n_lon = grid
    levels = sorted(levels)
    times = pd.date_range("2020-01-01", periods=n_times, freq="6h")
    earth = SyntheticEarth(n_lat, n_lon, seed=0)
    noise = {(name, level): earth.noise_coefficients(name, level, n_times, 6)
             for name in (*UPPER_AIR, *SURFACE) for level in (levels if name in UPPER_AIR else [0])}
    upper = {name: np.empty((n_times, len(levels), n_lat, n_lon), np.float32) for name in UPPER_AIR}
    surface = {name: np.empty((n_times, n_lat, n_lon), np.float32) for name in SURFACE}
    for i, t in enumerate(times):
        for j, level in enumerate(levels):
            for name, values in earth.upper_air(t, level, {n: noise[n, level][i] for n in UPPER_AIR}).items():
                upper[name][i, j] = values
        for name, values in earth.surface(t, {n: noise[n, 0][i] for n in SURFACE}).items():
            surface[name][i] = values
    flip = slice(None, None, -1)  # synthetic latitudes run 90 -> -90; the store ascends
    data_vars = {name: (("time", "level", "latitude", "longitude"), values[:, :, flip],
                        {"long_name": UPPER_AIR[name][0], "units": UPPER_AIR[name][1]})
                 for name, values in upper.items()}
    data_vars.update({name: (("time", "latitude", "longitude"), values[:, flip],
                             {"long_name": SURFACE[name][0], "units": SURFACE[name][1]})
                      for name, values in surface.items()})
    static_fields = {"lsm": earth.lsm, "orography": earth.orography}
    assert set(static_fields) == set(STATIC_FILE_VARIABLES.values())
    data_vars.update({name: (("latitude", "longitude"), values[flip],
                             {"long_name": STATIC[name][0], "units": STATIC[name][1]})
                      for name, values in static_fields.items()})
    dataset = xr.Dataset(data_vars, coords={
        "time": times.values, "level": np.asarray(levels, dtype=np.int64),
        "latitude": ("latitude", earth.latitude[flip].copy(), {"units": "degrees_north"}),
        "longitude": ("longitude", earth.longitude, {"units": "degrees_east"})})
    channels = model_channel_order(list(SURFACE), list(UPPER_AIR), levels)
    mean, std = [], []
    for channel in channels:
        values = dataset[channel.variable]
        if channel.level is not None:
            values = values.sel(level=channel.level)
        mean.append(float(values.mean()))
        std.append(float(values.std()))
    dataset.attrs = StoreAttrs(
        channels=channels, static_channels=list(static_fields), time_step_hours=6, tile_grid=tuple(tile_grid),
        mean=mean, std=std, tendency_std=[1.0] * len(channels),
        static_mean=[float(v.mean()) for v in static_fields.values()],
        static_std=[float(v.std()) for v in static_fields.values()],
        statistics_period=(str(times[0])[:10], str(times[-1])[:10]), complete=True).to_json()
    from data.preprocess import spatial_chunks
    from data.schema import field_encoding

    chunks = spatial_chunks((n_lat, n_lon), tuple(tile_grid))
    encoding = {name: field_encoding(variable.dims, chunks, compressed=codec != "none")
                for name, variable in dataset.data_vars.items()}
    if codec == "zstd":  # zarr's default codec, for comparison
        for item in encoding.values():
            del item["compressors"]
    dataset.to_zarr(path, zarr_format=3, consolidated=False, encoding=encoding, mode="w")
    return path


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
            command = [sys.executable, __file__, *kept, "--batch", str(batch), "--compile", compiled, "--data", data,
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="jigsaw-1b", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="micro-batch sizes")
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=("off", "on"))
    parser.add_argument("--data", nargs="+", default=["memory"], choices=("memory", "zarr"))
    parser.add_argument("--zero", type=int, default=1, choices=(0, 1, 2), help="configs/deepspeed/zero<N>.json")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "autocast", "master"),
                        help="bf16: DeepSpeed bf16 (bf16 weights, fp32 master copy in its optimizer); "
                             "autocast: fp32 weights under torch.autocast(bf16); master: bf16 weights, fp32 "
                             "master weights in launch.master_weights.MasterWeightAdam (ZeRO-0)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per mixer block")
    parser.add_argument("--reduce-one-replica", action="store_true",
                        help="let DeepSpeed reduce gradients with one replica too (its default; launch.engine "
                             "skips that no-op at ZeRO-0)")
    parser.add_argument("--deepspeed-clipping", action="store_true",
                        help="DeepSpeed clips (its default) instead of the fused optimizer step (launch.engine)")
    parser.add_argument("--eager-loss", action="store_true", help="with --compile on: the loss stays eager")
    parser.add_argument("--dropout", type=float, default=None, help="override the preset's dropout probability")
    parser.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings, e.g. triton.persistent_reductions=False")
    parser.add_argument("--persistent", type=int, nargs=2, default=None, metavar=("INNER", "OTHER"),
                        help="persistent reductions up to INNER contiguous / OTHER other elements "
                             "(weathermixer.compile.persistent_reductions_up_to)")
    parser.add_argument("--rng", default="aten", choices=("aten", "inductor"),
                        help="random numbers in compiled graphs: aten's kernels (the eager masks; the default of "
                             "weathermixer.compile) or inductor's philox fused into the consumers' kernels")
    parser.add_argument("--cudagraphs", action="store_true",
                        help="inductor's CUDA graphs (triton.cudagraphs) for the compiled graphs: each step's "
                             "kernels replayed from a recorded graph instead of launched one by one")
    parser.add_argument("--warmup", type=int, default=None, help="steps before timing (default 8 on cuda)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on cuda)")
    parser.add_argument("--store", default=None, help="zarr store for --data zarr")
    parser.add_argument("--readers", type=int, default=4, help="reader threads or processes")
    parser.add_argument("--reader-kind", default="thread", choices=("thread", "process"),
                        help="thread: data.prefetch.Prefetcher; process: data.process_prefetch.ProcessPrefetcher "
                             "(shared page-locked slots)")
    parser.add_argument("--make-store", type=Path, default=None, help="write a synthetic store here and exit")
    parser.add_argument("--store-times", type=int, default=16)
    parser.add_argument("--store-codec", default="blosc", choices=("blosc", "zstd", "none"),
                        help="blosc: the store contract's Blosc lz4 + shuffle (data.schema.field_encoding); "
                             "zstd: zarr's default; none: uncompressed")
    parser.add_argument("--store-grid", default=None, help="NLATxNLON (default: the preset's grid)")
    parser.add_argument("--profile", action="store_true", help="print a kernel profile of 3 steps per case")
    parser.add_argument("--profile-rows", type=int, default=30)
    parser.add_argument("--profile-out", type=Path, default=None,
                        help="with --profile: write every kernel (name, calls, ms per step) to DIR/kernels-b<batch>.json "
                             "and the profiled steps' timeline (Chrome trace) to DIR/trace-b<batch>.json")
    parser.add_argument("--in-process", action="store_true",
                        help="run all cases in this process (default on cuda: one child process per case, "
                             "because a DeepSpeed engine does not give all its device memory back)")
    parser.add_argument("--json", type=Path, default=None, help="append result rows here (JSON lines)")
    parser.add_argument("--skip-ceiling", action="store_true")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.warmup = args.warmup if args.warmup is not None else (2 if cpu else 8)
    args.steps = args.steps if args.steps is not None else (3 if cpu else 30)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    config = preset(args.preset) if args.dropout is None else preset(args.preset, dropout=args.dropout)
    if args.make_store is not None:
        grid = tuple(int(v) for v in args.store_grid.lower().split("x")) if args.store_grid else (config.lat,
                                                                                                 config.lon)
        levels = ERA5_LEVELS if config.in_channels == 69 else (500, 850)
        t0 = time.perf_counter()
        make_store(args.make_store, grid, levels, args.store_times, codec=args.store_codec)
        size = sum(f.stat().st_size for f in args.make_store.rglob("*") if f.is_file())
        print(f"wrote {args.make_store}: grid {grid[0]}x{grid[1]}, {len(levels)} levels, {args.store_times} times, "
              f"{size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")
        return []
    if "zarr" in args.data and not args.store:
        raise SystemExit("--data zarr needs --store PATH (make one with --make-store PATH)")
    cases = list(itertools.product(args.data, args.compile, args.batch))
    if args.device == "cuda" and len(cases) > 1 and not args.in_process:
        return run_isolated(args, argv, cases)  # before any process group: the children need the port
    init_distributed(args.device)
    import torch._inductor.config

    from weathermixer.compile import configure_inductor

    configure_inductor()  # the trainer's settings; --rng and --inductor change them for experiments
    torch._inductor.config.fallback_random = args.rng == "aten"
    torch._inductor.config.triton.cudagraphs = args.cudagraphs
    for setting in args.inductor:
        key, _, value = setting.partition("=")
        owner = torch._inductor.config
        *path, name = key.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, json.loads(value.lower()) if value.lower() in ("true", "false") else json.loads(value))
    if args.persistent:
        from weathermixer.compile import persistent_reductions_up_to

        persistent_reductions_up_to(*args.persistent)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    ceiling = float("nan") if args.skip_ceiling else matmul_ceiling(args.device, 8192 if args.device == "cuda"
                                                                    else 512)
    bandwidth = copy_ceiling(args.device, 2**31 if args.device == "cuda" else 2**24)
    print(f"ceilings: bf16 matmul {ceiling:.0f} TFLOP/s (8192^3 on cuda), device copy {bandwidth:.0f} GB/s "
          f"(read + write)", flush=True)

    rows = []
    for data in args.data:
        if data == "zarr":
            from launch.tiles import config_for_store

            model_config = config_for_store(config, args.store)
        else:
            model_config = config
        t0 = time.perf_counter()
        base = build_model(model_config, args.device)
        print(f"{args.preset} ({data} inputs): {sum(p.numel() for p in base.parameters()) / 1e9:.3f}B parameters, "
              f"grid {model_config.model_lat}x{model_config.model_lon}, {model_config.n_tokens} tokens, "
              f"{model_config.input_channels} input channels; built in {time.perf_counter() - t0:.0f} s", flush=True)
        flops, source = forward_flops(base, 1, args.device, input_dtype(args))
        analytic = analytic_forward_flops(model_config)
        print(f"forward FLOPs/sample {flops / 1e12:.3f} T ({source}); written-out formula {analytic / 1e12:.3f} T",
              flush=True)
        for compiled, batch in itertools.product([c == "on" for c in args.compile], args.batch):
            try:
                row = run_case(base, args, batch, compiled, data, ceiling, flops)
            except torch.OutOfMemoryError as error:
                print(f"batch={batch} compile={compiled} data={data}: out of memory ({str(error).splitlines()[0]})",
                      flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            row.update(preset=args.preset, flops_per_sample=flops, ceiling_tflops=ceiling, copy_gbs=bandwidth,
                       parameters=sum(p.numel() for p in base.parameters()))
            profile = row.pop("profile", None)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if profile:
                print(profile, flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print_table(rows, ceiling, f"{args.preset} on {args.device}")
    return rows


if __name__ == "__main__":
    main()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
