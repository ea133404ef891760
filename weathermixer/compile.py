"""How the training step is compiled: ``torch.compile`` with the inductor settings it needs.

Both are measured on one H100 (``benchmarks/GPU.md``):

* ``triton.mix_order_reduction`` off: inductor fuses each LayerNorm backward (a reduction
  over channels per token) with its weight and bias gradients (reductions over tokens) and
  the dropout mask into one kernel whose default split runs ~30 ms per call at micro-batch
  4 (``jigsaw-1b``: 397 ms per step on, 351 ms off; micro-batch 1 unchanged).
* ``fallback_random`` on: random numbers (dropout masks) come from aten's kernels, the same
  numbers as eager mode, so a compiled run trains exactly the network an eager run does
  (inductor's own philox fused into the kernels was no faster within the noise).
* ``comprehensive_padding`` off: inductor pads the row stride of tensors whose rows are not a
  multiple of 128 bytes (4320 bf16 channels: 8640 -> 8704 bytes); aten's dropout kernel then sees a
  non-contiguous tensor and takes its slow element-by-element path (3.7 against 1.6 ms a step at
  micro-batch 1; the step 315.5 -> 308.0 ms at micro-batch 4, 90.5 -> 89.4 ms at micro-batch 1).

Measured and not set here: ``triton.multi_kernel = 1`` (each reduction compiled both persistent
and looped, the faster chosen on the GPU) gave 296.5 -> 291.7 ms at micro-batch 4 and 81.9 ->
80.9 ms at 1 when set by ``benchmarks/train_step.py --inductor triton.multi_kernel=1``, but set
here the first compiled step failed on the GPU inside inductor (``TypeError`` at its
``_hash_lock``); not analysed yet (``benchmarks/GPU.md``, fifth round).
"""

from __future__ import annotations

import torch


# persistent reductions (the row in registers, one pass) up to these many elements: a LayerNorm
# over jigsaw-1b's 4320 hidden channels (contiguous), the decoder's over 69-138 channels per point
PERSISTENT_INNER, PERSISTENT_OTHER = 8192, 256


def configure_inductor() -> None:
    """Set the inductor options above (process-wide; call before the first compiled call)."""
    import torch._inductor.config as inductor

    inductor.triton.mix_order_reduction = False
    inductor.fallback_random = True
    inductor.comprehensive_padding = False
    persistent_reductions_up_to(PERSISTENT_INNER, PERSISTENT_OTHER)


def compiled(function, **options):
    """``torch.compile(function)`` with :func:`configure_inductor` applied; static shapes."""
    configure_inductor()
    return torch.compile(function, dynamic=False, **options)


def persistent_reductions_up_to(inner: int, other: int) -> None:
    """Compile reductions of up to ``inner`` contiguous elements (a LayerNorm over the hidden
    channels) or ``other`` elements otherwise as persistent kernels (one pass, the row in
    registers) instead of inductor's limits (1024 and 64); process-wide, through inductor's
    heuristics hook (``InductorChoices``). A fixed rule: the same kernels in every process."""
    from torch._inductor import config as inductor
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class Choices(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction) -> bool:
            if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
                return True
            if not inductor.triton.persistent_reductions or cooperative_reduction:
                return False
            limit = inner if features.get_reduction_hint() == ReductionHint.INNER else other
            return V.graph.sizevars.statically_known_leq(features.reduction_numel, limit)

    V.set_choices_handler(Choices())
