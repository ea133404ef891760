"""How steps are compiled: ``torch.compile`` with the inductor settings the WeatherMixer needs.

* ``triton.mix_order_reduction`` off: inductor's fusion of each LayerNorm backward with its
  weight and bias gradients picks a slow split at larger micro-batches.
* ``fallback_random`` on: dropout masks come from aten's kernels, so compiled and eager runs
  draw the same numbers.
* ``comprehensive_padding`` off: padded row strides send aten's dropout down its slow
  non-contiguous path.
* Persistent reductions (the row in registers, one pass) for the LayerNorms over the hidden
  channels and the decoder's per-point channels (:func:`persistent_reductions_up_to`), installed
  for every thread because the backward graph is compiled on autograd's device thread.

Each setting's measured gain, and what was tried and not kept: ``benchmarks/GPU.md``.
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


def compile_step(model):
    """Compile the one-step ``forward`` that ``model.rollout`` calls (``nn.Module.compile``
    compiles calls through the module, which the rollout bypasses); returns ``model``."""
    model.forward = compiled(model.forward)
    return model


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

    from launch.runtime.inductor_choices import PersistentReductions

    make = functools.partial(PersistentReductions, inner, other)
    inductor.inductor_choices_class = make
    V.set_choices_handler(make())  # the calling thread may have made inductor's default already


def saved_for_backward(function, *inputs) -> list[torch.Tensor]:
    """What the compiled forward of ``function(*inputs)`` hands to its backward, traced as
    ``torch.compile`` would partition it (AOTAutograd, inductor's decompositions, the min-cut
    partitioner) but not run: with meta tensors it costs no memory and needs no device.

    The forward graph's outputs that are not its inputs: ``function``'s own outputs first, then
    the tensors saved for backward (so their sum less the outputs is the activation memory)."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    saved: list[torch.Tensor] = []

    def forward_compiler(graph_module, _):
        outputs = next(node for node in graph_module.graph.nodes if node.op == "output").args[0]
        saved.extend(node.meta["val"] for node in outputs if node is not None and node.op != "placeholder"
                     and isinstance(node.meta.get("val"), torch.Tensor))
        return graph_module

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda graph_module, _: graph_module,
                           partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    torch._dynamo.reset()
    torch.compile(function, backend=backend, dynamic=False)(*inputs)
    return saved
