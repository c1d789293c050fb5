"""Per-layer sparsity schedules under a global budget: uniform, owl, ramp, custom (see spec.py)."""

from __future__ import annotations

from torch import nn

from asft_ray.errors import AsftError
from asft_ray.models import decoder_layers, prunable_linears
from asft_ray.schedules.budget import achieved_sparsity, fit_to_budget
from asft_ray.schedules.owl import nearest_m, owl_sparsities
from asft_ray.schedules.spec import SCHEDULES, ScheduleSpec

__all__ = ["SCHEDULES", "ScheduleSpec", "achieved_sparsity", "build_schedule", "linear_sizes", "module_kind"]


def module_kind(name: str) -> str:
    """`attention` for a linear of the attention block (q/k/v/o), `mlp` for the rest."""
    return "attention" if "attn" in name or "attention" in name else "mlp"


def linear_sizes(model: nn.Module) -> dict[tuple[int, str], int]:
    """{(layer index, linear name): number of weights} for every prunable decoder linear."""
    return {(i, name): lin.weight.numel()
            for i, layer in enumerate(decoder_layers(model)) for name, lin in prunable_linears(layer).items()}


def _group(index: int, n_layers: int, n_groups: int) -> int:
    return index * n_groups // n_layers


def raw_ratios(spec: ScheduleSpec, target: float, keys, n_layers: int, outliers: dict | None = None) -> dict:
    """Each linear's sparsity before the budget fit (see spec.py for the formula)."""
    if spec.name == "uniform":
        base = [target] * n_layers
    elif spec.name == "ramp":
        base = [target + spec.ramp_slope * (i / max(1, n_layers - 1) - 0.5) for i in range(n_layers)]
    elif spec.name == "owl":
        if outliers is None:
            raise AsftError("the owl schedule needs the outlier ratios of the dense model (calibration data)")
        base = owl_sparsities(outliers[nearest_m(outliers, spec.owl_m)], target, spec.owl_lambda)
    else:
        base = None
    linears = dict(spec.linears or ())
    for key, values in [(k, getattr(spec, k)) for k in ("layers", "attention", "mlp")] + list(linears.items()):
        if values is not None and len(values) != n_layers:
            raise AsftError(f"custom schedule {key} lists {len(values)} layers, the model has {n_layers}")
    names = {name for _, name in keys}
    for name in set(linears) | {n for n, _ in spec.linear_offsets}:
        if name not in names:
            raise AsftError(f"schedule names linear {name!r}, which the model's layers do not have "
                            f"(they have {', '.join(sorted(names))})")
    offsets = dict(spec.linear_offsets)
    raw = {}
    for i, name in keys:
        kind = module_kind(name)
        if base is not None:
            value = base[i]
        elif name in linears:
            value = linears[name][i]
        elif getattr(spec, kind) is not None:
            value = getattr(spec, kind)[i]
        elif spec.layers is not None:
            value = spec.layers[i]
        else:
            raise AsftError(f"custom schedule gives no sparsity for linear {name!r}")
        if spec.group_offsets:
            value += spec.group_offsets[_group(i, n_layers, len(spec.group_offsets))]
        if kind == "attention":
            value += spec.attn_offset
        raw[(i, name)] = value + offsets.get(name, 0.0)
    return raw


def build_schedule(spec: ScheduleSpec, model: nn.Module, target: float, outliers: dict | None = None,
                   floor: dict | None = None) -> dict[int, dict[str, float]]:
    """{layer index: {linear name: sparsity}} meeting `target` over all prunable decoder weights.

    `floor` ({(i, name): sparsity}) raises the lower bounds, e.g. to what an earlier stage already pruned."""
    sizes = linear_sizes(model)
    raw = raw_ratios(spec, target, sizes, len(decoder_layers(model)), outliers)
    lower = {k: max(spec.min_sparsity, (floor or {}).get(k, 0.0)) for k in sizes}
    ratios = fit_to_budget(raw, sizes, target, lower, spec.max_sparsity)
    plan: dict[int, dict[str, float]] = {}
    for (i, name), s in ratios.items():
        plan.setdefault(i, {})[name] = s
    return plan


def check_reachable(spec: ScheduleSpec, target: float) -> None:
    """Fail before any work when the bounds cannot hold the target at all."""
    if not spec.min_sparsity - 1e-3 <= target <= spec.max_sparsity + 1e-3:
        raise AsftError(f"global sparsity {target:g} is unreachable within the per-layer bounds "
                        f"[{spec.min_sparsity:g}, {spec.max_sparsity:g}]")
