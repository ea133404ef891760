"""Scores against direct numpy computations of their formulas, on small random fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed import spawn
from weathermixer import metrics

LATITUDES = np.linspace(-90.0, 90.0, 7)


def _fields(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), rng.standard_normal(shape)


def _weighted_mean(x: np.ndarray) -> np.ndarray:
    """Area-weighted mean over (lat, lon), written out from the definition (cos latitude,
    the pole rows a quarter cell: sin(spacing / 4))."""
    w = np.maximum(np.cos(np.deg2rad(LATITUDES)), np.sin(np.deg2rad(30.0 / 4)))
    return (x * w[:, None]).sum(axis=(-2, -1)) / (w.sum() * x.shape[-1])


def test_rmse_bias_acc_match_numpy():
    forecast, truth = _fields((3, 7, 5))  # (time, lat, lon)
    climatology = np.random.default_rng(1).standard_normal((7, 5))
    f, o, c = map(torch.from_numpy, (forecast, truth, climatology))

    expected_rmse = np.sqrt(_weighted_mean((forecast - truth) ** 2).mean())
    expected_bias = _weighted_mean(forecast - truth).mean()
    a, b = forecast - climatology, truth - climatology
    expected_acc = (_weighted_mean(a * b) / np.sqrt(_weighted_mean(a * a) * _weighted_mean(b * b))).mean()

    assert metrics.rmse(f, o, LATITUDES, latitudes=True, time_dim=0).item() == pytest.approx(expected_rmse, rel=1e-12)
    assert metrics.bias(f, o, LATITUDES, latitudes=True, time_dim=0).item() == pytest.approx(expected_bias, rel=1e-12)
    assert metrics.acc(f, o, c, LATITUDES, latitudes=True, time_dim=0).item() == pytest.approx(expected_acc, rel=1e-12)
    # explicit weights of any scale give the same scores as latitudes
    weights = 3.0 * np.maximum(np.cos(np.deg2rad(LATITUDES)), np.sin(np.deg2rad(30.0 / 4)))
    assert metrics.rmse(f, o, weights, time_dim=0).item() == pytest.approx(expected_rmse, rel=1e-12)


def test_scores_of_exact_and_shifted_forecasts():
    truth = torch.from_numpy(_fields((2, 7, 5))[1])
    assert metrics.rmse(truth, truth, LATITUDES, latitudes=True, time_dim=0).item() == 0.0
    shifted = truth + 2.5
    assert metrics.bias(shifted, truth, LATITUDES, latitudes=True, time_dim=0).item() == pytest.approx(2.5)
    assert metrics.rmse(shifted, truth, LATITUDES, latitudes=True, time_dim=0).item() == pytest.approx(2.5)
    climatology = torch.zeros(7, 5)
    assert metrics.acc(truth, truth, climatology, LATITUDES, latitudes=True).numpy() == pytest.approx(1.0)
    assert metrics.acc(-truth, truth, climatology, LATITUDES, latitudes=True).numpy() == pytest.approx(-1.0)
    assert torch.isnan(metrics.acc(climatology.expand(2, 7, 5), truth, climatology, LATITUDES, latitudes=True)).all()


def test_crps_fair_matches_pairwise_definition():
    rng = np.random.default_rng(2)
    ensemble, truth = rng.standard_normal((4, 2, 7, 5)), rng.standard_normal((2, 7, 5))  # (member, time, lat, lon)
    m = ensemble.shape[0]
    skill = np.abs(ensemble - truth).mean(axis=0)
    pairs = np.abs(ensemble[:, None] - ensemble[None, :]).sum(axis=(0, 1))
    expected = _weighted_mean(skill - pairs / (2 * m * (m - 1))).mean()
    got = metrics.crps_fair(torch.from_numpy(ensemble), torch.from_numpy(truth), LATITUDES, latitudes=True,
                            member_dim=0, time_dim=0)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # members all equal: the CRPS is the absolute error
    same = torch.from_numpy(truth + 1.0).expand(3, 2, 7, 5)
    assert metrics.crps_fair(same, torch.from_numpy(truth), LATITUDES, latitudes=True, member_dim=0).numpy() \
        == pytest.approx(1.0)


def test_spread_skill_matches_numpy_and_a_perfect_ensemble_scores_one():
    rng = np.random.default_rng(3)
    ensemble, truth = rng.standard_normal((5, 3, 7, 5)), rng.standard_normal((3, 7, 5))
    got = metrics.spread_skill(torch.from_numpy(ensemble), torch.from_numpy(truth), LATITUDES, latitudes=True,
                               member_dim=0, time_dim=0)
    spread = np.sqrt(_weighted_mean(ensemble.var(axis=0, ddof=1)).mean())
    skill = np.sqrt(_weighted_mean((ensemble.mean(axis=0) - truth) ** 2).mean())
    assert got["spread"].item() == pytest.approx(spread, rel=1e-12)
    assert got["skill"].item() == pytest.approx(skill, rel=1e-12)
    assert got["ratio"].item() == pytest.approx(np.sqrt(6 / 5) * spread / skill, rel=1e-12)
    # truth drawn from the same distribution as the members: ratio near 1
    draws = torch.from_numpy(np.random.default_rng(4).standard_normal((11, 400, 7, 5)))
    ratio = metrics.spread_skill(draws[1:], draws[0], LATITUDES, latitudes=True, member_dim=0, time_dim=0)["ratio"]
    assert ratio.item() == pytest.approx(1.0, abs=0.05)


def test_mae_and_crps_agree_with_scoringrules():
    scoringrules = pytest.importorskip("scoringrules")
    rng = np.random.default_rng(5)
    ensemble, truth = rng.standard_normal((6, 2, 7, 5)), rng.standard_normal((2, 7, 5))
    point = scoringrules.crps_ensemble(truth, np.moveaxis(ensemble, 0, -1), estimator="fair")
    got = metrics.crps_fair(torch.from_numpy(ensemble), torch.from_numpy(truth), LATITUDES, latitudes=True,
                            member_dim=0, time_dim=0)
    assert got.item() == pytest.approx(_weighted_mean(point).mean(), rel=1e-10)
    mae = metrics.mae(torch.from_numpy(ensemble[0]), torch.from_numpy(truth), LATITUDES, latitudes=True, time_dim=0)
    assert mae.item() == pytest.approx(_weighted_mean(np.abs(ensemble[0] - truth)).mean(), rel=1e-12)


def test_rank_histogram_counts_ranks_by_area():
    truth = torch.zeros(1, 7, 5)
    ensemble = torch.stack([torch.full((1, 7, 5), v) for v in (-1.0, 1.0, 2.0)])  # truth between members 0 and 1
    ensemble[:, 0, 3] = torch.tensor([1.0, 2.0, 3.0])[:, None]  # one row: every member above the truth
    got = metrics.rank_histogram(ensemble, truth, LATITUDES, member_dim=0, latitudes=True).numpy()
    w = np.maximum(np.cos(np.deg2rad(LATITUDES)), np.sin(np.deg2rad(30.0 / 4)))
    expected = np.array([w[3], w.sum() - w[3], 0, 0]) / w.sum()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # truth drawn like the members: flat; members too narrow: U-shaped
    draws = torch.from_numpy(np.random.default_rng(6).standard_normal((5, 200, 7, 5)))
    flat = metrics.rank_histogram(draws[1:], draws[0], LATITUDES, member_dim=0, latitudes=True).numpy()
    np.testing.assert_allclose(flat, 0.2, atol=0.02)
    narrow = metrics.rank_histogram(0.2 * draws[1:], draws[0], LATITUDES, member_dim=0, latitudes=True).numpy()
    assert narrow[0] > 0.35 and narrow[-1] > 0.35 and narrow[1:-1].max() < 0.15


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="lat=7"):
        metrics.rmse(torch.zeros(6, 5), torch.zeros(6, 5), LATITUDES, latitudes=True)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.bias(torch.zeros(7, 5), torch.zeros(7, 4), LATITUDES, latitudes=True)
    with pytest.raises(ValueError, match="needs >= 2"):
        metrics.crps_fair(torch.zeros(1, 7, 5), torch.zeros(7, 5), LATITUDES, latitudes=True, member_dim=0)


def _tiled_scores(rank, world_size, forecast, truth):
    import torch.distributed as dist

    rows = np.array_split(np.arange(len(LATITUDES)), world_size)[rank]
    weights = metrics.latitude_weights(LATITUDES)[rows]
    f, o = torch.from_numpy(forecast[..., rows, :]), torch.from_numpy(truth[..., rows, :])
    group = dist.group.WORLD
    return (metrics.rmse(f, o, weights, time_dim=0, group=group).item(),
            metrics.bias(f, o, weights, time_dim=0, group=group).item())


def test_tiles_reduced_over_a_group_give_the_whole_grid_score():
    forecast, truth = _fields((2, 7, 5), seed=5)
    expected = (metrics.rmse(torch.from_numpy(forecast), torch.from_numpy(truth), LATITUDES, latitudes=True,
                             time_dim=0).item(),
                metrics.bias(torch.from_numpy(forecast), torch.from_numpy(truth), LATITUDES, latitudes=True,
                             time_dim=0).item())
    for result in spawn(_tiled_scores, 2, forecast, truth):
        assert result == pytest.approx(expected, rel=1e-12)
