"""What a Bayesian layer's weight draw costs with each way of making its standard normals.

    python -m benchmarks.weight_draw

Each case is the compiled draw of one weight block, ``mu + softplus(rho) * eps`` over bf16
``mu`` and ``rho`` (``parallel.variational``: ``eps`` at each element's global position), with
``eps`` made as it is now (:func:`parallel.rng.normal_from_key`) or as it was or could be. The
"memory" case draws nothing and shows the floor: reading ``mu`` and ``rho`` and writing the
weight. Then the draw with the block's KL divergence, as two compiled passes (what the training
step runs) and, on CUDA, as one Triton kernel (:mod:`parallel.weight_draw_triton`), with the
largest difference between the two. The last column scales a call to the 1.06 B weights of
``jigsaw-1b``.
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
import torch.nn.functional as F

from benchmarks.timing import median_ms
from parallel.weight_draw import gaussian_kl_divergence
from parallel.rng import (_MASK32, _shift_right, _uniform, flat_index, hash64, mix_keys, normal_from_key,
                          unit_interval)

MODEL_WEIGHTS = 1.06e9  # jigsaw-1b


def box_muller(radius: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(-2 * torch.log(radius)) * torch.cos(2 * math.pi * angle)


NORMALS = {
    "erfinv of one 64-bit hash (now)": normal_from_key,
    "Box-Muller, one 64-bit hash": lambda key, flat: box_muller(
        unit_interval(_shift_right(hash64(key, flat), 32), torch.float32),
        unit_interval(hash64(key, flat) & _MASK32, torch.float32)),
    "Box-Muller, four 32-bit hashes a uniform": lambda key, flat: box_muller(
        _uniform(mix_keys(key, 1), flat, torch.float32), _uniform(mix_keys(key, 2), flat, torch.float32)),
    "a uniform of one 64-bit hash (no normal)": lambda key, flat: unit_interval(hash64(key, flat) & _MASK32,
                                                                                 torch.float32),
    "memory (no draw)": lambda key, flat: torch.full_like(flat, 1, dtype=torch.float32),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[4320, 17280], help="the weight block (rows, columns)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    rows, columns = args.shape
    generator = torch.Generator(device=args.device).manual_seed(0)
    mu = torch.randn(rows, columns, device=args.device, generator=generator).bfloat16()
    rho = torch.full((rows, columns), -4.6, device=args.device, dtype=torch.bfloat16)
    index = (torch.arange(rows, device=args.device), torch.arange(columns, device=args.device))
    key = torch.tensor(1234567, device=args.device)

    print(f"weight draw of a {rows} x {columns} block, {args.device} "
          f"({torch.cuda.get_device_name() if args.device == 'cuda' else 'host'}), compiled, median of {args.repeats}")
    print(f"{'eps':<44} {'ms':>8} {'G weights/s':>12} {'ms per 1.06 B':>14}")

    def row(name, function):
        ms = median_ms(args.device, function, args.repeats)
        print(f"{name:<44} {ms:>8.3f} {rows * columns / ms / 1e6:>12.1f} {ms * MODEL_WEIGHTS / (rows * columns):>14.2f}")

    def drawn(normal=normal_from_key):
        eps = normal(mix_keys(key, 99), flat_index(index, (rows, columns), args.device))
        return mu + F.softplus(rho) * eps.reshape(rows, columns).to(mu.dtype)

    for name, normal in NORMALS.items():
        row(name, torch.compile(functools.partial(drawn, normal)))
    row("the KL alone (compiled)", torch.compile(lambda: gaussian_kl_divergence(mu, rho, 1.0)))
    compiled_pair = torch.compile(lambda: (drawn(), gaussian_kl_divergence(mu, rho, 1.0)))
    row("draw and KL, one compiled graph", compiled_pair)
    if args.device == "cuda":
        from parallel.weight_draw_triton import draw_with_kl_cuda

        draw_key = mix_keys(key, 99)

        def fused():
            return draw_with_kl_cuda(mu, rho, draw_key, index[0] * columns, index[1], 1.0)
        row("draw and KL, one Triton kernel", fused)
        (weight, kl), (reference, reference_kl) = fused(), compiled_pair()
        print(f"Triton against compiled: weights differ by at most {(weight - reference).abs().max().item():.3g} "
              f"(largest {reference.abs().max().item():.3g}), KL relative {(kl / reference_kl - 1).abs().item():.2e}")


if __name__ == "__main__":
    main()
