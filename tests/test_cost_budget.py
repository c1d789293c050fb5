"""The cost-budget planner (pruning/cost_budget.py): hand-computed plans, the exhaustive search it
must agree with, monotonicity, and the clear error for a target out of reach."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from asft_ray.errors import AsftError
from asft_ray.eval.cost_model import FEATURES, CostModel, DecoderShape
from asft_ray.pruning import cost_budget
from asft_ray.pruning.cost_budget import parse_knobs, plan_for_cost


def cost_model(**coefficients) -> CostModel:
    return CostModel({name: coefficients.get(name, 0.0) for name in FEATURES})


# per layer: q 8x8, k and v 4x8 each, o 8x8 (192 weights), gate/up/down 8 x k each (24 k); head 10 x 8 = 80
TINY = DecoderShape(hidden=8, intermediate=16, heads=2, kv_heads=1, layers=4, vocab=10)


def test_bytes_only_model_keeps_the_most_mlp_channels_within_the_budget():
    # cost = weights read: 4 (192 + 24 k) + 80 = 848 + 96 k; dense (k = 16) 2384. Target 0.8: 848 + 96 k <= 1907.2,
    # k <= 11.03 -> 11 channels kept of 16 (ratio 5/16), cost 1904 / 2384
    plan = plan_for_cost(TINY, cost_model(float_bytes=1.0), 0.8, context=7)
    assert (plan.mlp_ratio, plan.head_ratio, plan.drop_layers) == (5 / 16, 0.0, 0)
    assert plan.shape.intermediate == 11 and plan.shape.layers == 4
    assert plan.relative_cost == pytest.approx(1904 / 2384)
    assert plan.dense_seconds_per_token == pytest.approx(4 * 2384)  # 4 bytes per float32 weight


def test_a_per_layer_cost_makes_dropping_a_layer_the_least_aggressive_plan():
    # bytes only, with layers allowed (at most 1 of 4): dropping 1 keeps at most 3 (192 + 24 k) + 80 = 1808
    # weights (k = 16, cost 0.758), trimming the MLP keeps 1904: the MLP plan wins
    bytes_only = plan_for_cost(TINY, cost_model(float_bytes=1.0), 0.8, 7, ("mlp", "layers"))
    assert (bytes_only.drop_layers, bytes_only.shape.intermediate) == (0, 11)
    # 1000 per layer + 4 per weight: dense 4000 + 4 x 2384 = 13536, budget 10828.8.
    # no drop: 4000 + 4 (848 + 96 k) <= 10828.8 -> k <= 8.95: 8 channels, 1616 weights kept;
    # drop 1: 3000 + 4 (656 + 72 k) <= 10828.8 -> k <= 18.07: all 16 channels, 1808 weights kept -> this one
    plan = plan_for_cost(TINY, cost_model(layer=1000.0, float_bytes=1.0), 0.8, 7, ("mlp", "layers"))
    assert (plan.mlp_ratio, plan.head_ratio, plan.drop_layers) == (0.0, 0.0, 1)
    assert plan.relative_cost == pytest.approx((3000 + 4 * 1808) / 13536)
    mlp_only = plan_for_cost(TINY, cost_model(layer=1000.0, float_bytes=1.0), 0.8, 7)
    assert (mlp_only.shape.intermediate, mlp_only.drop_layers) == (8, 0)


def _exhaustive(dense: DecoderShape, model: CostModel, target: float, context: int) -> tuple:
    """Every plan within the caps, by brute force: the most weights kept, then fewer layers, then fewer groups."""
    rep = dense.heads // dense.kv_heads
    best = None
    for k, g, d in itertools.product(range(1, dense.intermediate + 1), range(1, dense.kv_heads + 1),
                                     range(dense.layers)):
        if (dense.intermediate - k > cost_budget.MAX_MLP_RATIO * dense.intermediate
                or dense.kv_heads - g > cost_budget.MAX_HEAD_RATIO * dense.kv_heads
                or d > cost_budget.MAX_DROP_SHARE * dense.layers):
            continue
        shape = DecoderShape(dense.hidden, k, g * rep, g, dense.layers - d, dense.vocab, head_dim=dense.dim)
        if model.predict(shape, context) <= target * model.predict(dense, context):
            key = (shape.linear_rows_and_elements()[1], -d, g)
            if best is None or key > best[0]:
                best = (key, (k, g, d))
    return best[1]


@pytest.mark.parametrize("target", [0.95, 0.85, 0.7, 0.55])
def test_the_plan_is_the_exhaustive_searchs_least_aggressive_one(target):
    dense = DecoderShape(hidden=16, intermediate=40, heads=8, kv_heads=4, layers=8, vocab=50)
    model = cost_model(token=50.0, layer=30.0, float_bytes=0.05, kv_bytes=0.02)
    plan = plan_for_cost(dense, model, target, context=32, knobs=("mlp", "heads", "layers"))
    assert (plan.shape.intermediate, plan.shape.kv_heads, plan.drop_layers) == _exhaustive(dense, model, target, 32)
    assert plan.relative_cost <= target


@pytest.mark.parametrize("target", [0.85, 0.7])
def test_the_feasible_plans_are_one_per_choice_each_with_the_most_mlp_channels_that_meet_the_target(target):
    dense = DecoderShape(hidden=16, intermediate=40, heads=8, kv_heads=4, layers=8, vocab=50)
    model = cost_model(token=50.0, layer=30.0, float_bytes=0.05, kv_bytes=0.02)
    plans = cost_budget.feasible_plans(dense, model, target, 32, ("mlp", "heads", "layers"))
    choices = [(p.shape.kv_heads, p.drop_layers) for p in plans]
    assert len(choices) == len(set(choices)) > 1
    for plan in plans:
        assert plan.relative_cost <= target
        if plan.shape.intermediate < dense.intermediate:  # one channel more misses the target
            bigger = dataclasses.replace(plan.shape, intermediate=plan.shape.intermediate + 1)
            assert model.predict(bigger, 32) > target * plan.dense_seconds_per_token
    least = plan_for_cost(dense, model, target, 32, ("mlp", "heads", "layers"))
    assert least in plans


def test_a_lower_target_never_gives_a_milder_plan():
    dense = DecoderShape(hidden=576, intermediate=1536, heads=9, kv_heads=3, layers=30, vocab=49152)
    model = cost_model(token=3e-4, layer=2e-4, float_bytes=6.8e-11, kv_bytes=1.1e-10)
    plans = [plan_for_cost(dense, model, t / 100, 144) for t in range(95, 74, -1)]
    ratios = [p.mlp_ratio for p in plans]
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1]
    for target, plan in zip(range(95, 74, -1), plans):
        assert plan.relative_cost <= target / 100
        bigger = DecoderShape(576, plan.shape.intermediate + 1, 9, 3, 30, 49152)  # one channel more misses it
        assert model.predict(bigger, 144) / plan.dense_seconds_per_token > target / 100


def test_an_unreachable_target_names_the_best_reachable_cost():
    # the cheapest plan within the caps keeps 4 of 16 MLP channels: (848 + 96 x 4) / 2384 = 0.517
    with pytest.raises(AsftError, match=r"cost target 0.5 cannot be met with knobs mlp: the cheapest plan they allow "
                                        r"\(MLP channels -75.0 %.*\) is predicted at 0.517 x the dense cost"):
        plan_for_cost(TINY, cost_model(float_bytes=1.0), 0.5, context=7)


@pytest.mark.parametrize("call, message", [
    (lambda: plan_for_cost(TINY, cost_model(float_bytes=1.0), 1.0, 7), "between 0 and 1"),
    (lambda: plan_for_cost(TINY, cost_model(), 0.8, 7), "predicts no cost"),
    (lambda: parse_knobs("mlp,depth"), "name one or more of mlp, heads, layers"),
    (lambda: parse_knobs(""), "name one or more"),
])
def test_bad_planner_input_is_a_clear_error(call, message):
    with pytest.raises(AsftError, match=message):
        call()


def test_knobs_parse_from_text_or_a_list_in_a_fixed_order():
    assert parse_knobs("layers, mlp") == parse_knobs(["mlp", "layers"]) == ("mlp", "layers")


@pytest.mark.parametrize("target", [0.95, 0.8, 0.7, 0.65])
def test_removing_heads_keeps_a_head_count_that_divides_the_hidden_size(target):
    """16 heads of 128 in 2048 (the 1.57 B benchmark shape): 15 heads would not load in transformers."""
    shape = DecoderShape(hidden=2048, intermediate=5632, heads=16, kv_heads=16, layers=28, vocab=32000)
    model = cost_model(token=0.03, layer=3e-3, float_bytes=2.7e-11, kv_bytes=4.5e-11)
    plan = plan_for_cost(shape, model, target, 512, ("mlp", "heads"))
    assert 2048 % plan.shape.heads == 0 and plan.shape.kv_heads in (8, 16), plan
