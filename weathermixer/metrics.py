"""Forecast scores on a latitude-longitude grid: RMSE, MAE, bias, ACC, fair CRPS, spread/skill,
rank histogram.

Fields are tensors ``(..., lat, lon)``; every score first takes the area-weighted spatial
mean of one field,

    <x> = sum_{i,j} w_i x_ij / sum_{i,j} w_i        (w = cos latitude, :func:`latitude_weights`)

and then, where a ``time_dim`` is given, averages over that axis (initialisation times).
Following WeatherBench2, RMSE takes the square root after the time average, and ACC is
the time average of per-field (uncentred) correlations:

    RMSE = sqrt(mean_t <(f - o)^2>)
    MAE  = mean_t <|f - o|>
    bias = mean_t <f - o>
    ACC  = mean_t <(f - c)(o - c)> / sqrt(<(f - c)^2> <(o - c)^2>)     (c: climatology)

For an ensemble ``X_1..X_m`` along ``member_dim``:

    CRPS_fair = mean_t < 1/m sum_k |X_k - o| - 1/(2 m (m - 1)) sum_{k,l} |X_k - X_l| >
    spread    = sqrt(mean_t <var(X)>)     (unbiased variance over members)
    skill     = RMSE of the ensemble mean
    spread/skill ratio = sqrt((m + 1) / m) * spread / skill   (1 for a perfect ensemble)

The fair CRPS (Ferro 2014) is the CRPS the ensemble's own distribution would score with
infinitely many members, so ensembles of different sizes compare without bias.

On a mesh, a rank holding one tile passes its rows of the global weights and the process
group of the tiles (``group``): spatial sums are all-reduced, so every rank gets the score
of the whole grid. The functions work in float64 or the input's wider dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from parallel.comm import all_reduce_sum
from weathermixer.loss import latitude_weights


def _weights(weights_or_latitudes: torch.Tensor | Sequence[float], latitudes: bool) -> torch.Tensor:
    if latitudes:
        return latitude_weights(weights_or_latitudes)
    weights = torch.as_tensor(weights_or_latitudes, dtype=torch.float64)
    if weights.dim() != 1 or (weights < 0).any():
        raise ValueError(f"metrics: latitude weights must be a 1-D array of non-negative values, got shape "
                         f"{tuple(weights.shape)}")
    return weights


def spatial_mean(x: torch.Tensor, weights: torch.Tensor | Sequence[float], *, latitudes: bool = False,
                 group=None) -> torch.Tensor:
    """Area-weighted mean over the last two dims ``(lat, lon)``.

    ``weights``: one per latitude row (any scale); with ``latitudes=True`` they are
    latitudes in degrees and turned into cos-latitude weights. ``group``: the process group
    over which the grid's tiles are spread (None: ``x`` is the whole grid).
    """
    w = _weights(weights, latitudes)
    if x.dim() < 2 or x.shape[-2] != w.numel():
        raise ValueError(f"metrics: field of shape {tuple(x.shape)} does not end in (lat={w.numel()}, lon); "
                         f"expected one latitude weight per row")
    compute = torch.promote_types(x.dtype, torch.float64) if x.device.type == "cpu" else torch.promote_types(
        x.dtype, torch.float32)
    w = w.to(x.device, compute)
    total = (x.to(compute) * w[:, None]).sum(dim=(-2, -1))
    norm = (w.sum() * x.shape[-1]).expand(total.shape).clone()
    if group is not None:
        total, norm = all_reduce_sum(total, group), all_reduce_sum(norm, group)
    return total / norm


def _time_mean(x: torch.Tensor, time_dim: int | None) -> torch.Tensor:
    return x if time_dim is None else x.mean(dim=time_dim)


def _check(forecast: torch.Tensor, truth: torch.Tensor, what: str) -> None:
    if forecast.shape != truth.shape:
        raise ValueError(f"metrics.{what}: forecast {tuple(forecast.shape)} and truth {tuple(truth.shape)} differ "
                         f"in shape")


def mse(forecast, truth, weights, *, latitudes=False, time_dim=None, group=None) -> torch.Tensor:
    """``mean_t <(f - o)^2>``."""
    _check(forecast, truth, "mse")
    return _time_mean(spatial_mean((forecast - truth).square(), weights, latitudes=latitudes, group=group), time_dim)


def rmse(forecast, truth, weights, *, latitudes=False, time_dim=None, group=None) -> torch.Tensor:
    """``sqrt(mean_t <(f - o)^2>)``: the root is taken after the time average."""
    return mse(forecast, truth, weights, latitudes=latitudes, time_dim=time_dim, group=group).sqrt()


def mae(forecast, truth, weights, *, latitudes=False, time_dim=None, group=None) -> torch.Tensor:
    """``mean_t <|f - o|>`` (a single forecast's CRPS)."""
    _check(forecast, truth, "mae")
    return _time_mean(spatial_mean((forecast - truth).abs(), weights, latitudes=latitudes, group=group), time_dim)


def bias(forecast, truth, weights, *, latitudes=False, time_dim=None, group=None) -> torch.Tensor:
    """``mean_t <f - o>``: positive when the forecast is too high."""
    _check(forecast, truth, "bias")
    return _time_mean(spatial_mean(forecast - truth, weights, latitudes=latitudes, group=group), time_dim)


def acc(forecast, truth, climatology, weights, *, latitudes=False, time_dim=None, group=None) -> torch.Tensor:
    """Anomaly correlation ``mean_t <a b> / sqrt(<a^2> <b^2>)``, ``a = f - c``, ``b = o - c``.

    ``climatology`` broadcasts against ``truth``. A field whose forecast anomaly is zero
    everywhere (the climatology forecast itself) has no correlation: NaN.
    """
    _check(forecast, truth, "acc")
    a, b = forecast - climatology, truth - climatology
    mean = lambda x: spatial_mean(x, weights, latitudes=latitudes, group=group)  # noqa: E731
    return _time_mean(mean(a * b) / (mean(a.square()) * mean(b.square())).sqrt(), time_dim)


def crps_fair(ensemble, truth, weights, *, member_dim: int, latitudes=False, time_dim=None, group=None
              ) -> torch.Tensor:
    """Fair ensemble CRPS, ``member_dim`` indexing ``ensemble`` (``truth`` has no member axis).

    ``time_dim`` indexes the dims left after the member axis is reduced.
    """
    members = ensemble.shape[member_dim]
    if members < 2:
        raise ValueError(f"metrics.crps_fair: {members} member along dim {member_dim}; the fair CRPS needs >= 2")
    ensemble = ensemble.movedim(member_dim, 0)
    _check(ensemble[0], truth, "crps_fair")
    skill = (ensemble - truth).abs().mean(dim=0)
    # sum_{k,l} |X_k - X_l| over ordered pairs, from the sorted members in O(m log m):
    # sum_{k<l} (X_(l) - X_(k)) = sum_k (2k - m + 1) X_(k)
    ordered = ensemble.sort(dim=0).values
    rank = torch.arange(members, device=ensemble.device, dtype=ensemble.dtype).reshape(-1, *[1] * truth.dim())
    pair_sum = 2 * ((2 * rank - members + 1) * ordered).sum(dim=0)
    point = skill - pair_sum / (2 * members * (members - 1))
    return _time_mean(spatial_mean(point, weights, latitudes=latitudes, group=group), time_dim)


def spread_skill(ensemble, truth, weights, *, member_dim: int, latitudes=False, time_dim=None, group=None
                 ) -> dict[str, torch.Tensor]:
    """``{"spread", "skill", "ratio"}`` of an ensemble (see the module docstring)."""
    members = ensemble.shape[member_dim]
    if members < 2:
        raise ValueError(f"metrics.spread_skill: {members} member along dim {member_dim}; needs >= 2")
    variance = ensemble.var(dim=member_dim, unbiased=True)
    spread = _time_mean(spatial_mean(variance, weights, latitudes=latitudes, group=group), time_dim).sqrt()
    skill = rmse(ensemble.mean(dim=member_dim), truth, weights, latitudes=latitudes, time_dim=time_dim, group=group)
    return {"spread": spread, "skill": skill, "ratio": (((members + 1) / members) ** 0.5) * spread / skill}


def rank_histogram(ensemble, truth, weights, *, member_dim: int, latitudes=False, group=None) -> torch.Tensor:
    """Area-weighted frequencies ``(m + 1,)`` of the truth's rank among the ``m`` members: rank
    ``r`` means ``r`` members lie below the truth (a member equal to it counts half). Flat for
    a reliable ensemble; U-shaped when the spread is too small, dome-shaped when too large."""
    members = ensemble.shape[member_dim]
    ensemble = ensemble.movedim(member_dim, 0)
    _check(ensemble[0], truth, "rank_histogram")
    below = (ensemble < truth).sum(dim=0) + torch.div((ensemble == truth).sum(dim=0), 2, rounding_mode="floor")
    one_hot = torch.nn.functional.one_hot(below.long(), members + 1).movedim(-1, 0).to(torch.float64)
    counts = spatial_mean(one_hot, weights, latitudes=latitudes, group=group)  # (m + 1, other dims...)
    counts = counts.reshape(members + 1, -1).sum(dim=1)
    return counts / counts.sum()
