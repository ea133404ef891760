"""Dropout at small probabilities: draw the dropped positions, not a mask.

A mask costs one random number per element and a byte per element saved for backward; at
``jigsaw-1b``'s p = 0.001 nearly all of that work keeps values. :class:`PositionDropout` draws the
positions to drop instead: ``M ~ Poisson(n * -ln(1 - p))`` positions uniform over the ``n``
elements. Each element is then hit a ``Poisson(-ln(1 - p))`` number of times, independently of
every other element (the splitting property of the Poisson distribution), so it is dropped with
probability exactly ``1 - e^{ln(1 - p)} = p``, independently: the distribution of ``nn.Dropout``,
at a cost of about ``p * n`` random numbers. The scaling by ``1 / (1 - p)`` fuses into the kernel
that produced the input, and backward zeroes the same positions of the gradient.

Shapes are static (no host synchronisation, one compiled graph): ``capacity`` candidate positions
are drawn and the first ``M`` used. ``capacity = λ + 12 √λ + 24`` for the mean ``λ``, which ``M``
exceeds with probability below 1e-32 for every ``n`` and ``p`` (the Poisson tail, summed for
λ from 1e-6 to 1e6); beyond it the extra positions would be lost. Draws come from torch's
default generators, like ``nn.Dropout``'s (``parallel.rng.seed_dropout``), so activation
checkpointing replays them.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionDropout(nn.Module):
    """``nn.Dropout(p)`` in distribution, drawing ``~p * n`` positions rather than ``n`` mask values."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability {p!r}: expected a number in [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.numel() == 0:
            return x
        targets, any_dropped = draw_positions(x.numel(), self.p, x.device)
        return _ScaleAndZero.apply(x, targets, any_dropped, 1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def draw_positions(n: int, p: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat positions to zero (a fixed number of them, repeats allowed) and whether any is.

    When no position is drawn, every target repeats one position and ``any_dropped`` is false:
    :func:`_zero_at` then writes that position's own value back."""
    mean = -n * math.log1p(-p)
    capacity = math.ceil(mean + 12 * math.sqrt(mean) + 24)
    count = torch.poisson(torch.full((), mean, dtype=torch.float64, device=device))
    positions = torch.randint(n, (capacity,), device=device)
    used = torch.arange(capacity, device=device) < count
    return torch.where(used, positions, positions[:1]), count > 0


def _zero_at(t: torch.Tensor, targets: torch.Tensor, any_dropped: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    first = flat.index_select(0, targets[:1])
    values = torch.where(any_dropped, torch.zeros_like(first), first).expand(targets.shape)
    return flat.index_put((targets,), values).view(t.shape)


class _ScaleAndZero(torch.autograd.Function):
    """``x * scale`` with ``targets`` zeroed; linear, so backward does the same to the gradient.
    Scaling first lets the multiplication fuse into the kernel that wrote ``x``."""

    @staticmethod
    def forward(ctx, x, targets, any_dropped, scale):
        ctx.save_for_backward(targets, any_dropped)
        ctx.scale = scale
        return _zero_at(x * scale, targets, any_dropped)

    @staticmethod
    def backward(ctx, grad):
        targets, any_dropped = ctx.saved_tensors
        return _zero_at(grad * ctx.scale, targets, any_dropped), None, None, None
