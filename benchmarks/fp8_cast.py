"""The FP8 cast of an operand into both layouts (``parallel.fp8_cast.cast_transpose``), per tile
shape of its Triton kernel, against the compiled torch cast (a cast pass, then a transposing
copy) and against a bf16 copy, which moves the same bytes (read 2, write 1 + 1 per element).

    python -m benchmarks.fp8_cast

Each case is first checked bitwise against the eager torch cast (both layouts and the amax), on
operands whose scale saturates some values. Shapes: the operands of ``jigsaw-1b`` at micro-batch 1.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.timing import median_ms
from parallel.fp8_cast import cast_transpose_reference

SHAPES = {"activations 17280 x 4320": (17280, 4320), "token mixing input 4320 x 17280": (4320, 17280),
          "token hidden 8640 x 4320": (8640, 4320), "token weight 8640 x 17280": (8640, 17280),
          "channel weight 4320 x 4320": (4320, 4320), "recovery weight 4140 x 8640 (padded)": (4140, 8640)}
FORMATS = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
TILES = [(64, 64, 1, 4), (64, 64, 4, 4), (64, 128, 1, 4), (128, 64, 1, 4), (128, 128, 1, 8), (32, 128, 4, 4)]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def main(argv=None) -> None:
    from parallel.fp8_cast_triton import cast_transpose_cuda

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    generator = torch.Generator(device="cuda").manual_seed(0)
    torch._dynamo.config.recompile_limit = 64  # the compiled reference: one graph per shape and format
    compiled = torch.compile(cast_transpose_reference, dynamic=False)
    print(f"FP8 cast into both layouts, {torch.cuda.get_device_name()}, median of {args.repeats}; GB/s counts "
          f"2 bytes read and 2 written per element")
    print(f"{'operand':<36} {'format':<7} {'case':<28} {'ms':>7} {'GB/s':>7}  bitwise")
    for name, (rows, columns) in SHAPES.items():
        x = (3 * torch.randn(rows, columns, device="cuda", generator=generator)).bfloat16()
        gigabytes = 4 * rows * columns / 1e9
        for dtype, format_name in FORMATS.items():
            scale = torch.finfo(dtype).max / (0.5 * x.abs().amax().float())  # saturates the largest values
            padded = [-(-size // 16) * 16 for size in (rows, columns)]
            expected = cast_transpose_reference(x, scale, dtype, *padded)
            cases = {f"triton {r}x{c} x{t}, {w} warps":
                     (lambda r=r, c=c, t=t, w=w: cast_transpose_cuda(x, scale, dtype, *padded, r, c, t, w))
                     for r, c, t, w in TILES}
            cases["compiled torch"] = lambda: compiled(x, scale, dtype, *padded)
            cases["bf16 copy (same bytes)"] = lambda: (x.clone(),)
            for case, run in cases.items():
                got = run()
                check = ("yes" if all(same(g, e) for g, e in zip(got, expected)) else "NO") if len(got) == 3 else "-"
                ms = median_ms("cuda", run, args.repeats)
                print(f"{name:<36} {format_name:<7} {case:<28} {ms:>7.3f} {gigabytes / ms * 1e3:>7.0f}  {check}")


if __name__ == "__main__":
    main()
