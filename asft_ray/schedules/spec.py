"""What a per-layer sparsity schedule is, as a typed, validated value.

A schedule turns one global target (the fraction of prunable weights to remove) into one
sparsity per decoder linear. It is built from a *shape* plus a few knobs:

    raw(layer i, linear t) = base_i + group_offsets[group(i)] + (attn_offset if t is attention)
                             + linear_offsets[t]  (for the linears named there, e.g. mlp.down_proj)

`base` is the target itself (`uniform`), OWL's outlier-weighted ratios (`owl`), a linear
ramp over depth (`ramp`), or explicit lists (`custom`: per layer, per module type, or per
linear). The raw values are then shifted by
one common amount, within [min_sparsity, max_sparsity], until the budget is met exactly
(schedules.budget). So every schedule meets the global budget; the knobs only move
sparsity between layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from asft_ray.errors import AsftError

SCHEDULES = ("uniform", "owl", "ramp", "custom")


@dataclass(frozen=True)
class ScheduleSpec:
    name: str = "uniform"
    owl_lambda: float = 0.08  # OWL: layer sparsities spread over target ± lambda (paper default 0.08)
    owl_m: float = 5.0  # OWL: an outlier is a Wanda score above M x the layer's mean (paper default 5)
    ramp_slope: float = 0.2  # ramp: last layer's sparsity minus the first layer's
    attn_offset: float = 0.0  # attention linears get this much more sparsity than the MLP (before the budget fit)
    group_offsets: tuple[float, ...] = ()  # one offset per contiguous group of layers (len(groups) groups)
    linear_offsets: tuple[tuple[str, float], ...] = ()  # (linear name in the layer, extra sparsity), e.g. mlp.down_proj
    layers: tuple[float, ...] | None = None  # custom: one sparsity per decoder layer
    attention: tuple[float, ...] | None = None  # custom: per layer, attention linears only
    mlp: tuple[float, ...] | None = None  # custom: per layer, MLP linears only
    linears: tuple[tuple[str, tuple[float, ...]], ...] | None = None  # custom: (linear name, one sparsity per layer)
    min_sparsity: float = 0.0
    max_sparsity: float = 0.99

    @property
    def is_uniform(self) -> bool:
        """One sparsity for every linear: the default schedule with no offset of any kind (bounds aside).
        The one rule for "is this schedule uniform" (validation and the run identity use it)."""
        return dataclasses.replace(self, min_sparsity=0.0, max_sparsity=0.99) == ScheduleSpec()

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise AsftError(f"unknown schedule {self.name!r}: choose one of {', '.join(SCHEDULES)} or a YAML file")
        if not 0.0 <= self.min_sparsity <= self.max_sparsity < 1.0:
            raise AsftError(f"schedule bounds need 0 <= min_sparsity <= max_sparsity < 1, got "
                            f"[{self.min_sparsity}, {self.max_sparsity}]")
        if self.owl_lambda < 0 or self.owl_m <= 0:
            raise AsftError("owl_lambda must be >= 0 and owl_m > 0")
        if self.name == "custom":
            if self.layers is None and (self.attention is None or self.mlp is None) and not self.linears:
                raise AsftError("a custom schedule needs `layers: [...]`, both `attention: [...]` and `mlp: [...]`, "
                                "or `linears: {name: [...]}`")
            lists = [(key, getattr(self, key)) for key in ("layers", "attention", "mlp")]
            for key, values in lists + [(f"linears.{n}", v) for n, v in self.linears or ()]:
                if values is not None and not all(0.0 <= v < 1.0 for v in values):
                    raise AsftError(f"custom schedule {key}: every sparsity must be in [0, 1)")
        elif any(v is not None for v in (self.layers, self.attention, self.mlp, self.linears)):
            raise AsftError(f"per-layer lists (layers/attention/mlp/linears) belong to a custom schedule, "
                            f"not {self.name!r}")

    @staticmethod
    def from_dict(values: dict, source: str = "schedule") -> "ScheduleSpec":
        if not isinstance(values, dict):
            raise AsftError(f"{source}: expected a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(ScheduleSpec)} | {"schedule", "global_sparsity", "meta"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise AsftError(f"{source}: unknown schedule key(s) {', '.join(unknown)}")
        values = {k: v for k, v in values.items() if k not in ("global_sparsity", "meta")}
        if "schedule" in values:  # written by `asft sweep` / a user: `schedule: custom`
            values["name"] = values.pop("schedule")
        from asft_ray.config import check_field_types

        check_field_types(values, ScheduleSpec, source, skip=("linear_offsets", "linears"))  # mappings in YAML, converted below
        for key in ("group_offsets", "layers", "attention", "mlp"):
            if values.get(key) is not None:
                if not isinstance(values[key], (list, tuple)):
                    raise AsftError(f"{source}: {key} must be a list of numbers")
                values[key] = tuple(float(v) for v in values[key])
        per_linear = (("linear_offsets", float, "a number"),
                      ("linears", lambda v: tuple(float(x) for x in v), "a list of numbers"))
        for key, convert, what in per_linear:
            if values.get(key) is not None:
                if not isinstance(values[key], dict):
                    raise AsftError(f"{source}: {key} must map linear names (e.g. mlp.down_proj) to {what}")
                try:
                    values[key] = tuple((str(k), convert(v)) for k, v in values[key].items())
                except (TypeError, ValueError) as err:
                    raise AsftError(f"{source}: {key}: {err}") from err
        try:
            return ScheduleSpec(**values)
        except TypeError as err:
            raise AsftError(f"{source}: {err}") from err

    @staticmethod
    def parse(text: str | dict | None) -> "ScheduleSpec":
        """`uniform`/`owl`/`ramp`, a mapping, or the path of a YAML schedule file."""
        if text is None:
            return ScheduleSpec()
        if isinstance(text, dict):
            return ScheduleSpec.from_dict(text)
        if text in SCHEDULES:
            return ScheduleSpec(name=text)
        if text.endswith((".yaml", ".yml")) or Path(text).exists():
            from asft_ray.config import load_yaml

            return ScheduleSpec.from_dict(load_yaml(text), source=text)
        raise AsftError(f"unknown schedule {text!r}: choose one of {', '.join(SCHEDULES[:3])} or a YAML file")

    def to_dict(self) -> dict:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        # per-linear keys only when set, so that schedules without them keep the identity they always had
        out.pop("linear_offsets"), out.pop("linears")
        if self.linear_offsets:
            out["linear_offsets"] = {name: v for name, v in self.linear_offsets}
        if self.linears is not None:
            out["linears"] = {name: list(v) for name, v in self.linears}
        return out
