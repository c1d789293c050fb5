"""The method registry: what each pruning method needs and how it prunes one linear.

A method is declared once, in its own module in this package (found on first use), as a
`Method`: the statistics it reads, how its scores are compared, and one pure function over a
linear's weight and those statistics. Everything else (which engine path runs it, what the
runners collect, which config options apply, the CLI's list) is derived from the declaration.

A method string may add refinements after the method: `wanda+dsnot`, `ria+dsnot:20`,
`sparsegpt+lsq` (`:N` is the refinement's one integer setting, e.g. its iterations). A mask
refinement (`changes="mask"`) changes which weights are kept, never their values, so it follows
only methods that do not update the kept weights; a weight refinement (`changes="weights"`)
sets the kept weights' values for the mask so far, so it comes last and may follow any method.

This module imports neither torch nor Ray: config validation and the CLI stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from asft_ray.catalog import Catalog
from asft_ray.errors import AsftError

INPUT_STATS = frozenset({"sq_norms", "hessian", "sums", "tokens"})
"""Per linear input, summed over calibration tokens (float64): sum x^2, sum x x^T, sum x, token count.
(sum x x^T of a 16-bit linear: float32, pruning.stats.hessian_dtype.)"""
GRADIENT_STATS = frozenset({"grad_sum", "grad_sq_sum"})
"""Per weight, summed over calibration samples (float64): dL/dW and (dL/dW)^2."""
COMPARISONS = ("row", "matrix", "block")  # unstructured: per output row, whole matrix, or the method's own blocks


@dataclass(frozen=True)
class Method:
    """One pruning method. Give exactly one of

    * `score(weight, stats) -> scores` (higher = kept): the engine builds the mask (per row or
      per matrix for unstructured, per group for N:M) and keeps the kept weights as they are; or
    * `prune(weight, pattern, sparsity, stats) -> weight`: the method returns the pruned weight
      itself (it may update the kept weights, as SparseGPT does).

    `stats` is a dict holding (at least) the statistics named in `needs`, for this linear, and
    `consume_hessian`: True when this step is the last reader of stats["hessian"] and may
    overwrite it (engine.prune_weight sets it)."""

    name: str
    needs: frozenset[str]
    compare: str
    summary: str
    score: Callable | None = None
    prune: Callable | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs", frozenset(self.needs))
        if (self.score is None) == (self.prune is None):
            raise ValueError(f"method {self.name}: give exactly one of score and prune")
        unknown = self.needs - INPUT_STATS - GRADIENT_STATS
        if unknown:
            raise ValueError(f"method {self.name}: unknown statistics {sorted(unknown)}")
        if self.needs & INPUT_STATS and self.needs & GRADIENT_STATS:
            raise ValueError(f"method {self.name}: input statistics and gradients are collected by different engines")
        if self.compare not in COMPARISONS:
            raise ValueError(f"method {self.name}: compare must be one of {COMPARISONS}")
        if "+" in self.name or ":" in self.name:
            raise ValueError(f"method name {self.name!r} may not contain '+' or ':'")

    @property
    def updates_weights(self) -> bool:
        return self.prune is not None


@dataclass(frozen=True)
class Refinement:
    """A step after the method, `refine(weight, keep, pattern, stats, setting)` over the dense
    `weight` and the keep-mask so far (True = kept). `changes="mask"`: returns the new keep-mask,
    with the same number of kept weights per output row (and a valid N:M mask for N:M);
    `changes="weights"`: returns the pruned weight (zero outside `keep`, new values inside).
    `setting` is the integer after `:` in the method string, else `default`."""

    name: str
    needs: frozenset[str]
    summary: str
    refine: Callable
    default: int | None = None
    changes: str = "mask"

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs", frozenset(self.needs))
        if not self.needs <= INPUT_STATS:
            raise ValueError(f"refinement {self.name}: only input statistics are supported")
        if self.changes not in ("mask", "weights"):
            raise ValueError(f"refinement {self.name}: changes must be 'mask' or 'weights'")


@dataclass(frozen=True)
class Recipe:
    """A resolved method string: the method, then its refinements in order."""

    spec: str
    method: Method
    refinements: tuple[tuple[Refinement, int | None], ...] = ()

    @property
    def needs(self) -> frozenset[str]:
        needs = set(self.method.needs)
        for refinement, _ in self.refinements:
            needs |= refinement.needs
        return frozenset(needs)

    @property
    def calibrated(self) -> bool:
        """Needs calibration data."""
        return bool(self.needs)

    @property
    def layerwise(self) -> bool:
        """Runs on the layer-wise engine (input statistics of each decoder layer): true-sequential
        and per-layer resume apply. Methods without data prune each linear alone; gradient
        methods take gradients of the whole dense model first."""
        return self.calibrated and self.needs <= INPUT_STATS

    @property
    def gradients(self) -> bool:
        return bool(self.needs & GRADIENT_STATS)

    @property
    def hessian(self) -> bool:
        return "hessian" in self.needs


_METHODS = Catalog("method", "asft_ray.methods")
_REFINEMENTS = Catalog("refinement", "asft_ray.methods")


def register(method: Method, replace: bool = False) -> Method:
    """Add a method (a module in this package does this on import; tests may register their own)."""
    return _METHODS.add(method, replace)


def register_refinement(refinement: Refinement, replace: bool = False) -> Refinement:
    return _REFINEMENTS.add(refinement, replace)


def unregister(name: str) -> None:
    _METHODS.remove(name)
    _REFINEMENTS.remove(name)


def methods() -> dict[str, Method]:
    return _METHODS.items()


def refinements() -> dict[str, Refinement]:
    _METHODS.items()  # the package's modules declare both
    return _REFINEMENTS.items()


def method_names() -> tuple[str, ...]:
    """Built-in methods first in their historical order, then the others by name."""
    order = ("magnitude", "wanda", "sparsegpt", "taylor", "fisher")
    names = methods()
    return tuple(n for n in order if n in names) + tuple(sorted(n for n in names if n not in order))


def resolve(spec: str) -> Recipe:
    """`name[+refinement[:N]]...` -> Recipe; unknown names and impossible combinations are an AsftError."""
    if not isinstance(spec, str) or not spec:
        raise AsftError(f"unknown method {spec!r}: choose one of {', '.join(method_names())}")
    name, *steps = spec.split("+")
    known = methods()
    if name not in known:
        raise AsftError(f"unknown method {name!r}: choose one of {', '.join(method_names())}"
                        + (f" (refinements: +{', +'.join(sorted(refinements()))})" if refinements() else ""))
    method = known[name]
    chosen = []
    for step in steps:
        ref_name, _, setting = step.partition(":")
        refinement = refinements().get(ref_name)
        if refinement is None:
            raise AsftError(f"unknown refinement {ref_name!r} in method {spec!r}: choose one of "
                            f"{', '.join(sorted(refinements())) or 'none'}")
        if setting and not (setting.isdigit() and int(setting) > 0):
            raise AsftError(f"method {spec!r}: the setting after {ref_name}: must be a positive integer")
        if chosen and chosen[-1][0].changes == "weights":
            raise AsftError(f"method {spec!r}: {chosen[-1][0].name} sets the kept weights, so it must come last")
        if refinement.changes == "mask" and method.updates_weights:
            raise AsftError(f"method {spec!r}: {ref_name} refines a mask, but {name} also updates the kept weights")
        if method.needs & GRADIENT_STATS:
            raise AsftError(f"method {spec!r}: {ref_name} needs input statistics, which the gradient method {name} "
                            "does not collect")
        chosen.append((refinement, int(setting) if setting else refinement.default))
    return Recipe(spec, method, tuple(chosen))
