"""The CUDA kernel of :func:`parallel.fp8_cast.cast_transpose` (Triton).

Each program casts a column of ``TILES`` tiles: it loads each tile once (rows contiguous),
stores the FP8 values in the same layout and, transposed, into the tile's place in ``x.t()``
(Triton moves the tile through shared memory so both stores are contiguous), writes zeros where
a tile covers only padding, and folds its tiles' amax into the result with one atomic maximum.
Tile sizes: ``benchmarks/fp8_cast.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS, BLOCK_COLUMNS, TILES, WARPS = 64, 64, 1, 4


@triton.jit
def _cast_transpose_kernel(x_ptr, out_ptr, out_t_ptr, amax_ptr, scale_ptr, rows, columns, padded_rows,
                           padded_columns, finite, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
                           TILES: tl.constexpr):
    scale = tl.load(scale_ptr)
    c = (tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)).to(tl.int64)
    amax = tl.zeros((BLOCK_ROWS, BLOCK_COLUMNS), dtype=tl.float32)
    for tile in tl.static_range(TILES):
        r = ((tl.program_id(0) * TILES + tile) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
        inside = (r[:, None] < rows) & (c[None, :] < columns)
        padded = (r[:, None] < padded_rows) & (c[None, :] < padded_columns)
        x = tl.load(x_ptr + r[:, None] * columns + c[None, :], mask=inside, other=0.0).to(tl.float32)
        y = tl.clamp(x * scale, -finite, finite).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r[:, None] * padded_columns + c[None, :], y, mask=padded)
        tl.store(out_t_ptr + c[:, None] * padded_rows + r[None, :], tl.trans(y), mask=tl.trans(padded))
        amax = tl.maximum(amax, tl.abs(x))
    tl.atomic_max(amax_ptr, tl.max(tl.max(amax, axis=1), axis=0))


def cast_transpose_cuda(x: Tensor, scale: Tensor, dtype: torch.dtype, padded_rows: int, padded_columns: int,
                        block_rows: int = BLOCK_ROWS, block_columns: int = BLOCK_COLUMNS, tiles: int = TILES,
                        warps: int = WARPS) -> tuple[Tensor, Tensor, Tensor]:
    x = x.contiguous()
    rows, columns = x.shape
    values = torch.empty((padded_rows, padded_columns), dtype=dtype, device=x.device)
    transposed = torch.empty((padded_columns, padded_rows), dtype=dtype, device=x.device)
    amax = torch.zeros((), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(padded_rows, block_rows * tiles), triton.cdiv(padded_columns, block_columns))
    _cast_transpose_kernel[grid](x, values, transposed, amax, scale.float(), rows, columns, padded_rows,
                                 padded_columns, torch.finfo(dtype).max, BLOCK_ROWS=block_rows,
                                 BLOCK_COLUMNS=block_columns, TILES=tiles, num_warps=warps)
    return values, transposed, amax
