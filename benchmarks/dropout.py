"""Dropout's cost in the mixer blocks: a mask (``nn.Dropout``) against drawn positions
(``parallel.dropout.PositionDropout``) and no dropout, forward and backward, compiled, at each
of a block's four dropout sites.

    python -m benchmarks.dropout [--preset jigsaw-1b] [--p 0.001] [--repeats 30]

The sites as the model has them: after the GELU (``dropout(gelu(x + bias))``, whose gradient
arrives fresh from a matrix product) and after the second linear (``residual + dropout(x +
bias)``, whose gradient is the residual stream's, also used by the skip). ``step ms`` adds the
four sites over the blocks for one sample (at micro-batch B, about B times that).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.timing import median_ms
from launch.runtime.compile import compiled
from parallel.dropout import PositionDropout
from weathermixer.config import preset


def hidden_site(dropout: nn.Module):
    return lambda x, bias, residual: dropout(F.gelu(x + bias))


def output_site(dropout: nn.Module):
    return lambda x, bias, residual: residual + dropout(x + bias)


def site_ms(site, rows: int, columns: int, device: str, repeats: int) -> float:
    """Median ms of the site's forward and backward (bf16), compiled."""
    generator = torch.Generator(device=device).manual_seed(0)
    x, residual = (torch.randn(rows, columns, device=device, dtype=torch.bfloat16, generator=generator)
                   .requires_grad_() for _ in range(2))
    bias = torch.randn(columns, device=device, dtype=torch.bfloat16, generator=generator)
    grad = torch.randn(rows, columns, device=device, dtype=torch.bfloat16, generator=generator)
    step = compiled(site)

    def forward_backward():
        torch.autograd.backward(step(x, bias, residual), grad)

    return median_ms(device, forward_backward, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="jigsaw-1b")
    parser.add_argument("--p", type=float, default=None, help="dropout probability (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    config = preset(args.preset)
    p = config.dropout if args.p is None else args.p
    tokens, channels = config.n_tokens, config.hidden
    sites = [("token MLP, after GELU", hidden_site, config.token_hidden, channels),
             ("token MLP, after fc2", output_site, tokens, channels),
             ("channel MLP, after GELU", hidden_site, tokens, config.channel_hidden),
             ("channel MLP, after fc2", output_site, tokens, channels)]
    variants = [("none", nn.Identity()), ("mask", nn.Dropout(p)), ("positions", PositionDropout(p))]
    print(f"{args.preset}, p = {p}, on {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}: "
          f"ms forward + backward, compiled, bf16, one sample")
    print(f"{'site':<26} {'shape':>13} " + " ".join(f"{name:>10}" for name, _ in variants))
    totals = [0.0] * len(variants)
    for name, site, rows, columns in sites:
        times = [site_ms(site(dropout), rows, columns, args.device, args.repeats) for _, dropout in variants]
        totals = [t + ms * config.depth for t, ms in zip(totals, times)]
        print(f"{name:<26} {f'{rows}x{columns}':>13} " + " ".join(f"{ms:>10.3f}" for ms in times))
    print(f"{f'step ms ({config.depth} blocks)':<40} " + " ".join(f"{ms:>10.3f}" for ms in totals))


if __name__ == "__main__":
    main()
