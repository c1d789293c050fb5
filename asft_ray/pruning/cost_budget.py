"""A structured plan fitted to a cost budget: the ratios whose predicted decode cost meets a target.

The target is relative: the plan's predicted seconds per generated token over the dense model's,
both predicted by the same fitted cost model (eval/cost_model.py) at the same context length,
so a cost model that is off by a common factor still gives the right plan. The plan is the
structured export's (asft_ray/export/structured.py): one MLP ratio and one KV-group ratio for
every layer, and a number of whole layers dropped. Which of these the plan may use are the
`knobs`; each has a cap (MAX_*), so a target is never met by removing nearly everything.

"Least aggressive" plan: of the plans within the caps whose predicted relative cost is at most
the target, the one that keeps the most linear weights (decoder linears and head: what a decode
step reads); on a tie, the one with fewer layers dropped, then fewer KV groups removed. For each
choice of KV groups and dropped layers, the cost rises with the MLP channels kept, so the best
MLP count is found by bisection: the largest that meets the target. `feasible_plans` gives all
of those plans, one per choice; the structured export's `--cost-search` measures each on
validation data instead of taking the least aggressive (export/structure_search.py).

Pure arithmetic on shapes: no torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from asft_ray.errors import AsftError
from asft_ray.eval.cost_model import CostModel, DecoderShape

KNOBS = ("mlp", "heads", "layers")
MAX_MLP_RATIO = 0.75  # at most this share of each layer's MLP channels goes
MAX_HEAD_RATIO = 0.5  # at most this share of the KV groups (with their query heads) goes
MAX_DROP_SHARE = 0.25  # at most this share of the decoder layers goes (rounded down)


def parse_knobs(knobs) -> tuple[str, ...]:
    """`"mlp,layers"` or `["mlp", "layers"]` -> ("mlp", "layers"): known names, at least one, each once."""
    names = [k.strip() for k in knobs.split(",")] if isinstance(knobs, str) else list(knobs)
    names = [k for k in names if k]
    bad = [k for k in names if k not in KNOBS]
    if bad or not names:
        raise AsftError(f"cost knobs {knobs!r}: name one or more of {', '.join(KNOBS)}")
    return tuple(k for k in KNOBS if k in names)


def check_cost_request(target: float, context: int | None, knobs, target_name: str = "cost target",
                       context_name: str = "cost context") -> tuple[str, ...]:
    """The one check of what a cost budget asks for (config keys, export flags and the planner all
    use it; the names say which the user wrote). Returns the parsed knobs."""
    if not 0 < target < 1:
        raise AsftError(f"{target_name} is a share of the dense model's cost per token, between 0 and 1; got {target}")
    if context is not None and context < 1:
        raise AsftError(f"{context_name} must be at least 1 token, got {context}")
    return parse_knobs(knobs)


@dataclass(frozen=True)
class CostPlan:
    """Ratios as the structured export takes them, the shape they give, and its predicted cost."""

    mlp_ratio: float  # share of MLP channels removed: exactly (intermediate - kept) / intermediate
    head_ratio: float  # share of KV groups removed: exactly (kv_heads - kept) / kv_heads
    drop_layers: int
    shape: DecoderShape  # the structured model's
    relative_cost: float  # predicted seconds per token over the dense model's
    seconds_per_token: float  # predicted, for the plan
    dense_seconds_per_token: float  # predicted, for the dense model

    def describe(self) -> str:
        return (f"MLP channels -{100 * self.mlp_ratio:.1f} %, KV groups -{100 * self.head_ratio:.1f} %, "
                f"{self.drop_layers} layers dropped")


def _kept_weights(shape: DecoderShape) -> int:
    return shape.linear_rows_and_elements()[1]


def _options(dense: DecoderShape, knobs: tuple[str, ...]) -> list[tuple[int, int]]:
    """Every (KV groups kept, layers dropped) the knobs and caps allow."""
    from asft_ray.pruning.structured import loadable_group_counts

    fewest = dense.kv_heads - int(MAX_HEAD_RATIO * dense.kv_heads)
    groups = [g for g in loadable_group_counts(dense.hidden, dense.heads, dense.kv_heads) if g >= fewest] \
        if "heads" in knobs else [dense.kv_heads]
    drops = range(int(MAX_DROP_SHARE * dense.layers) + 1) if "layers" in knobs else [0]
    return [(g, d) for g in groups for d in drops]


def feasible_plans(dense: DecoderShape, model: CostModel, target: float, context: int,
                   knobs: tuple[str, ...] = ("mlp",)) -> list[CostPlan]:
    """For each choice of KV groups kept and layers dropped that the knobs and caps allow, the plan
    with the most MLP channels whose predicted cost per generated token, with `context` tokens in
    the KV cache, is at most `target` x the dense model's (choices that cannot meet it are left
    out). AsftError, naming the cheapest reachable cost, when no choice meets it."""
    knobs = check_cost_request(target, context, knobs)
    dense_cost = model.predict(dense, context)
    if not dense_cost > 0:
        raise AsftError("the cost model predicts no cost for the dense model: it cannot rank plans")

    def plan(mlp_kept: int, groups: int, dropped: int) -> CostPlan:
        shape = replace(dense, intermediate=mlp_kept, kv_heads=groups, heads=groups * (dense.heads // dense.kv_heads),
                        layers=dense.layers - dropped, head_dim=dense.dim)
        cost = model.predict(shape, context)
        return CostPlan((dense.intermediate - mlp_kept) / dense.intermediate, (dense.kv_heads - groups) / dense.kv_heads,
                        dropped, shape, cost / dense_cost, cost, dense_cost)

    fewest_mlp = dense.intermediate - int(MAX_MLP_RATIO * dense.intermediate) if "mlp" in knobs else dense.intermediate
    feasible, cheapest = [], None
    for groups, dropped in _options(dense, knobs):
        low = plan(fewest_mlp, groups, dropped)  # the cheapest plan with these groups and layers
        cheapest = low if cheapest is None or low.relative_cost < cheapest.relative_cost else cheapest
        if low.relative_cost > target:
            continue
        meets, fails = fewest_mlp, dense.intermediate + 1  # bisection: meets(meets), not meets(fails)
        while fails - meets > 1:
            middle = (meets + fails) // 2
            if plan(middle, groups, dropped).relative_cost <= target:
                meets = middle
            else:
                fails = middle
        feasible.append(plan(meets, groups, dropped))
    if not feasible:
        raise AsftError(f"cost target {target:g} cannot be met with knobs {', '.join(knobs)}: the cheapest plan they "
                        f"allow ({cheapest.describe()}) is predicted at {cheapest.relative_cost:.3f} x the dense cost "
                        f"per generated token at {context} tokens of context; raise the target or allow more knobs")
    return feasible


def plan_for_cost(dense: DecoderShape, model: CostModel, target: float, context: int,
                  knobs: tuple[str, ...] = ("mlp",)) -> CostPlan:
    """The least aggressive of the feasible plans (see the module docstring); AsftError, naming the
    cheapest reachable cost, when none meets the target."""
    return max(feasible_plans(dense, model, target, context, knobs),
               key=lambda p: (_kept_weights(p.shape), -p.drop_layers, -p.head_ratio))
