"""The CUDA kernel of :func:`parallel.weight_draw.draw_weight` (Triton).

One pass over a block's ``mu`` and ``rho``: each program draws a tile of the weight,
``mu + softplus(rho) * eps`` with ``eps`` of :func:`parallel.rng.normal_from_key` at each
element's global position, and writes the tile's sum of the KL terms to its own slot of
``partials`` (summed afterwards in a fixed order, so the KL does not depend on the order the
programs finish in). Compiled torch code takes two passes for these, and both are bound by
arithmetic (a 64-bit hash, ``erfinv``, ``softplus`` and a logarithm per weight), not memory:
here the exponential in ``softplus`` and the KL's logarithm are the GPU's fast approximations
(relative errors near 1e-7 in float32, far below the bf16 weights' resolution and the float32
sum's). Tile sizes and the cost of each choice: ``benchmarks/weight_draw.py``, ``SAMPLING.md``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from torch import Tensor

BLOCK_ROWS, BLOCK_COLUMNS, WARPS = 1, 1024, 4

# SplitMix64's constants, as in parallel.rng
_GOLDEN = tl.constexpr(0x9E3779B97F4A7C15)
_MIX1 = tl.constexpr(0xBF58476D1CE4E5B9)
_MIX2 = tl.constexpr(0x94D049BB133111EB)


@triton.jit
def _draw_kernel(mu_ptr, rho_ptr, weight_ptr, partials_ptr, key_ptr, row_offsets_ptr, columns_ptr, rows, columns,
                 inverse_variance, log_prior_std, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    inside = (r[:, None] < rows) & (c[None, :] < columns)
    row_offset = tl.load(row_offsets_ptr + r, mask=r < rows, other=0).to(tl.int64)
    column = tl.load(columns_ptr + c, mask=c < columns, other=0).to(tl.int64)
    x = ((row_offset[:, None] + column[None, :]) ^ tl.load(key_ptr)).to(tl.uint64, bitcast=True) * _GOLDEN
    x = (x ^ (x >> 30)) * _MIX1
    x = (x ^ (x >> 27)) * _MIX2
    x = x ^ (x >> 31)
    u = (((x >> 41).to(tl.int32) * 2 + 1) - 8388608).to(tl.float32) * (1.0 / 8388608)
    eps = 1.4142135623730951 * libdevice.erfinv(u)  # sqrt(2) erfinv(u)
    offset = r[:, None].to(tl.int64) * columns + c[None, :]
    mu = tl.load(mu_ptr + offset, mask=inside, other=0.0).to(tl.float32)
    rho = tl.load(rho_ptr + offset, mask=inside, other=0.0).to(tl.float32)
    sigma = tl.where(rho > 20.0, rho, libdevice.log1p(libdevice.fast_expf(rho)))  # torch's softplus
    tl.store(weight_ptr + offset, (mu + sigma * eps).to(weight_ptr.dtype.element_ty), mask=inside)
    log_ratio = libdevice.fast_logf(sigma) - log_prior_std
    terms = tl.where(inside, 0.5 * ((sigma * sigma + mu * mu) * inverse_variance - 1.0) - log_ratio, 0.0)
    tl.store(partials_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(terms, 1), 0))


def draw_with_kl_cuda(mu: Tensor, rho: Tensor, key: Tensor, row_offsets: Tensor, columns: Tensor, prior_std: float,
                      block_rows: int = BLOCK_ROWS, block_columns: int = BLOCK_COLUMNS,
                      warps: int = WARPS) -> tuple[Tensor, Tensor]:
    """The drawn block (``mu``'s dtype) and its KL (a float32 scalar) of 2-D contiguous ``mu`` and ``rho``."""
    weight = torch.empty_like(mu)
    grid = (triton.cdiv(mu.shape[0], block_rows), triton.cdiv(mu.shape[1], block_columns))
    partials = torch.empty(grid, dtype=torch.float32, device=mu.device)
    _draw_kernel[grid](mu, rho, weight, partials, key, row_offsets, columns, mu.shape[0], mu.shape[1],
                       1.0 / prior_std**2, math.log(prior_std), BLOCK_ROWS=block_rows, BLOCK_COLUMNS=block_columns,
                       num_warps=warps)
    return weight, partials.sum()
