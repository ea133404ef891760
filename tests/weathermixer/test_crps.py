"""The almost fair CRPS across ensemble members: equal to scoringrules' estimators, and on any
mesh (members over sample ranks, tiles over domain, channels over tensor) equal to the serial
loss, value and gradients of every member."""

from __future__ import annotations

import numpy as np
import pytest
import scoringrules
import torch

from tests.distributed import spawn
from weathermixer.loss import WeightedCRPS, ensemble_crps, latitude_weights

MEMBERS, BATCH, LAT, LON, CHANNELS = 4, 2, 6, 8, 3


@pytest.mark.parametrize("members", [2, 3, 8])
def test_fair_and_almost_fair_crps_equal_scoringrules(members):
    generator = torch.Generator().manual_seed(members)
    ensemble = torch.randn(members, 50, generator=generator, dtype=torch.float64)
    truth = torch.randn(50, generator=generator, dtype=torch.float64)
    fair = scoringrules.crps_ensemble(truth.numpy(), ensemble.numpy(), m_axis=0, estimator="fair")
    standard = scoringrules.crps_ensemble(truth.numpy(), ensemble.numpy(), m_axis=0, estimator="nrg")
    np.testing.assert_allclose(ensemble_crps(ensemble, truth, 1.0).numpy(), fair, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ensemble_crps(ensemble, truth, 0.0).numpy(), standard, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ensemble_crps(ensemble, truth, 0.95).numpy(), 0.95 * fair + 0.05 * standard,
                               rtol=1e-12, atol=1e-14)


def test_a_single_member_has_no_fair_crps():
    with pytest.raises(ValueError, match="at least 2"):
        ensemble_crps(torch.zeros(1, 3), torch.zeros(3))


def problem():
    generator = torch.Generator().manual_seed(0)
    members = torch.randn(MEMBERS, BATCH, LAT, LON, CHANNELS, generator=generator, dtype=torch.float64)
    target = torch.randn(BATCH, LAT, LON, CHANNELS, generator=generator, dtype=torch.float64)
    latitudes = torch.linspace(-75, 75, LAT, dtype=torch.float64)
    channel_weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    return members, target, latitude_weights(latitudes), channel_weights


def test_weighted_crps_is_the_weighted_mean_of_the_pointwise_scores():
    members, target, lat_weights, channel_weights = problem()
    loss = WeightedCRPS(lat_weights, channel_weights, LAT * LON, float(channel_weights.sum()), alpha=0.95)
    fair = scoringrules.crps_ensemble(target.numpy(), members.numpy(), m_axis=0, estimator="fair")
    standard = scoringrules.crps_ensemble(target.numpy(), members.numpy(), m_axis=0, estimator="nrg")
    weights = lat_weights[:, None, None].numpy() * channel_weights.numpy()
    expected = ((0.95 * fair + 0.05 * standard) * weights).sum() / (BATCH * LAT * LON * channel_weights.sum().item())
    assert float(loss(members, target)) == pytest.approx(float(expected), rel=1e-7)  # float32 weights


def crps_on_mesh(rank, world_size, sample, domain, tensor):
    from parallel.mesh import MeshConfig, ProcessMesh
    from parallel.tiling import Partition, balanced_bounds

    members, target, lat_weights, channel_weights = problem()
    mesh = ProcessMesh.build(MeshConfig(sample=sample, domain=domain, tensor=tensor))
    rows = balanced_bounds(LAT, domain[0])[mesh.domain_rank // domain[1]]
    columns = balanced_bounds(LON, domain[1])[mesh.domain_rank % domain[1]]
    channels = Partition.contiguous(CHANNELS, tensor).indices[mesh.tensor_rank]
    per_rank = MEMBERS // sample
    mine = slice(mesh.sample_rank * per_rank, (mesh.sample_rank + 1) * per_rank)

    def tile(x):
        return x[..., rows[0]:rows[1], columns[0]:columns[1], :][..., channels]

    local = tile(members[mine]).clone().requires_grad_(True)
    loss = WeightedCRPS(lat_weights[rows[0]:rows[1]], channel_weights[channels], LAT * LON,
                        float(channel_weights.sum()), mesh, alpha=0.95)
    value = loss(local, tile(target))
    value.backward()
    return float(value), local.grad.numpy(), (mine, rows, columns, channels.tolist())


@pytest.mark.parametrize("world_size,sample,domain,tensor", [
    (2, 2, (1, 1), 1), (4, 4, (1, 1), 1), (4, 2, (1, 2), 1), (4, 2, (1, 1), 2), (2, 1, (2, 1), 1)],
    ids=["sample2", "sample4", "sample2-domain1x2", "sample2-tensor2", "domain2x1"])
def test_crps_on_a_mesh_equals_the_serial_crps(world_size, sample, domain, tensor):
    members, target, lat_weights, channel_weights = problem()
    members.requires_grad_(True)
    loss = WeightedCRPS(lat_weights, channel_weights, LAT * LON, float(channel_weights.sum()), alpha=0.95)
    expected = loss(members, target)
    expected.backward()
    for value, gradient, (mine, rows, columns, channels) in spawn(crps_on_mesh, world_size, sample, domain, tensor):
        assert value == pytest.approx(expected.item(), rel=1e-12)
        serial = members.grad[mine][..., rows[0]:rows[1], columns[0]:columns[1], :][..., channels]
        np.testing.assert_allclose(gradient, serial.numpy(), rtol=1e-10, atol=1e-15)
