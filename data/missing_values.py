"""What a run does with missing values, per variable.

Missing values are NaN or a file's ``_FillValue``/``missing_value`` (xarray decodes both to
NaN): an ocean field over land, say. Each variable has a policy:

* ``fail`` (the default): the run stops before writing, naming the channel, the number
  of points and the first time;
* ``fill``: missing points take the channel mean of the statistics period (0 once
  normalised), reported in the summary;
* ``mask``: filled as ``fill``, and a 0/1 channel ``<variable>_mask`` (1 where the source
  has a value) follows the variable's channels, so the model sees where data was missing.
  Mask channels are stored with mean 0 and std 1: the model sees them unscaled.

Statistics never count the missing points (``data.stats``). Static fields take ``fail`` or
``fill`` (``mask`` fills them). A policy is written ``fill`` (every variable), or per
variable with an optional default: ``sst=mask,tp=fill,fail``; in YAML also as a mapping
``{sst: mask, default: fail}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

POLICIES = ("fail", "fill", "mask")
MASK_SUFFIX = "_mask"


class NanPolicyError(ValueError):
    """A policy that cannot be read; names the part at fault and the expected form."""


@dataclass(frozen=True)
class NanPolicy:
    default: str = "fail"
    variables: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: "str | Mapping[str, str] | NanPolicy | None") -> "NanPolicy":
        if spec is None or isinstance(spec, NanPolicy):
            return spec or cls()
        items = (dict(spec).items() if isinstance(spec, Mapping)
                 else [part.split("=", 1) if "=" in part else ("default", part) for part in spec.split(",") if part])
        default, variables = "fail", {}
        for name, policy in items:
            name, policy = str(name).strip(), str(policy).strip()
            if policy not in POLICIES or not name:
                raise NanPolicyError(f"missing-value policy {name}={policy}: expected one of {POLICIES}, for every "
                                     f"variable ('fill') or per variable with an optional default "
                                     f"('sst=mask,tp=fill,fail')")
            if name == "default":
                default = policy
            else:
                variables[name] = policy
        return cls(default, variables)

    def of(self, variable: str) -> str:
        return self.variables.get(variable, self.default)

    def text(self) -> str:
        """The canonical spelling (run records compare it)."""
        parts = [f"{name}={policy}" for name, policy in sorted(self.variables.items())]
        return ",".join([*parts, self.default]) if parts else self.default

    def masked(self, names: Sequence[str]) -> list[str]:
        return [name for name in names if self.of(name) == "mask"]

    def with_masks(self, names: Sequence[str]) -> list[str]:
        """``names`` with each masked variable's mask channel right after it."""
        return [item for name in names for item in (name, *([mask_name(name)] if self.of(name) == "mask" else []))]


def mask_name(variable: str) -> str:
    return variable + MASK_SUFFIX
