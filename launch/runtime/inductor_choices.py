"""Inductor's heuristics with longer persistent reductions (see :mod:`launch.runtime.compile`).

A module of its own because it imports ``torch._inductor``, which only compiled runs need, and
because inductor may pickle its settings (this class through a ``functools.partial``)."""

from __future__ import annotations

from torch._inductor import config as inductor
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V


class PersistentReductions(InductorChoices):
    """Reductions of up to ``inner`` contiguous elements, or ``other`` elements otherwise, become
    persistent kernels (the row in registers, one pass); everything else as inductor decides."""

    def __init__(self, inner: int, other: int):
        super().__init__()
        self.inner, self.other = inner, other

    def should_use_persistent_reduction(self, features, cooperative_reduction) -> bool:
        if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
            return True
        if not inductor.triton.persistent_reductions or cooperative_reduction:
            return False
        limit = self.inner if features.get_reduction_hint() == ReductionHint.INNER else self.other
        return V.graph.sizevars.statically_known_leq(features.reduction_numel, limit)

    def uuid(self) -> str:
        """Keys inductor's compile cache: graphs compiled under other limits are not reused."""
        return f"{__name__}.PersistentReductions({self.inner}, {self.other})"
