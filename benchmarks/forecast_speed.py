"""Forecast throughput: seconds for one autoregressive rollout on one device, bf16, no grad.

    python -m benchmarks.forecast_speed --preset jigsaw-1b --steps 40 --compile off on

Weights in bf16 (``model.to(torch.bfloat16)``), ``torch.inference_mode``, batch 1, the
10-day (40 x 6 h) rollout of ``WeatherMixer.rollout(mode="autoregressive")`` on random
normalised inputs; the time is the median of ``--repeats`` rollouts after one warm-up
rollout (which also compiles).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.timing import matmul_ceiling
from launch.runtime.compile import compile_step
from weathermixer.config import PRESETS, preset
from weathermixer.counts import forward_flops
from weathermixer.model import WeatherMixer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="jigsaw-1b", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=40, help="6-hour steps (40 = 10 days)")
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=("off", "on"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device, dtype = args.device, torch.bfloat16
    config = preset(args.preset)
    flops = float(forward_flops(config, args.steps))
    ceiling = matmul_ceiling(device, 8192 if device == "cuda" else 512)
    with torch.device(device):  # the weights are drawn where they live
        base = WeatherMixer(config)
    generator = torch.Generator(device=device).manual_seed(0)
    lat, lon = config.model_lat, config.model_lon
    state = torch.randn(1, lat, lon, config.in_channels, device=device, generator=generator).to(dtype)
    static = torch.randn(lat, lon, config.static_channels, device=device, generator=generator).to(dtype)
    forcings = torch.randn(1, args.steps, lat, lon, config.forcing_channels, device=device,
                           generator=generator).to(dtype)
    print(f"{args.preset}: {args.steps}-step autoregressive rollout, batch 1, bf16 weights, inference_mode; "
          f"{flops / 1e12:.1f} TFLOP per rollout; bf16 matmul ceiling {ceiling:.0f} TFLOP/s", flush=True)
    results = []
    for compiled in [c == "on" for c in args.compile]:
        model = base.to(device, dtype).eval()
        if compiled:
            compile_step(model)
        times = []
        with torch.inference_mode():
            for k in range(args.repeats + 1):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model.rollout(state, static, forcings, args.steps)
                if device == "cuda":
                    torch.cuda.synchronize()
                if k:  # the first rollout warms up (and compiles)
                    times.append(time.perf_counter() - t0)
                if not torch.isfinite(out[:, -1].float()).all():
                    raise RuntimeError("non-finite forecast")
                del out
        seconds = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        results.append((compiled, seconds, flops / seconds / 1e12, peak))
        print(f"compile={'on' if compiled else 'off'}: {seconds:.3f} s per rollout ({seconds / args.steps * 1e3:.1f} "
              f"ms/step, {flops / seconds / 1e12:.0f} TFLOP/s, {flops / seconds / 1e12 / ceiling:.1%} of the matmul "
              f"ceiling), peak {peak:.1f} GiB", flush=True)
        if compiled:
            del model.forward  # back to the class's eager forward
            torch._dynamo.reset()
    print(f"\n{'compile':>7} {'s/rollout':>9} {'ms/step':>8} {'TFLOP/s':>8} {'peak GiB':>8}")
    for compiled, seconds, tflops, peak in results:
        print(f"{('on' if compiled else 'off'):>7} {seconds:>9.3f} {seconds / args.steps * 1e3:>8.1f} {tflops:>8.0f} "
              f"{peak:>8.1f}")


if __name__ == "__main__":
    main()
