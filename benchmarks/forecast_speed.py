"""Forecast throughput: seconds for autoregressive rollouts on one device, bf16, no grad.

    python -m benchmarks.forecast_speed --preset jigsaw-1b --steps 40 --compile off on
    python -m benchmarks.forecast_speed --preset jigsaw-1b --steps 40 --compile on --members 8 --member-batch 4

Weights in bf16 (``model.to(torch.bfloat16)``), ``torch.inference_mode``, the 10-day (40 x 6 h)
rollout of the forecaster's :class:`launch.inference.forecaster.MemberRollout` (each member's
initial state perturbed by :class:`weathermixer.input_noise.InputNoise`, then
``WeatherMixer.rollout``) on random normalised inputs. ``--members M``: one member's rollout
(batch 1), and the M members of one init time batched as the forecaster batches members that
share the weights, ``--member-batch`` of them at a time; the speed-up is M x the one-member time
over the batched time. ``--bayesian GROUPS``: those layers Bayesian, each member its own weight
sample (drawn once for its rollout), so members roll out one at a time (``--member-batch 1``).
Times are medians of ``--repeats`` runs after one warm-up run of each batch shape (which also
compiles it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.timing import matmul_ceiling, synchronize
from launch.inference.forecaster import MemberRollout
from launch.runtime.compile import compile_step
from weathermixer.config import PRESETS, preset
from weathermixer.counts import forward_flops
from weathermixer.input_noise import InputNoise
from weathermixer.model import WeatherMixer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="jigsaw-1b", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=40, help="6-hour steps (40 = 10 days)")
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=("off", "on"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--members", type=int, default=1, help="ensemble members of one init time (M)")
    parser.add_argument("--member-batch", type=int, default=None,
                        help="members rolled out together (default: all M); a smaller chunk bounds the memory")
    parser.add_argument("--input-noise", type=float, default=0.05,
                        help="the members' initial-state perturbation, a fraction of each channel's std")
    parser.add_argument("--bayesian", default="none", help="model.bayesian: Bayesian layer groups (e.g. all)")
    args = parser.parse_args(argv)
    args.member_batch = args.member_batch or (1 if args.bayesian != "none" else args.members)
    if min(args.steps, args.repeats, args.members) < 1 or not 1 <= args.member_batch <= args.members:
        parser.error(f"--steps {args.steps} / --repeats {args.repeats} / --members {args.members} / --member-batch "
                     f"{args.member_batch}: expected positive integers and member-batch <= members")
    if args.bayesian != "none" and args.member_batch != 1:
        parser.error(f"--member-batch {args.member_batch} with --bayesian: each member has its own weights; expected 1")
    if args.input_noise <= 0:
        parser.error(f"--input-noise {args.input_noise}: expected > 0 (the members differ by their perturbation)")
    return args


class Inputs:
    """Random normalised inputs of one init time, copied to a batch of members as the forecaster
    copies the members' rows of an init time's state."""

    def __init__(self, config, steps: int, device: str, dtype: torch.dtype):
        generator = torch.Generator(device=device).manual_seed(0)
        lat, lon = config.model_lat, config.model_lon

        def draw(*shape):
            return torch.randn(*shape, device=device, generator=generator).to(dtype)

        self.state = draw(1, lat, lon, config.in_channels)
        self.static = draw(lat, lon, config.static_channels)
        self.forcings = draw(1, steps, lat, lon, config.forcing_channels)

    def of(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.zeros(batch, dtype=torch.long, device=self.state.device)
        return self.state[rows], self.forcings[rows]


def time_rollouts(roll_out: MemberRollout, inputs: Inputs, chunks: list[list[int]], steps: int, repeats: int,
                  device: str) -> tuple[float, float]:
    """Median seconds to roll out the members of ``chunks`` (one batch each, one after another),
    and the peak GiB; the first run warms up (and compiles each batch shape)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, finite = [], []
    with torch.inference_mode():
        for k in range(repeats + 1):
            synchronize(device)
            t0 = time.perf_counter()
            for members in chunks:
                state, forcings = inputs.of(len(members))
                out = roll_out(state, inputs.static, forcings, (0,) * len(members), members, steps)
                finite.append(torch.isfinite(out[:, -1]).all())
                del out  # as the forecaster hands each batch to the store before the next
            synchronize(device)
            if k:
                times.append(time.perf_counter() - t0)
    if not all(bool(ok) for ok in finite):
        raise RuntimeError("non-finite forecast")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return statistics.median(times), peak


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype, members = args.device, torch.bfloat16, args.members
    config = preset(args.preset).replace(bayesian=args.bayesian)
    flops = float(forward_flops(config, args.steps))
    ceiling = matmul_ceiling(device, 8192 if device == "cuda" else 512)
    with torch.device(device):  # the weights are drawn where they live
        base = WeatherMixer(config)
    inputs = Inputs(config, args.steps, device, dtype)
    chunks = [list(range(first, min(first + args.member_batch, members)))
              for first in range(0, members, args.member_batch)]
    print(f"{args.preset}: {args.steps}-step autoregressive rollout, bf16 weights, inference_mode; {flops / 1e12:.3g} "
          f"TFLOP per member; bf16 matmul ceiling {ceiling:.0f} TFLOP/s; {members} member(s), "
          f"{args.member_batch} at a time", flush=True)
    results = []
    for compiled in [c == "on" for c in args.compile]:
        model = base.to(device, dtype).eval()
        if compiled:
            compile_step(model)
        roll_out = MemberRollout(model, 0, InputNoise(model, 0, args.input_noise, config.model_lat))
        single, single_peak = time_rollouts(roll_out, inputs, [[0]], args.steps, args.repeats, device)
        batched, batched_peak = (single, single_peak) if members == 1 else \
            time_rollouts(roll_out, inputs, chunks, args.steps, args.repeats, device)
        results.append((compiled, single, single_peak, batched, batched_peak))
        print(f"compile={'on' if compiled else 'off'}: one member {single:.3f} s ({single / args.steps * 1e3:.1f} "
              f"ms/step, {flops / single / 1e12:.3g} TFLOP/s, {flops / single / 1e12 / ceiling:.1%} of the matmul "
              f"ceiling, peak {single_peak:.1f} GiB); {members} members batched {batched:.3f} s against "
              f"{members} x {single:.3f} = {members * single:.3f} s, peak {batched_peak:.1f} GiB", flush=True)
        if compiled:
            del model.forward  # back to the class's eager forward
            torch._dynamo.reset()
    _print_table(results, args, flops)


def _print_table(results, args, flops: float) -> None:
    members = args.members
    print(f"\n{'compile':>7} {'s/member':>8} {'ms/step':>8} {'TFLOP/s':>8} {'peak GiB':>8} | {'members':>7} "
          f"{'at once':>7} {'M x s/member':>12} {'s batched':>9} {'speed-up':>8} {'TFLOP/s':>8} {'peak GiB':>8}")
    for compiled, single, single_peak, batched, batched_peak in results:
        print(f"{('on' if compiled else 'off'):>7} {single:>8.3f} {single / args.steps * 1e3:>8.1f} "
              f"{flops / single / 1e12:>8.3g} {single_peak:>8.1f} | {members:>7} {args.member_batch:>7} "
              f"{members * single:>12.3f} {batched:>9.3f} {members * single / batched:>7.2f}x "
              f"{members * flops / batched / 1e12:>8.3g} {batched_peak:>8.1f}")


if __name__ == "__main__":
    main()
