"""The CUDA kernel of :func:`parallel.fp8_cast.cast_transpose` (Triton).

Each program casts one tile: it loads the tile once (rows contiguous), stores the FP8 values in
the same layout and, transposed, into the tile's place in ``x.t()`` (Triton moves the tile
through shared memory so both stores are contiguous), and folds the tile's amax into the
result with one atomic maximum. Tile sizes: ``benchmarks/fp8_cast.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS, BLOCK_COLUMNS, WARPS = 64, 64, 4


@triton.jit
def _cast_transpose_kernel(x_ptr, out_ptr, out_t_ptr, amax_ptr, scale_ptr, rows, columns, finite,
                           BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    c = (tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)).to(tl.int64)
    inside = (r[:, None] < rows) & (c[None, :] < columns)
    x = tl.load(x_ptr + r[:, None] * columns + c[None, :], mask=inside, other=0.0).to(tl.float32)
    y = tl.clamp(x * tl.load(scale_ptr), -finite, finite).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r[:, None] * columns + c[None, :], y, mask=inside)
    tl.store(out_t_ptr + c[:, None] * rows + r[None, :], tl.trans(y), mask=tl.trans(inside))
    tl.atomic_max(amax_ptr, tl.max(tl.max(tl.abs(x), axis=1), axis=0))


def cast_transpose_cuda(x: Tensor, scale: Tensor, dtype: torch.dtype, block_rows: int = BLOCK_ROWS,
                        block_columns: int = BLOCK_COLUMNS, warps: int = WARPS) -> tuple[Tensor, Tensor, Tensor]:
    x = x.contiguous()
    rows, columns = x.shape
    values = torch.empty((rows, columns), dtype=dtype, device=x.device)
    transposed = torch.empty((columns, rows), dtype=dtype, device=x.device)
    amax = torch.zeros((), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(columns, block_columns))
    _cast_transpose_kernel[grid](x, values, transposed, amax, scale.float(), rows, columns, torch.finfo(dtype).max,
                                 BLOCK_ROWS=block_rows, BLOCK_COLUMNS=block_columns, num_warps=warps)
    return values, transposed, amax
