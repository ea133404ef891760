"""Parallel == serial: build a model on a mesh and on the serial mesh, compare everything.

Shared by the layer and model tests: every rank builds the serial reference itself (the
configurations are tiny), takes its tile and channel slice of the same global inputs, and
compares its outputs and the gradient of every parameter shard with the serial ones.
"""

from __future__ import annotations

import torch

from parallel.mesh import MeshConfig, ProcessMesh
from parallel.sharding import load_full_state, shard_specs


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """``|actual - expected| / |expected|`` in the Euclidean norm, the denominator at least
    ``floor`` times the root of the element count (``floor`` is an element magnitude)."""
    if not expected.numel():
        return 0.0
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = max(float(expected.norm()), floor * expected.numel() ** 0.5)
    return float((actual - expected).norm()) / scale


def build_mesh(domain, tensor, data=None) -> ProcessMesh:
    return ProcessMesh.build(MeshConfig(data=data, domain=tuple(domain), tensor=tensor))


def compare_gradients(parallel: torch.nn.Module, serial: torch.nn.Module) -> dict[str, float]:
    """Relative error of every local gradient shard against the serial gradient's slice.

    Each error is relative to the parameter's own largest gradient, floored at 1% of the
    model's largest gradient: some gradients are zero up to rounding in the serial model
    itself (a token-MLP output bias adds a per-token constant that the next channel
    LayerNorm removes), and rounding noise has no meaningful relative size.
    """
    serial_params = dict(serial.named_parameters())
    floor = 0.01 * max(float(p.grad.abs().max()) for p in serial.parameters() if p.grad is not None)
    local = dict(parallel.named_parameters())
    return {name: relative_error(local[name].grad, spec.take(serial_params[name].grad), floor)
            for name, spec in shard_specs(parallel).items()}


def copy_into(parallel: torch.nn.Module, serial: torch.nn.Module) -> None:
    load_full_state(parallel, {k: v.detach() for k, v in serial.state_dict().items()})
