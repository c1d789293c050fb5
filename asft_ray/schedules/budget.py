"""Meet a global sparsity budget exactly by shifting every linear's sparsity by one amount.

The engine prunes exactly round(numel * s) weights of a linear (pruning.masks), so the
pruned total of a schedule is known before anything is pruned. We search the common shift
by bisection on that exact count; the per-linear bounds keep each sparsity in range.
"""

from __future__ import annotations

from asft_ray.errors import AsftError

TOLERANCE = 1e-3  # the budget holds within ± 0.1 % of the prunable weights


def pruned_count(numel: int, sparsity: float) -> int:
    """How many weights the engine zeroes in a linear of `numel` weights at `sparsity` (see masks.unstructured_mask)."""
    return round(numel * sparsity)


def achieved_sparsity(ratios: dict, sizes: dict) -> float:
    return sum(pruned_count(sizes[k], ratios[k]) for k in sizes) / sum(sizes.values())


def fit_to_budget(raw: dict, sizes: dict, target: float, lower: dict | float = 0.0, upper: dict | float = 0.99) -> dict:
    """Per-linear sparsities clamp(raw + shift, lower, upper) whose exact pruned total is `target`
    of all weights (± TOLERANCE). `raw`, `sizes` (numel), `lower`, `upper` are keyed alike.

    Raises AsftError when the bounds make the budget unreachable."""
    lo = {k: lower[k] if isinstance(lower, dict) else lower for k in sizes}
    hi = {k: upper[k] if isinstance(upper, dict) else upper for k in sizes}
    for k in sizes:
        if lo[k] > hi[k] + 1e-12:
            raise AsftError(f"sparsity bounds of {k} are empty: [{lo[k]:.4f}, {hi[k]:.4f}]")
    total = sum(sizes.values())
    floor = sum(sizes[k] * lo[k] for k in sizes) / total
    ceiling = sum(sizes[k] * hi[k] for k in sizes) / total
    if not floor - TOLERANCE <= target <= ceiling + TOLERANCE:
        raise AsftError(f"global sparsity {target:g} is unreachable within the per-layer bounds: "
                        f"they allow {floor:.4f} to {ceiling:.4f}")

    def at(shift: float) -> dict:
        return {k: min(hi[k], max(lo[k], raw[k] + shift)) for k in sizes}

    low, high = -2.0, 2.0  # at(-2) is all lower bounds, at(2) all upper bounds
    for _ in range(100):
        mid = (low + high) / 2
        if achieved_sparsity(at(mid), sizes) < target:
            low = mid
        else:
            high = mid
    ratios = min((at(low), at(high)), key=lambda r: abs(achieved_sparsity(r, sizes) - target))
    if abs(achieved_sparsity(ratios, sizes) - target) > TOLERANCE:
        raise AsftError(f"could not meet global sparsity {target:g} within ± {TOLERANCE:g}")
    return ratios
