"""Per-layer schedules: every one meets the global budget; OWL and ramp move sparsity as intended."""

import pytest
import torch

from asft_ray.config import Pattern, PruneConfig
from asft_ray.errors import AsftError
from asft_ray.eval.sparsity import model_sparsity
from asft_ray.pruning.engine import LocalRunner, capture_layer0_inputs, prune_model
from asft_ray.schedules import ScheduleSpec, build_schedule, linear_sizes
from asft_ray.schedules.budget import fit_to_budget
from asft_ray.models import decoder_layers, prunable_linears
from asft_ray.schedules import owl
from asft_ray.schedules.owl import layer_outlier_ratios, outlier_ratio, owl_sparsities
from asft_ray.scoring import wanda_scores
from tests.conftest import build_tiny_llama

BUDGETS = (0.3, 0.5, 0.6, 0.7, 0.8)


def _models():
    return {
        "llama-2x64": build_tiny_llama(),
        "llama-6x96": build_tiny_llama(hidden_size=96, intermediate_size=200, num_hidden_layers=6,
                                       num_attention_heads=6, num_key_value_heads=3),
    }


def _outliers(model):
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, 512, (4, 32), generator=g)
    return layer_outlier_ratios(model, LocalRunner(*capture_layer0_inputs(model, calib)), show_progress=False)


SPECS = {
    "uniform": ScheduleSpec(),
    "owl": ScheduleSpec(name="owl", owl_lambda=0.1),
    "ramp": ScheduleSpec(name="ramp", ramp_slope=0.3),
    "offsets": ScheduleSpec(name="owl", group_offsets=(0.05, -0.02, 0.0), attn_offset=0.07),
    "linear offsets": ScheduleSpec(name="owl", attn_offset=0.05,
                                   linear_offsets=(("mlp.down_proj", 0.1), ("self_attn.q_proj", -0.08))),
}


@pytest.mark.parametrize("name", SPECS)
def test_every_schedule_meets_the_budget_after_pruning(name):
    """Measured zeros after actually pruning, not the plan: within ± 0.1 % of the target."""
    for label, model in _models().items():
        outliers = _outliers(model)
        original = {k: v.clone() for k, v in model.state_dict().items()}
        for target in BUDGETS:
            model.load_state_dict(original)
            plan = build_schedule(SPECS[name], model, target, outliers)
            prune_model(model, "magnitude", Pattern.parse("unstructured"), plan, show_progress=False)
            achieved = model_sparsity(model)["total"]
            assert abs(achieved - target) <= 1e-3, (label, target, achieved)


def test_custom_schedule_per_module_type_is_fitted_to_the_budget():
    model = build_tiny_llama(num_hidden_layers=4)
    spec = ScheduleSpec(name="custom", attention=(0.2, 0.3, 0.4, 0.5), mlp=(0.6, 0.6, 0.7, 0.7))
    for target in BUDGETS:
        plan = build_schedule(spec, model, target)
        sizes = linear_sizes(model)
        pruned = sum(round(sizes[(i, n)] * s) for i, row in plan.items() for n, s in row.items())
        assert abs(pruned / sum(sizes.values()) - target) <= 1e-3
    plan = build_schedule(spec, model, 0.5)
    # the shape survives the fit: attention of layer 0 keeps the most weights
    assert plan[0]["self_attn.q_proj"] < plan[3]["self_attn.q_proj"] < plan[3]["mlp.up_proj"]


def test_linear_offsets_move_sparsity_between_the_linears_of_a_layer():
    model = build_tiny_llama(num_hidden_layers=3)
    spec = ScheduleSpec(linear_offsets=(("mlp.down_proj", 0.1), ("self_attn.q_proj", -0.08)))
    plan = build_schedule(spec, model, 0.5)
    for row in plan.values():
        assert row["mlp.down_proj"] - row["mlp.up_proj"] == pytest.approx(0.1, abs=1e-9)
        assert row["self_attn.k_proj"] - row["self_attn.q_proj"] == pytest.approx(0.08, abs=1e-9)
    with pytest.raises(AsftError, match="does not have|do not have"):
        build_schedule(ScheduleSpec(linear_offsets=(("mlp.fc9", 0.1),)), model, 0.5)


def test_a_custom_schedule_per_linear_is_applied_as_written():
    model = build_tiny_llama(num_hidden_layers=2)
    names = sorted(n for i, n in linear_sizes(model) if i == 0)
    lists = {n: [0.3 + 0.05 * k, 0.4 + 0.05 * k] for k, n in enumerate(names)}
    spec = ScheduleSpec.from_dict({"schedule": "custom", "linears": lists})
    sizes = linear_sizes(model)
    target = sum(round(sizes[(i, n)] * lists[n][i]) for i, n in sizes) / sum(sizes.values())
    plan = build_schedule(spec, model, target)
    assert all(plan[i][n] == pytest.approx(lists[n][i], abs=1e-3) for i, n in sizes)  # the fit moves < 1 weight
    # a linear that no list covers is an error, not a silent default
    partial = ScheduleSpec.from_dict({"schedule": "custom", "linears": {names[0]: [0.5, 0.5]}})
    with pytest.raises(AsftError, match="no sparsity for linear"):
        build_schedule(partial, model, 0.5)


def test_ramp_rises_with_depth_and_uniform_is_flat():
    model = build_tiny_llama(num_hidden_layers=5)
    ramp = build_schedule(ScheduleSpec(name="ramp", ramp_slope=0.2), model, 0.5)
    first = [ramp[i]["mlp.up_proj"] for i in range(5)]
    assert first == sorted(first) and first[-1] - first[0] == pytest.approx(0.2, abs=1e-6)
    uniform = build_schedule(ScheduleSpec(), model, 0.5)
    values = [s for row in uniform.values() for s in row.values()]
    assert max(values) == min(values) == pytest.approx(0.5, abs=1e-3)


def test_owl_gives_layers_with_more_outliers_less_sparsity():
    assert outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 100.0]), 2.0) == 0.25
    sparsities = owl_sparsities([0.01, 0.05, 0.03], target=0.6, lam=0.1)
    assert sparsities[1] < sparsities[2] < sparsities[0]
    assert max(sparsities) - min(sparsities) == pytest.approx(0.2)
    assert sum(sparsities) / 3 == pytest.approx(0.6)


def test_outlier_ratios_in_pieces_equal_the_whole_layers_and_hold_one_piece(monkeypatch):
    """layer_ratios reads the layer's scores in float64 pieces of at most CHUNK entries (never the
    whole layer's scores at once) and gives outlier_ratio of all of them together."""
    model = build_tiny_llama()
    g = torch.Generator().manual_seed(1)
    runner = LocalRunner(*capture_layer0_inputs(model, torch.randint(0, 512, (4, 32), generator=g)))
    layer = decoder_layers(model)[0]
    stats = runner.collect(layer, hessian=False)
    whole = torch.cat([wanda_scores(lin.weight.data, stats.sq_norm(name)).flatten()
                       for name, lin in prunable_linears(layer).items()])
    monkeypatch.setattr(owl, "CHUNK", 1000)
    pieces = list(owl.score_chunks(layer, stats))
    assert max(p.numel() for p in pieces) == 1000 and sum(p.numel() for p in pieces) == whole.numel()
    assert all(p.dtype == torch.float64 for p in pieces)
    ratios = owl.layer_ratios(layer, stats, owl.M_GRID)
    assert ratios == {m: outlier_ratio(whole, m) for m in owl.M_GRID}
    assert 0 < ratios[2.0] < 0.5 and ratios[10.0] <= ratios[2.0]


def test_bounds_are_respected_and_unreachable_budgets_fail():
    sizes = {"a": 100, "b": 300}
    ratios = fit_to_budget({"a": 0.9, "b": 0.1}, sizes, 0.5, lower=0.2, upper=0.6)
    assert all(0.2 <= r <= 0.6 for r in ratios.values())
    with pytest.raises(AsftError, match="unreachable"):
        fit_to_budget({"a": 0.5, "b": 0.5}, sizes, 0.8, upper=0.7)
    with pytest.raises(AsftError, match="unreachable"):
        PruneConfig(model="m", method="wanda", sparsity=0.8, out="o", schedule={"name": "owl", "max_sparsity": 0.7})


@pytest.mark.parametrize("bad, message", [
    ({"name": "zigzag"}, "unknown schedule"),
    ({"name": "custom"}, "needs `layers"),
    ({"name": "owl", "layers": [0.5]}, "belong to a custom schedule"),
    ({"name": "uniform", "colour": 1}, "unknown schedule key"),
    ({"name": "owl", "linears": {"mlp.up_proj": [0.5]}}, "belong to a custom schedule"),
    ({"name": "custom", "linears": {"mlp.up_proj": [1.5]}}, r"\[0, 1\)"),
    ({"name": "owl", "linear_offsets": [0.1]}, "must map linear names"),
])
def test_bad_schedules_are_clear_errors(bad, message):
    with pytest.raises(AsftError, match=message):
        PruneConfig(model="m", method="wanda", sparsity=0.5, out="o", schedule=bad)


def test_a_custom_list_of_the_wrong_length_fails_before_pruning():
    with pytest.raises(AsftError, match="lists 3 layers, the model has 2"):
        build_schedule(ScheduleSpec(name="custom", layers=(0.5, 0.5, 0.5)), build_tiny_llama(), 0.5)


@pytest.mark.parametrize("schedule", ["owl", {"name": "uniform", "linear_offsets": {"mlp.down_proj": 0.05}},
                                      {"name": "uniform", "attn_offset": 0.1}])
def test_schedules_need_unstructured_pruning(schedule):
    """Any schedule that would give linears different sparsities, linear offsets alone included
    (they were once accepted with N:M and then silently ignored)."""
    with pytest.raises(AsftError, match="needs unstructured"):
        PruneConfig(model="m", method="wanda", sparsity=0.5, pattern="2:4", out="o", schedule=schedule)
    assert not PruneConfig(model="m", method="wanda", sparsity=0.5, out="o", schedule=schedule).is_uniform
    assert PruneConfig(model="m", method="wanda", sparsity=0.5, pattern="2:4", out="o",
                       schedule={"name": "uniform", "max_sparsity": 0.9}).is_uniform


def test_a_schedule_file_round_trips(tmp_path):
    import yaml

    path = tmp_path / "best.yaml"
    for spec in (ScheduleSpec(name="custom", layers=(0.4, 0.6)),
                 ScheduleSpec(name="custom", linears=(("mlp.up_proj", (0.4, 0.6)), ("self_attn.q_proj", (0.1, 0.2))),
                              layers=(0.5, 0.5), linear_offsets=(("mlp.down_proj", 0.05),))):
        path.write_text(yaml.safe_dump({**spec.to_dict(), "global_sparsity": 0.5}))
        assert ScheduleSpec.parse(str(path)) == spec
