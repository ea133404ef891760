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
summation order.

Recipe ``delayed`` (Transformer Engine's delayed scaling): the scale of each operand comes from
the largest amax its role (forward input, forward weight, output gradient) had over the last
steps, kept in a buffer of the layer's product (:class:`FP8MatMul`). The scale is known before
the operand exists, so a compiler can fuse the cast into the kernel that produces the operand,
and the amax of the operand, recorded for the next steps, can fuse there too. The recorded amaxes
are reduced (maximum) over all ranks once a step, so every rank's history is the serial model's
and the same on every data and sample replica. An operand that outgrows its history saturates
(clamped to the finite range) until the next steps' scales catch up.

Each operand is cast once into both layouts the products take, padded with zeros to sizes that
are multiples of 16 as CUDA's FP8 products need (:mod:`parallel.fp8_cast`): a layer of any size
runs in FP8. CPUs run ``torch._scaled_mm`` too (emulated), so tests check real FP8 numbers; a
CUDA device must be Hopper or newer (compute capability 8.9+).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from parallel.comm import group_size
from parallel.fp8_cast import cast_transpose

RECIPES = ("none", "tensorwise", "delayed")
ROLES = ("input", "weight", "gradient")  # the rows of a delayed product's amax history
INPUT, WEIGHT, GRADIENT = range(len(ROLES))
DEFAULT_HISTORY = 16  # steps of amax a delayed scale looks back over
FORWARD, BACKWARD = torch.float8_e4m3fn, torch.float8_e5m2
AMAX_FLOOR = 1e-12  # as torchao: a finite scale for an operand of zeros
ALIGN = 16  # CUDA's FP8 products take sizes that are multiples of 16: operands are padded to them


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


def _amax(x: torch.Tensor, group) -> torch.Tensor:
    """The largest magnitude of the serial operand: this rank's block's, all-reduced (MAX) over ``group``."""
    amax = x.detach().abs().amax().float()
    if group_size(group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def _world():
    """All ranks as a group (None, one rank, when not distributed)."""
    return dist.group.WORLD if dist.is_initialized() else None


class FP8Operand(NamedTuple):
    """An operand of true size ``shape`` in FP8 in both layouts, each padded with zeros to
    multiples of :data:`ALIGN`: ``rows`` row-major, ``columns`` column-major (the transposed
    view of a row-major copy); and the inverse scale ``_scaled_mm`` takes."""

    rows: torch.Tensor | None  # None: a layout not kept (for backward, only the one it takes)
    columns: torch.Tensor | None
    inverse_scale: torch.Tensor
    shape: tuple[int, int]

    def t(self) -> FP8Operand:
        def transposed(x):
            return None if x is None else x.t()
        return FP8Operand(transposed(self.columns), transposed(self.rows), self.inverse_scale, self.shape[::-1])


def _cast(x: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype) -> tuple[FP8Operand, torch.Tensor]:
    """``x`` scaled so that ``amax`` maps to the format's largest finite value and cast into
    both layouts in one pass; values beyond ``amax`` saturate. Returns the operand and ``x``'s
    own amax (this rank's block's)."""
    scale = torch.finfo(dtype).max / amax.clamp(min=AMAX_FLOOR)  # an all-zero operand stays zero
    transposed = _column_major(x)  # a weight passed as w.t(): cast w, the row-major matrix
    x = x.t() if transposed else x.contiguous()
    values, values_t, own_amax = cast_transpose(x, scale, dtype, *(_aligned(size) for size in x.shape))
    operand = FP8Operand(values, values_t.t(), scale.reciprocal(), tuple(x.shape))
    return operand.t() if transposed else operand, own_amax


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN


def _to_fp8(x: torch.Tensor, dtype: torch.dtype, group) -> FP8Operand:
    """``x`` cast with the tensorwise scale of its own amax, common to ``group``."""
    return _cast(x, _amax(x, group), dtype)[0]


def _product(a: FP8Operand, b: FP8Operand, out_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` in FP8 from the layouts the tensor cores take (``a`` row-major, ``b``
    column-major; no copy), float32 accumulation; the padding's zeros add nothing and its rows
    and columns of the result are cut off."""
    out = torch._scaled_mm(a.rows, b.columns, scale_a=a.inverse_scale, scale_b=b.inverse_scale, out_dtype=out_dtype)
    return out[:a.shape[0], :b.shape[1]]


def _operand(x: torch.Tensor, dtype: torch.dtype, group, history: torch.Tensor | None, role: int,
             from_history: bool, record: bool) -> FP8Operand:
    """Operand ``role`` of a product in FP8: tensorwise (``history`` None) or delayed.

    Delayed: with ``from_history`` the scale is the largest amax of the previous steps (slots
    1..H of the role's row), known before ``x`` exists; else (the first step) the operand's own,
    common to ``group``. With ``record`` the operand's amax goes into slot 0 as a running maximum:
    a rollout calls a layer several times a step, and a checkpointed block's recomputation records
    the same value again, which a maximum does not notice. Recorded from the history, it is this
    rank's block's, which the cast returns: :func:`advance_histories` reduces slot 0 over all
    ranks once a step, not a collective per operand."""
    if history is not None and from_history:
        operand, amax = _cast(x, history[role, 1:].amax(), dtype)
    else:
        # the first training step's own amax is the largest over all ranks, as every later step's
        # history is: data and sample replicas cast alike, and k replicas equal one with k x the batch
        amax = _amax(x, _world() if history is not None and record else group)
        operand, _ = _cast(x, amax, dtype)
    if history is not None and record:
        history[role, 0] = torch.maximum(history[role, 0], amax)
    return operand


class _FP8MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, group, history, from_history, record, forward_in_fp8):
        a8 = _operand(a, FORWARD, group, history, INPUT, from_history, record)
        b8 = _operand(b, FORWARD, group, history, WEIGHT, from_history, record)
        # backward takes a's columns (A^T dY) and b's rows (dY B^T): one FP8 copy of each kept
        ctx.save_for_backward(a8.columns, a8.inverse_scale, b8.rows, b8.inverse_scale)
        ctx.shapes = (a8.shape, b8.shape)
        # the history as an attribute, not a saved tensor: it changes in place before backward
        ctx.group, ctx.dtypes, ctx.history, ctx.from_history = group, (a.dtype, b.dtype), history, from_history
        ctx.column_major = (_column_major(a), _column_major(b))
        return _product(a8, b8, a.dtype) if forward_in_fp8 else a @ b

    @staticmethod
    def backward(ctx, grad):
        a_columns, a_inv, b_rows, b_inv = ctx.saved_tensors
        a8, b8 = FP8Operand(None, a_columns, a_inv, ctx.shapes[0]), FP8Operand(b_rows, None, b_inv, ctx.shapes[1])
        g8 = _operand(grad, BACKWARD, ctx.group, ctx.history, GRADIENT, ctx.from_history, True)
        (a_dtype, b_dtype), (a_column_major, b_column_major) = ctx.dtypes, ctx.column_major
        grad_a = _product_as(g8, b8.t(), a_dtype, a_column_major) if ctx.needs_input_grad[0] else None
        grad_b = _product_as(a8.t(), g8, b_dtype, b_column_major) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None, None, None, None, None


def _column_major(x: torch.Tensor) -> bool:
    """Whether ``x`` is a transposed view of a row-major matrix (a weight passed as ``w.t()``)."""
    return not x.is_contiguous() and x.t().is_contiguous()


def _product_as(a: FP8Operand, b: FP8Operand, out_dtype: torch.dtype, column_major: bool) -> torch.Tensor:
    """``a @ b`` written in the layout of the operand it is the gradient of: a column-major
    operand's gradient computed as ``(bᵀ aᵀ)ᵀ``, from the same FP8 copies, so that the
    gradient of a weight passed as ``w.t()`` reaches ``w`` row-major (no strided copy into
    ``w.grad``)."""
    if column_major:
        return _product(b.t(), a.t(), out_dtype).t()
    return _product(a, b, out_dtype)


class FP8MatMul(nn.Module):
    """``a @ b`` of 2-D operands in FP8 with scales common to ``group`` (None: one rank).

    With ``forward_in_fp8`` off, the forward product runs in the operands' own dtype (bf16 under
    autocast) and only backward's two products, the input gradient and the weight gradient, run in
    FP8 from the FP8 copies forward saves: the layer's output, the model's prediction where it is
    the last layer, keeps the wider format's precision, and the gradients take FP8's rounding as
    the mixing layers' gradients do.

    ``recipe`` ``tensorwise``: each operand's scale from its own amax. ``delayed`` (Transformer
    Engine's delayed scaling): each operand role (forward input, forward weight, output gradient)
    keeps the amax of its last ``history`` steps in a row of the buffer ``amax_history`` (slot 0:
    the step under way, slots 1..H: the steps before, newest first) and is cast with the largest
    of them, so the cast does not wait for a reduction over the operand it casts. The first step
    (an empty history) scales each operand by its own amax, as tensorwise; after each training
    step :func:`advance_histories` moves slot 0 into the history. Operands are recorded in
    forwards that autograd records (training), and output gradients in every backward; a
    forward under ``no_grad`` (validation, forecasts) reads the history and leaves it as it is.
    The buffer is model state (in the state dict and the checkpoints), the same on every rank
    once :func:`advance_histories` has reduced the step's amaxes over all ranks."""

    def __init__(self, group=None, recipe: str = "tensorwise", history: int = DEFAULT_HISTORY,
                 forward_in_fp8: bool = True):
        super().__init__()
        self.forward_in_fp8 = forward_in_fp8
        if recipe not in RECIPES[1:]:
            raise FP8Error(f"FP8 recipe {recipe!r}: expected one of {list(RECIPES[1:])}")
        if recipe == "delayed" and (isinstance(history, bool) or not isinstance(history, int) or history < 1):
            raise FP8Error(f"FP8 recipe delayed with an amax history of {history!r} steps: expected an integer >= 1")
        self.group, self.recipe = group, recipe
        self.has_history = False  # whether slots 1..H hold a step yet (Python: the graph differs)
        self.register_buffer("amax_history", torch.zeros(len(ROLES), history + 1) if recipe == "delayed" else None)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not (self.forward_in_fp8 or torch.is_grad_enabled()):
            return a @ b  # validation, forecasts: no backward to cast for
        return _FP8MatMul.apply(a, b, self.group, self.amax_history, self.has_history, torch.is_grad_enabled(),
                                self.forward_in_fp8)

    def extra_repr(self) -> str:
        return f"recipe={self.recipe}, forward_in_fp8={self.forward_in_fp8}"

    def _apply(self, fn, recurse=True):
        # a model cast to bf16 (DeepSpeed's bf16) would round the amaxes and saturate the operands
        # just above them: the history stays float32
        super()._apply(fn, recurse)
        if self.amax_history is not None and self.amax_history.dtype != torch.float32:
            self.amax_history = self.amax_history.float()
        return self


def delayed_products(model: nn.Module) -> list[FP8MatMul]:
    """The FP8 products of ``model`` that keep an amax history (recipe ``delayed``)."""
    return [module for module in model.modules() if isinstance(module, FP8MatMul) and module.recipe == "delayed"]


@torch.no_grad()
def advance_histories(products: list[FP8MatMul]) -> None:
    """End of a training step (one micro-batch's forward and backward): each role's slot 0, the
    maximum over all ranks, becomes its newest history entry, the oldest drops out, slot 0 starts
    the next step at 0, and from now on every product casts from its history. The maximum spans
    the model group (whose blocks make the serial operand) and the data and sample replicas (whose
    operands differ), so every rank keeps one history, the one a checkpoint saves. One stacked
    reduction and roll for all products: a few kernels however many layers."""
    histories = [product.amax_history for product in products]
    if not histories:
        return
    rolled = torch.stack(histories)
    if group_size(_world()) > 1:
        step = rolled[..., 0].contiguous()  # collectives take contiguous tensors
        dist.all_reduce(step, op=dist.ReduceOp.MAX)
        rolled[..., 0] = step
    rolled = rolled.roll(1, dims=-1)
    rolled[..., 0] = 0
    torch._foreach_copy_(histories, list(rolled.unbind(0)))
    for product in products:
        product.has_history = True


def histories_loaded(model: nn.Module) -> None:
    """After histories were written into ``model``'s buffers (a checkpoint): each product casts
    from its history if it holds a step (one host read per product, at load time only)."""
    for product in delayed_products(model):
        product.has_history = bool(product.amax_history[:, 1:].any())
