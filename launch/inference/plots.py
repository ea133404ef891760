"""Evaluation figures: RMSE against lead time, and a truth / forecast / error map panel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; evaluation runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

STYLES = {"model": dict(color="C0", marker="o"), "persistence": dict(color="C1", linestyle="--"),
          "climatology": dict(color="C2", linestyle=":")}


def _channel_panels(channels: list[str]):
    """A figure with one panel per channel, two columns; returns (figure, panels in channel order)."""
    columns = min(2, len(channels))
    rows = -(-len(channels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.8 * rows), squeeze=False)
    for axis in list(axes.flat)[len(channels):]:
        axis.set_visible(False)
    return figure, list(axes.flat)[:len(channels)]


def _save(figure, title: str, path: Path) -> Path:
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_rmse(result: dict[str, Any], channels: list[str], path: Path) -> Path:
    """One panel per channel: RMSE of the model and both baselines against lead time."""
    figure, panels = _channel_panels(channels)
    leads = np.asarray(result["lead_hours"])
    for axis, name in zip(panels, channels):
        scores = result["scores"][name]
        for method, style in STYLES.items():
            values = np.asarray([np.nan if v is None else v for v in scores[method]["rmse"]], dtype=float)
            axis.plot(leads, values, label=method, **style)
        units = result["channels"][name]["units"]
        axis.set_title(f"{name} RMSE")
        axis.set_xlabel("lead time (h)")
        axis.set_ylabel(f"RMSE ({units})" if units else "RMSE")
        axis.set_xlim(leads.min(), leads.max() if len(leads) > 1 else leads.min() + 1)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    return _save(figure, f"Latitude-weighted RMSE, {len(result['init_times'])} init times", path)


def plot_map(truth: np.ndarray, forecast: np.ndarray, latitudes: np.ndarray, longitudes: np.ndarray,
             title: str, units: str, path: Path) -> Path:
    """Truth, forecast (one colour scale) and forecast - truth (symmetric scale) side by side."""
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.2), constrained_layout=True)
    low, high = np.nanmin([truth.min(), forecast.min()]), np.nanmax([truth.max(), forecast.max()])
    error = forecast - truth
    limit = float(np.nanmax(np.abs(error))) or 1.0
    panels = [("truth", truth, dict(cmap="viridis", vmin=low, vmax=high)),
              ("forecast", forecast, dict(cmap="viridis", vmin=low, vmax=high)),
              ("forecast - truth", error, dict(cmap="RdBu_r", vmin=-limit, vmax=limit))]
    for axis, (label, values, style) in zip(axes, panels):
        mesh = axis.pcolormesh(longitudes, latitudes, values, shading="nearest", **style)
        axis.set_title(label)
        bottom, top = axis.get_ylim()  # cells of the pole rows reach past the poles
        axis.set_ylim(max(bottom, -90), min(top, 90))
        axis.set_xlabel("longitude (°E)")
        axis.set_ylabel("latitude (°N)")
        figure.colorbar(mesh, ax=axis, label=units, shrink=0.9)
    figure.suptitle(title)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_rank_histograms(result: dict[str, Any], channels: list[str], path: Path, max_leads: int = 4) -> Path:
    """One panel per channel: the truth's rank among the members at up to ``max_leads`` leads
    (flat at the dashed line for a reliable ensemble; U-shaped when the spread is too small)."""
    figure, panels = _channel_panels(channels)
    for axis, name in zip(panels, channels):
        histograms = result["scores"][name]["model"]["rank_histogram"]
        scored = [k for k, h in enumerate(histograms) if h is not None and result["lead_hours"][k] > 0]
        picks = [scored[round(i * (len(scored) - 1) / max(1, max_leads - 1))] for i in range(min(max_leads,
                                                                                                  len(scored)))]
        picks = sorted(set(picks))
        width = 0.8 / max(1, len(picks))
        for j, k in enumerate(picks):
            ranks = np.arange(len(histograms[k]))
            axis.bar(ranks + (j - (len(picks) - 1) / 2) * width, histograms[k], width=width,
                     label=f"{result['lead_hours'][k]} h")
        members = len(histograms[picks[0]]) - 1 if picks else 1
        axis.axhline(1 / (members + 1), color="k", linestyle="--", linewidth=1, label="reliable")
        axis.set_title(f"{name} rank histogram ({members} members)")
        axis.set_xlabel("rank of the truth among the members")
        axis.set_ylabel("frequency (area-weighted)")
        axis.set_xticks(np.arange(members + 1))
        axis.grid(alpha=0.3, axis="y")
        axis.set_ylim(0, 1.3 * max([1 / (members + 1)] + [max(histograms[k]) for k in picks]))  # room for the legend
        axis.legend(fontsize="small", ncol=len(picks) + 1, loc="upper center")
    return _save(figure, f"Rank histograms, {len(result['init_times'])} init times", path)
