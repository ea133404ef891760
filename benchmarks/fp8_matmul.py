"""FP8 against bf16 matrix-product rates: at n^3 and at every product of a model's training step.

    python -m benchmarks.fp8_matmul --preset jigsaw-1b --batch 1 --step-ms 79.5

Every linear ``Y = X Wᵀ`` of the model costs three products per training step: the forward
``(M, K) x (K, N)``, the input gradient ``dY W`` ``(M, N) x (N, K)`` and the weight gradient
``dYᵀ X`` ``(N, M) x (M, K)``. Each is timed in bf16 (``torch.matmul``) and in FP8 e4m3
(``torch._scaled_mm``, bf16 output) with tensorwise and rowwise scales, operands already
in the layout ``_scaled_mm`` needs; the cast column is what making those operands costs
(absolute maximum, scale, cast and transpose of both, memory-bound). With ``--step-ms`` (a
measured bf16 step) the last line predicts the FP8 step: the step less the bf16 products
plus the FP8 products and casts. Products whose sizes are not multiples of 16 stay bf16.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from benchmarks.timing import median_ms
from weathermixer.config import PRESETS, ModelConfig, preset

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


@dataclass(frozen=True)
class Product:
    """``(m, k) x (k, n)``, ``count`` times per training step."""

    name: str
    m: int
    k: int
    n: int
    count: int

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n

    @property
    def fp8_ready(self) -> bool:
        return self.m % 16 == 0 and self.k % 16 == 0 and self.n % 16 == 0


def linear_products(name: str, rows: int, inputs: int, outputs: int, count: int,
                    input_gradient: bool = True) -> list[Product]:
    """The forward and backward products of ``count`` linears ``(rows, inputs) -> (rows, outputs)``."""
    products = [Product(f"{name} fwd", rows, inputs, outputs, count)]
    if input_gradient:
        products.append(Product(f"{name} dgrad", rows, outputs, inputs, count))
    products.append(Product(f"{name} wgrad", outputs, rows, inputs, count))
    return products


def step_products(config: ModelConfig, batch: int) -> list[Product]:
    """Every matrix product of one training step of ``config`` at micro-batch ``batch``.

    The token linears contract over tokens: their rows are ``batch x hidden`` channel columns.
    The embedding's input gradient is never computed (its input is data)."""
    c, tokens = config, config.n_tokens * batch
    decoder_inputs = 2 * c.hidden if c.decoder_skip and c.decoder_merge == "concat" else c.hidden
    products = linear_products("embedding", tokens, c.patch_size * c.input_channels, c.hidden, 1,
                               input_gradient=False)
    products += linear_products("token fc1", batch * c.hidden, c.n_tokens, c.token_hidden, c.depth)
    products += linear_products("token fc2", batch * c.hidden, c.token_hidden, c.n_tokens, c.depth)
    products += linear_products("channel fc1", tokens, c.hidden, c.channel_hidden, c.depth)
    products += linear_products("channel fc2", tokens, c.channel_hidden, c.hidden, c.depth)
    products += linear_products("decoder", tokens, decoder_inputs, c.patch_size * c.out_channels, 1)
    if c.residual == "linear":
        points = c.model_lat * c.model_lon * batch
        products += linear_products("residual", points, c.in_channels + c.out_channels, c.out_channels, 1)
    return products


def to_fp8(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` scaled into e4m3's range (one scale, or one per row) and cast; returns (values, 1/scale)."""
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    scale = FP8_MAX / amax.float().clamp(min=1e-12)
    return (x.float() * scale).to(FP8), scale.reciprocal()


def time_product(p: Product, device: str, repeats: int) -> dict[str, float]:
    """ms of the product in bf16, in FP8 tensorwise and rowwise, and of the FP8 operand casts."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(p.m, p.k, device=device, dtype=torch.bfloat16, generator=generator)
    b_t = torch.randn(p.n, p.k, device=device, dtype=torch.bfloat16, generator=generator)  # b = b_tᵀ, column-major
    times = {"bf16": median_ms(device, lambda: a @ b_t.t(), repeats)}
    if not p.fp8_ready:
        return times | {"tensorwise": times["bf16"], "rowwise": times["bf16"], "cast": 0.0}
    for recipe, rowwise in (("tensorwise", False), ("rowwise", True)):
        a8, a_scale = to_fp8(a, rowwise)
        b8, b_scale = to_fp8(b_t, rowwise)
        b_scale = b_scale.t() if rowwise else b_scale
        times[recipe] = median_ms(device, lambda: torch._scaled_mm(
            a8, b8.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=torch.bfloat16), repeats)
    # one operand arrives in the other layout in each product: cast one as is, one transposed
    times["cast"] = median_ms(device, lambda: (to_fp8(a, False), to_fp8(b_t.t().contiguous(), False)), repeats)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="jigsaw-1b", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--square", type=int, default=8192, help="n of the n^3 reference product")
    parser.add_argument("--step-ms", type=float, default=None, help="a measured bf16 step to predict from")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    square = Product(f"square {args.square}^3", args.square, args.square, args.square, 0)
    products = [square] + step_products(preset(args.preset), args.batch)
    header = f"{'product':<18} {'m':>7} {'k':>7} {'n':>7} {'x':>2} {'bf16 ms':>8} {'TF/s':>6} " \
             f"{'fp8 tw':>7} {'TF/s':>6} {'x bf16':>6} {'fp8 rw':>7} {'x bf16':>6} {'cast':>6}"
    print(f"{args.preset}, micro-batch {args.batch}, {args.device}"
          f" ({torch.cuda.get_device_name() if args.device == 'cuda' else 'host'})")
    print(header)
    totals = {"bf16": 0.0, "tensorwise": 0.0, "rowwise": 0.0, "cast": 0.0}
    for p in products:
        t = time_product(p, args.device, args.repeats)
        for key in totals:
            totals[key] += p.count * t[key]
        print(f"{p.name:<18} {p.m:>7} {p.k:>7} {p.n:>7} {p.count:>2} {t['bf16']:>8.3f} "
              f"{p.flops / t['bf16'] / 1e9:>6.0f} {t['tensorwise']:>7.3f} {p.flops / t['tensorwise'] / 1e9:>6.0f} "
              f"{t['bf16'] / t['tensorwise']:>6.2f} {t['rowwise']:>7.3f} {t['bf16'] / t['rowwise']:>6.2f} "
              f"{t['cast']:>6.3f}")
    print(f"step products: bf16 {totals['bf16']:.1f} ms, fp8 tensorwise {totals['tensorwise']:.1f} ms, "
          f"rowwise {totals['rowwise']:.1f} ms, operand casts {totals['cast']:.1f} ms")
    if args.step_ms is not None:
        for recipe in ("tensorwise", "rowwise"):
            predicted = args.step_ms - totals["bf16"] + totals[recipe] + totals["cast"]
            print(f"predicted fp8 {recipe} step: {predicted:.1f} ms (bf16 step {args.step_ms:.1f} ms, "
                  f"{args.step_ms / predicted:.2f}x)")


if __name__ == "__main__":
    main()
