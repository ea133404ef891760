"""Which variables of the inputs become the store's channels, and the report of that choice.

Every field the inputs hold over the recognised axes (``data.normalize``) is a candidate:
over time, latitude and longitude a surface channel; with a pressure level too, one
upper-air channel per level; over latitude and longitude only (or a known static name
in a single-time file, as the CDS serves invariant fields) a static field. With no
selection the store takes every candidate, on the levels every upper-air variable holds;
``variables`` narrows all groups, ``surface``, ``upper_air``, ``static`` and ``levels``
narrow theirs (an explicit name the inputs lack is refused by ``data.combine``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import xarray as xr

from data.normalize import VARIABLE_ALIASES, InputError
from data.schema import STATIC, model_channel_order

GROUPS = ("surface", "upper_air", "static")
GROUP_NAMES = {"surface": "surface", "upper_air": "upper-air", "static": "static"}
SHOWN_SOURCES = 2  # files named per skipped variable in the report


@dataclass
class Candidates:
    """What the inputs offer: each group's variables (with the files holding them), levels, skipped variables."""

    groups: dict[str, dict[str, list[str]]] = field(default_factory=lambda: {g: {} for g in GROUPS})
    levels: dict[str, set[int]] = field(default_factory=dict)  # upper-air variable -> levels all its files hold
    skipped: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (variable, reason) -> files

    def group_of(self, name: str) -> str | None:
        return next((group for group in GROUPS if name in self.groups[group]), None)


def find_candidates(opened: Sequence[tuple[str, xr.Dataset]]) -> Candidates:
    """The candidates of normalised inputs ``(source, dataset)``."""
    found = Candidates()
    for source, dataset in opened:
        single_time = dataset.sizes.get("time", 1) == 1
        for name, variable in dataset.data_vars.items():
            name = str(name)
            if "level" in variable.dims:
                group = "upper_air"
                levels = set(variable["level"].values.tolist())
                found.levels[name] = found.levels.get(name, levels) & levels
            elif "time" not in variable.dims or (name in STATIC and single_time):
                group = "static"
            else:
                group = "surface"
            found.groups[group].setdefault(name, []).append(source)
        for name, reason in dataset.attrs.get("skipped_variables", {}).items():
            found.skipped.setdefault((name, reason), []).append(source)
    return found


def resolve_selection(selection, candidates: Candidates):
    """``selection`` (a ``data.combine.Selection`` whose None groups mean every candidate) with
    every group and the levels filled in, and the report lines of what was taken and skipped."""
    wanted = None if selection.variables is None else [_canonical(n) for n in selection.variables]
    unknown = [name for name in wanted or [] if candidates.group_of(name) is None]
    if unknown:
        raise InputError(f"--variables {unknown}: not among the inputs' fields; they offer "
                         f"{_describe_candidates(candidates)}")
    chosen = {}
    for group in GROUPS:
        given = getattr(selection, group)
        names = list(candidates.groups[group]) if given is None else [_canonical(n) for n in given]
        chosen[group] = [n for n in names if wanted is None or n in wanted]
    levels, report = selection.levels, []
    if levels is None:
        held = [candidates.levels.get(name, set()) for name in chosen["upper_air"]]
        levels = sorted(set.intersection(*held)) if held else []
        if held and not levels:
            raise InputError(f"upper-air variables {chosen['upper_air']} share no pressure level "
                             f"({ {n: sorted(h) for n, h in zip(chosen['upper_air'], held)} }); narrow them with "
                             f"--upper-air or --variables")
        report += [f"skipped {name} on levels {sorted(h - set(levels))} hPa: not held by every upper-air variable"
                   for name, h in zip(chosen["upper_air"], held) if h - set(levels)]
    resolved = replace(selection, levels=sorted(int(v) for v in levels), variables=None, **chosen)
    _check_unique_channel_names(resolved)
    return resolved, _taken(resolved) + report + _skipped(candidates, chosen)


def _canonical(name: str) -> str:
    return VARIABLE_ALIASES.get(name, name)


def _check_unique_channel_names(selection) -> None:
    channels = model_channel_order(list(selection.surface), list(selection.upper_air), list(selection.levels))
    names = [c.name for c in channels] + list(selection.static)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"channel names {repeated} would be repeated (a surface or static variable named like an "
                         f"upper-air variable and its level); narrow the selection with --variables")


def _taken(selection) -> list[str]:
    upper = (f"{' '.join(selection.upper_air)} on {' '.join(map(str, selection.levels))} hPa"
             if selection.upper_air else "none")
    return [f"took surface {' '.join(selection.surface) or 'none'}; upper-air {upper}; "
            f"static {' '.join(selection.static) or 'none'}"]


def _skipped(candidates: Candidates, chosen: dict[str, list[str]]) -> list[str]:
    lines = []
    for (name, reason), sources in candidates.skipped.items():
        shown = ", ".join(sources[:SHOWN_SOURCES]) + (f" and {len(sources) - SHOWN_SOURCES} more"
                                                      if len(sources) > SHOWN_SOURCES else "")
        lines.append(f"skipped {name} ({shown}): {reason}")
    for group in GROUPS:
        left = [name for name in candidates.groups[group] if name not in chosen[group]]
        if left:
            lines.append(f"skipped {GROUP_NAMES[group]} {' '.join(left)}: not selected")
    return lines


def _describe_candidates(candidates: Candidates) -> str:
    return "; ".join(f"{GROUP_NAMES[g]} {sorted(candidates.groups[g]) or 'none'}" for g in GROUPS)
