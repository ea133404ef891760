"""FP8 matrix products for the Jigsaw linears, with the serial model's scales on every mesh.

Recipe ``tensorwise`` (torchao's default recipe, done here inside our own sharded layers):
each operand is scaled by one number, ``max(e4m3) / amax(operand)``, and cast to FP8 e4m3
(the inputs and weights of the forward) or e5m2 (the output gradient of backward, whose
range matters more than its precision); ``torch._scaled_mm`` multiplies in FP8 and
accumulates in float32. Backward reuses the FP8 copies saved by forward, so the input
gradient ``dY Wᵀ`` and the weight gradient ``Xᵀ dY`` run in FP8 too.

On a mesh a rank holds one block of each operand, and the blocks of all ranks of the model
group cover the serial operand (some blocks twice, which a maximum does not notice): the
scale is the all-reduced maximum of the blocks' amax over the model group, so every element
is cast exactly as the serial model casts it and parallel equals serial up to the float32
summation order. CPUs run ``torch._scaled_mm`` too (emulated), so tests check real FP8
numbers; a CUDA device must be Hopper or newer (compute capability 8.9+), and its products
need every size a multiple of 16.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.comm import group_size

RECIPES = ("none", "tensorwise")
FORWARD, BACKWARD = torch.float8_e4m3fn, torch.float8_e5m2
AMAX_FLOOR = 1e-12  # as torchao: a finite scale for an operand of zeros


class FP8Error(ValueError):
    """FP8 asked for where it cannot run; the message says what was expected."""


def check_fp8_device(device: torch.device | str) -> None:
    """Refuse a CUDA device without FP8 tensor cores (no silent fallback to bf16)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise FP8Error(f"model.fp8 on {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}): "
                           f"FP8 matrix products need compute capability 8.9 or newer (Ada, Hopper); expected "
                           f"model.fp8 = none on this GPU")


def _to_fp8(x: torch.Tensor, dtype: torch.dtype, group) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` scaled by the group's common tensorwise scale and cast (saturating); returns the
    FP8 tensor and the inverse scale ``_scaled_mm`` multiplies the product with."""
    amax = x.detach().abs().amax().float()
    if group_size(group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    finite = torch.finfo(dtype).max
    scale = finite / amax.clamp(min=AMAX_FLOOR)  # an all-zero operand stays zero
    return (x.float() * scale).clamp(-finite, finite).to(dtype), scale.reciprocal()


def _scaled(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
            out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` in FP8: ``a`` row-major, ``b`` column-major, as the tensor cores take them."""
    if a.is_cuda and any(size % 16 for size in (*a.shape, b.shape[1])):
        raise FP8Error(f"FP8 product {tuple(a.shape)} x {tuple(b.shape)}: CUDA needs every size a multiple of 16; "
                       f"expected layer sizes that are (or model.fp8_groups without this layer)")
    return torch._scaled_mm(a.contiguous(), b.t().contiguous().t(), scale_a=a_inv, scale_b=b_inv,
                            out_dtype=out_dtype)


class _FP8MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, group):
        a8, a_inv = _to_fp8(a, FORWARD, group)
        b8, b_inv = _to_fp8(b, FORWARD, group)
        ctx.save_for_backward(a8, a_inv, b8, b_inv)
        ctx.group, ctx.dtypes = group, (a.dtype, b.dtype)
        return _scaled(a8, a_inv, b8, b_inv, a.dtype)

    @staticmethod
    def backward(ctx, grad):
        a8, a_inv, b8, b_inv = ctx.saved_tensors
        g8, g_inv = _to_fp8(grad, BACKWARD, ctx.group)
        grad_a = _scaled(g8, g_inv, b8.t(), b_inv, ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_b = _scaled(a8.t(), a_inv, g8, g_inv, ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


class FP8MatMul:
    """``a @ b`` of 2-D operands in FP8 with tensorwise scales common to ``group`` (None: one rank)."""

    def __init__(self, group=None):
        self.group = group

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _FP8MatMul.apply(a, b, self.group)
