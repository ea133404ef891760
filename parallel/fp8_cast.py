"""An operand's FP8 cast in both layouts the tensor cores take, reading the operand once.

On Hopper, ``torch._scaled_mm`` multiplies a row-major by a column-major FP8 matrix (both
contiguous along the contraction). A linear's forward and its two backward products contract
each operand along both of its dimensions, so every operand is needed in both layouts.
:func:`cast_transpose` writes the FP8 values row-major and transposed in one pass over the
operand and returns the operand's amax, as Transformer Engine's cast-transpose does: on CUDA one
Triton kernel (:mod:`parallel.fp8_cast_triton`); elsewhere the same numbers from torch operations.
Compiled, the cast and the transposing copy would otherwise be separate passes, the transposed
one at about half the memory rate (``benchmarks/FP8.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cast_transpose_reference(x: Tensor, scale: Tensor, dtype: torch.dtype, rows: int,
                             columns: int) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` (2-D, row-major) times ``scale`` (a float32 scalar), clamped to ``dtype``'s finite
    range and cast, padded with zeros to ``rows`` x ``columns``: the values row-major, the values
    of ``x.t()`` row-major, and ``x``'s amax."""
    finite = torch.finfo(dtype).max
    scaled = F.pad(x.float() * scale, (0, columns - x.shape[1], 0, rows - x.shape[0]))
    values = scaled.clamp(-finite, finite).to(dtype)
    return values, values.t().clone(memory_format=torch.contiguous_format), x.abs().amax().float()


@torch.library.custom_op("weathermixer::fp8_cast_transpose", mutates_args=())
def cast_transpose(x: Tensor, scale: Tensor, dtype: torch.dtype, rows: int,
                   columns: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`cast_transpose_reference`, on CUDA in one pass (one kernel)."""
    return cast_transpose_reference(x, scale, dtype, rows, columns)


@cast_transpose.register_fake
def _(x: Tensor, scale: Tensor, dtype: torch.dtype, rows: int, columns: int) -> tuple[Tensor, Tensor, Tensor]:
    return (x.new_empty((rows, columns), dtype=dtype), x.new_empty((columns, rows), dtype=dtype),
            x.new_empty((), dtype=torch.float32))


@cast_transpose.register_kernel("cuda")
def _(x: Tensor, scale: Tensor, dtype: torch.dtype, rows: int, columns: int) -> tuple[Tensor, Tensor, Tensor]:
    from parallel.fp8_cast_triton import cast_transpose_cuda  # Triton: CUDA machines only

    return cast_transpose_cuda(x, scale, dtype, rows, columns)
