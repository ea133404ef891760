"""A variational weight block's draw and its KL divergence, in one pass over ``mu`` and ``rho``.

:func:`draw_weight` returns ``mu + softplus(rho) * eps`` (``eps`` of
:func:`~parallel.rng.normal_from_key` at each element's global position) and the block's
``KL(N(mu, softplus(rho)^2) || N(0, prior_std^2))``. On CUDA one Triton kernel
(:mod:`parallel.weight_draw_triton`) reads ``mu`` and ``rho`` once for both; elsewhere the same
numbers from torch operations. The backward is one closed-form expression of ``mu``, ``rho``
and the recomputed ``eps`` (torch operations: compiled, one fused pass per block), the weight's
and the KL's gradients together.

A block is 2-D: its element ``(i, j)`` stands at global position ``row_offsets[i] + columns[j]``
(a weight's global row times its global width, plus its global column; a bias is one row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from parallel.rng import normal_from_key


def block_epsilon(key: Tensor, row_offsets: Tensor, columns: Tensor) -> Tensor:
    """The block's standard normals (float32) in the stream ``key``."""
    return normal_from_key(key, row_offsets[:, None] + columns[None, :])


def gaussian_kl_divergence(mu: Tensor, rho: Tensor, prior_std: float) -> Tensor:
    """``KL(N(mu, softplus(rho)^2) || N(0, prior_std^2))`` summed over the elements, float32 or wider."""
    compute = torch.promote_types(mu.dtype, torch.float32)
    mu, sigma = mu.to(compute), F.softplus(rho.to(compute))
    ratio = sigma / prior_std
    return (0.5 * (ratio.square() + (mu / prior_std).square() - 1) - torch.log(ratio)).sum()


def draw_weight_reference(mu: Tensor, rho: Tensor, key: Tensor, row_offsets: Tensor, columns: Tensor,
                          prior_std: float) -> tuple[Tensor, Tensor]:
    """The drawn block (``mu``'s dtype) and its KL (float32 or wider), from torch operations."""
    eps = block_epsilon(key, row_offsets, columns)
    return mu + F.softplus(rho) * eps.to(mu.dtype), gaussian_kl_divergence(mu, rho, prior_std)


@torch.library.custom_op("weathermixer::draw_weight", mutates_args=())
def draw_weight(mu: Tensor, rho: Tensor, key: Tensor, row_offsets: Tensor, columns: Tensor,
                prior_std: float) -> tuple[Tensor, Tensor]:
    """:func:`draw_weight_reference`; on CUDA one pass (one kernel)."""
    return draw_weight_reference(mu, rho, key, row_offsets, columns, prior_std)


@draw_weight.register_fake
def _(mu: Tensor, rho: Tensor, key: Tensor, row_offsets: Tensor, columns: Tensor,
      prior_std: float) -> tuple[Tensor, Tensor]:
    return torch.empty_like(mu), mu.new_empty((), dtype=torch.promote_types(mu.dtype, torch.float32))


@draw_weight.register_kernel("cuda")
def _(mu: Tensor, rho: Tensor, key: Tensor, row_offsets: Tensor, columns: Tensor,
      prior_std: float) -> tuple[Tensor, Tensor]:
    if mu.dtype == torch.float64:  # the kernel computes in float32
        return draw_weight_reference(mu, rho, key, row_offsets, columns, prior_std)
    from parallel.weight_draw_triton import draw_with_kl_cuda  # Triton: CUDA machines only

    return draw_with_kl_cuda(mu.contiguous(), rho.contiguous(), key, row_offsets, columns, prior_std)


def _setup_context(ctx, inputs, output) -> None:
    mu, rho, key, row_offsets, columns, prior_std = inputs
    ctx.save_for_backward(mu, rho, key, row_offsets, columns)
    ctx.prior_std = prior_std


def _backward(ctx, grad_weight: Tensor | None, grad_kl: Tensor | None):
    """``d/d mu = g + k mu / p^2`` and ``d/d rho = (g eps + k (sigma / p^2 - 1 / sigma)) sigmoid(rho)``
    for the weight's gradient ``g`` and the KL's ``k``, in float32 or wider."""
    mu, rho, key, row_offsets, columns = ctx.saved_tensors
    compute = torch.promote_types(mu.dtype, torch.float32)
    variance, m, r = ctx.prior_std**2, mu.to(compute), rho.to(compute)
    grad_mu, grad_sigma = torch.zeros_like(m), torch.zeros_like(m)
    if grad_weight is not None:
        grad_mu = grad_weight.to(compute)
        grad_sigma = grad_mu * block_epsilon(key, row_offsets, columns).to(compute)
    if grad_kl is not None:
        sigma = F.softplus(r)
        grad_mu = grad_mu + grad_kl * m / variance
        grad_sigma = grad_sigma + grad_kl * (sigma / variance - 1 / sigma)
    return grad_mu.to(mu.dtype), (grad_sigma * torch.sigmoid(r)).to(rho.dtype), None, None, None, None


draw_weight.register_autograd(_backward, setup_context=_setup_context)
