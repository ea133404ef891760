"""The scorecard of an evaluation: every score in a CSV file, the headline channels in Markdown."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from launch.runtime.atomic import atomic_write_text


def scorecard_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (channel, lead, method, score) with a value; rank histograms as one row per rank."""
    rows = []
    for name, scores in result["scores"].items():
        for k, lead in enumerate(result["lead_hours"]):
            for method, values in scores.items():
                if method == "count":
                    continue
                for score, per_lead in values.items():
                    value = per_lead[k]
                    if value is None:
                        continue
                    if score == "rank_histogram":
                        rows += [dict(channel=name, lead_hours=lead, method=method, score=f"rank_{r}", value=v)
                                 for r, v in enumerate(value)]
                    else:
                        rows.append(dict(channel=name, lead_hours=lead, method=method, score=score, value=value))
    return rows


def scorecard_markdown(result: dict[str, Any], channels: list[str]) -> str:
    """Per headline channel and lead: RMSE of the model and both baselines, ACC, and for an
    ensemble CRPS and spread/skill; a check mark where the model beats both baselines' RMSE."""
    ensemble = any("crps" in result["scores"][name]["model"] for name in channels)
    header = ["channel", "lead h", "RMSE model", "persistence", "climatology", "beats both", "ACC model"]
    if ensemble:
        header += ["CRPS", "spread/skill"]
    lines = [f"Scores of {result['forecast']} against {result['store']} ({len(result['init_times'])} init times; "
             f"climatology {result.get('climatology', '')} over {' .. '.join(result['climatology_period'])}).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in channels:
        scores = result["scores"][name]
        for k, lead in enumerate(result["lead_hours"]):
            model, persistence, climatology = (scores[m]["rmse"][k] for m in ("model", "persistence", "climatology"))
            if model is None:
                continue
            wins = lead > 0 and model < persistence and model < climatology
            cells = [name, str(lead), _g(model), _g(persistence), _g(climatology), "yes" if wins else "-",
                     _g(scores["model"]["acc"][k])]
            if ensemble:
                cells += [_g(scores["model"]["crps"][k]), _g(scores["model"]["spread_skill"][k])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _g(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def write_scorecard(result: dict[str, Any], channels: list[str], folder: Path) -> list[Path]:
    """``scorecard.csv`` (every score) and ``scorecard.md`` (the headline channels)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["channel", "lead_hours", "method", "score", "value"])
    writer.writeheader()
    writer.writerows(scorecard_rows(result))
    atomic_write_text(folder / "scorecard.csv", text.getvalue())
    atomic_write_text(folder / "scorecard.md", scorecard_markdown(result, channels))
    return [folder / "scorecard.csv", folder / "scorecard.md"]
