"""How the training step is compiled: ``torch.compile`` with the inductor settings it needs.

Each is measured on one H100 or H200 (``benchmarks/GPU.md``):

* ``triton.mix_order_reduction`` off: inductor fuses each LayerNorm backward (a reduction
  over channels per token) with its weight and bias gradients (reductions over tokens) and
  the dropout mask into one kernel whose default split runs ~30 ms per call at micro-batch
  4 (``jigsaw-1b``: 397 ms per step on, 351 ms off; micro-batch 1 unchanged).
* ``fallback_random`` on: random numbers (dropout masks) come from aten's kernels, the same
  numbers as eager mode, so a compiled run trains exactly the network an eager run does
  (inductor's own philox fused into the kernels is slower: 81.0 against 79.7 ms a step at
  micro-batch 1, 298 against 291 ms at 4).
* ``comprehensive_padding`` off: inductor pads the row stride of tensors whose rows are not a
  multiple of 128 bytes (4320 bf16 channels: 8640 -> 8704 bytes); aten's dropout kernel then sees a
  non-contiguous tensor and takes its slow element-by-element path (3.7 against 1.6 ms a step at
  micro-batch 1; the step 315.5 -> 308.0 ms at micro-batch 4, 90.5 -> 89.4 ms at micro-batch 1).
* Persistent reductions (the row in registers, one pass) for the LayerNorms: inductor makes a
  reduction persistent up to 1024 contiguous elements (64 otherwise), so the LayerNorms over
  ``jigsaw-1b``'s 4320 hidden channels and the decoder's over 69-138 channels per grid point
  were looped, two passes over the row. Up to 8192 / 256 (:func:`persistent_reductions_up_to`,
  through inductor's ``InductorChoices`` hook): 300.0 -> 295.2 ms a step at micro-batch 4 and
  79.8 -> 79.3 ms at 1 on one H200 (one call, each in its own process). The rule is installed for
  every thread, since the backward graph is compiled on autograd's device thread (the LayerNorm
  backward kernels: persistent since; no further measurable time).

Measured and not set here: ``triton.multi_kernel = 1`` (each reduction compiled both
persistent and looped, the faster chosen by timing them on the GPU) gave the same at micro-batch
4 and ~0.8 ms more at 1, but its choice is made by timing in each process, so two runs (a run
and its resumption) may reduce in different orders; with a warm inductor cache torch 2.11 also
fails in it (``TypeError`` at a kernel's ``_hash_lock`` while reading its cached choice; the
environment variable ``TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE=1`` avoids that). A fixed rule
gives the same kernels in every process (``benchmarks/GPU.md``, sixth round).
"""

from __future__ import annotations

import functools

import torch


# persistent reductions (the row in registers, one pass) up to these many elements: a LayerNorm
# over jigsaw-1b's 4320 hidden channels (contiguous), the decoder's over 69-138 channels per point
PERSISTENT_INNER, PERSISTENT_OTHER = 8192, 256


@functools.cache
def configure_inductor() -> None:
    """Set the inductor options above, once per process (before the first compiled call): a
    setting changed after it (an experiment, ``benchmarks/train_step.py --inductor``) stays
    through every later :func:`compiled`."""
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
    registers) instead of inductor's limits (1024 and 64); process-wide. A fixed rule: the same
    kernels in every process.

    Inductor keeps its heuristics object (``InductorChoices``) per thread, and the backward graph
    is compiled on the autograd engine's device thread, not the caller's: the rule is installed
    as inductor's factory for every thread (``inductor_choices_class``, whose ``uuid`` also keys
    inductor's compile cache, so a cached graph compiled under other limits is not reused), and
    for the calling thread."""
    from torch._inductor import config as inductor
    from torch._inductor.virtualized import V

    from weathermixer.inductor_choices import PersistentReductions

    make = functools.partial(PersistentReductions, inner, other)
    inductor.inductor_choices_class = make
    V.set_choices_handler(make())  # the calling thread may have made inductor's default already
