"""Structured pruning: removing channels and KV groups equals zeroing them; export reloads as plain HF."""

from __future__ import annotations

import copy

import pytest
import torch

from asft_ray.errors import AsftError
from asft_ray.export.structured import parameter_count, save_structured, shrink, zero_units
from asft_ray.pruning.structured import (
    attention_group_scores, collect_input_norms, keep_count, mlp_channel_scores, plan_structured, top_units,
)

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("calibrated", [False, True])
def test_shrunk_model_equals_zeroed_full_model(tiny_model, calib_ids, calibrated):
    stats = collect_input_norms(tiny_model, calib_ids) if calibrated else None
    plan = plan_structured(tiny_model, mlp_ratio=0.25, head_ratio=0.5, stats=stats)
    zeroed = copy.deepcopy(tiny_model)
    zero_units(zeroed, plan)
    report = shrink(tiny_model, plan)
    assert torch.allclose(logits(tiny_model), logits(zeroed), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(zeroed), logits(build_full()), atol=1e-3)  # the pruning did change the model
    # tiny Llama: hidden 64, MLP 128 -> 96 (3 x 32 x 64 weights gone), 2 KV groups of 2 heads x 16 -> 1 group
    # (q rows 32, k and v rows 16 each, o columns 32, all 64 wide): 2 layers x (6144 + 6144)
    assert report["before"]["parameters"] - report["after"]["parameters"] == 2 * (3 * 32 * 64 + 96 * 64)
    assert report["after"] == {**report["after"], "intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1}
    assert parameter_count(tiny_model) == report["after"]["parameters"]


def build_full():
    from tests.conftest import build_tiny_llama

    return build_tiny_llama()


def test_export_reloads_with_from_pretrained_and_same_logits(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    plan = plan_structured(tiny_model, mlp_ratio=0.5, head_ratio=0.5)
    report = shrink(tiny_model, plan)
    saved = save_structured(tiny_model, None, tmp_path / "s", report)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s", trust_remote_code=False).eval()
    assert reloaded.config.intermediate_size == 64 and reloaded.config.num_key_value_heads == 1
    assert reloaded.config.head_dim == 16
    assert torch.equal(logits(reloaded), logits(tiny_model))
    assert saved["weights_bytes"] > 0 and (tmp_path / "s" / "structured.json").is_file()


def test_per_layer_ratios_keep_one_shape_and_zero_the_rest(tiny_model):
    full = copy.deepcopy(tiny_model)
    plan = plan_structured(tiny_model, mlp_ratio=[0.5, 0.25], head_ratio=[0.5, 0.0])
    zero_units(full, plan)
    shrink(tiny_model, plan)
    assert tiny_model.config.intermediate_size == 96 and tiny_model.config.num_key_value_heads == 2
    layer0 = tiny_model.model.layers[0].mlp
    assert int((layer0.gate_proj.weight.abs().sum(1) == 0).sum()) == 32  # 96 - its own 64
    assert torch.allclose(logits(tiny_model), logits(full), atol=1e-5, rtol=0)


def test_scores_pick_the_strong_units(tiny_model):
    layer = tiny_model.model.layers[0]
    with torch.no_grad():
        layer.mlp.gate_proj.weight[7] *= 100
        layer.self_attn.k_proj.weight[16:32] *= 100  # KV head 1
    assert int(torch.argmax(mlp_channel_scores(layer.mlp))) == 7
    assert int(torch.argmax(attention_group_scores(layer.self_attn, 4, 2))) == 1
    assert top_units(torch.tensor([1.0, 3.0, 3.0, 2.0]), 2).tolist() == [1, 2]


def test_impossible_ratios_are_clear_errors(tiny_model):
    with pytest.raises(AsftError, match="removes all 2"):
        plan_structured(tiny_model, head_ratio=1.0)
    with pytest.raises(AsftError, match="between 0 and 1"):
        plan_structured(tiny_model, mlp_ratio=1.5)
    with pytest.raises(AsftError, match="3 values, the model has 2 layers"):
        plan_structured(tiny_model, mlp_ratio=[0.1, 0.2, 0.3])
    assert keep_count(3, 1 / 3, "x") == 2 and keep_count(1536, 0.25, "x") == 1152


def test_only_head_counts_that_divide_the_hidden_size_are_kept():
    """transformers 5.x refuses a Llama config whose heads do not divide hidden_size (a 1.57 B run
    with 15 of 16 heads failed at save, after every layer was done): such a ratio is refused at
    planning, and names the ratios that load."""
    from asft_ray.pruning.structured import loadable_group_counts, unit_counts
    from tests.conftest import build_tiny_llama

    assert loadable_group_counts(2048, 16, 16) == [1, 2, 4, 8, 16]
    assert loadable_group_counts(576, 9, 3) == [1, 2, 3]  # SmolLM2: 3, 6 or 9 heads
    four_groups = build_tiny_llama(num_key_value_heads=4)  # hidden 64, 4 heads: 3 do not divide 64
    with pytest.raises(AsftError, match=r"keeps 3 of 4 KV groups, 3 attention heads, .* ratios that keep a "
                                        r"loadable shape: 0, 0.5, 0.75"):
        unit_counts(four_groups.config, 2, 0.0, 0.25)
    assert unit_counts(four_groups.config, 2, 0.0, [0.5, 0.75])[1] == [2, 1]  # a layer may keep fewer: the shape keeps 2


def test_cli_refuses_a_head_ratio_transformers_cannot_load_before_any_work(tmp_path, capsys, monkeypatch):
    from asft_ray.cli import main
    from asft_ray.export.formats import structured
    from tests.conftest import build_tiny_llama

    folder = tmp_path / "four-groups"
    build_tiny_llama(num_key_value_heads=4).save_pretrained(folder)
    capsys.readouterr()  # save_pretrained's progress bar
    monkeypatch.setattr(structured, "write_streamed", lambda *a, **k: pytest.fail("started the export"))
    assert main(["export", "--model", str(folder), "--format", "structured", "--head-ratio", "0.25",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asft: error: head ratio keeps 3 of 4 KV groups") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_cli_export_structured(tiny_model_dir, data_dir, tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from asft_ray.cli import main

    out = tmp_path / "s"
    assert main(["export", "--model", str(tiny_model_dir), "--format", "structured", "--mlp-ratio", "0.5",
                 "--head-ratio", "0.5", "--nsamples", "2", "--seqlen", "64", "--data-dir", data_dir,
                 "--out", str(out), "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scores"].startswith("wanda") and report["after"]["intermediate_size"] == 64
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert parameter_count(reloaded) == report["after"]["parameters"]
    capsys.readouterr()  # from_pretrained's own progress lines
    assert main(["export", "--model", str(tiny_model_dir), "--format", "structured", "--head-ratio", "1",
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asft: error: ") and "removes all 2" in err and "\n" not in err


def test_the_least_squares_refit_is_the_lstsq_solution_and_beats_plain_removal():
    from asft_ray.pruning.structured import refit_columns

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=g)
    x = (mix @ torch.randn(12, 400, generator=g)).double()  # correlated inputs: removal leaves something to refit
    w = torch.randn(8, 12, generator=g).double()
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    refit = refit_columns(w, x @ x.T, keep, damp=0.0)
    by_hand = torch.linalg.lstsq(x[keep].T, (w @ x).T).solution.T  # min ||W x - W' x_keep|| directly
    assert torch.allclose(refit, by_hand, atol=1e-8)
    plain_error = (w @ x - w[:, keep] @ x[keep]).pow(2).sum()
    refit_error = (w @ x - refit @ x[keep]).pow(2).sum()
    assert refit_error < 0.5 * plain_error


def test_the_blocked_refit_and_scores_equal_the_whole_products(monkeypatch):
    """refit_system builds W H[:, keep] and the scores sum |W| in blocks (no whole float64 copy of a
    weight): with blocks of 3 (partial blocks on every edge) they equal the unblocked formulas."""
    from asft_ray.pruning import structured

    monkeypatch.setattr(structured, "REFIT_BLOCK", 3)
    monkeypatch.setattr(structured, "SCORE_BLOCK", 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 13, generator=g)
    h = (x.T @ x).double()
    w = torch.randn(8, 13, generator=g)
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11, 12])
    h_kept, rhs = structured.refit_system(w, h, keep, damp=0.01)
    expected = h[keep][:, keep] + 0.01 * h[keep][:, keep].diagonal().mean() * torch.eye(len(keep), dtype=torch.float64)
    assert torch.equal(h_kept, expected)
    assert torch.allclose(rhs, w.double() @ h[:, keep], rtol=1e-12, atol=0)
    # consumed: H[keep, keep] written into H's own memory, the solve in place: the same bits as the plain calls
    consumed = h.clone()
    in_place = structured.refit_system(w, consumed, keep, damp=0.01, consume=True)
    assert torch.equal(in_place[0], h_kept) and in_place[0].data_ptr() == consumed.data_ptr()
    backwards = keep.flip(0)  # not ascending: compacting in place would overwrite rows not yet read, so it copies
    shuffled = structured.refit_system(w, h.clone(), backwards, damp=0.01, consume=True)[0]
    assert torch.equal(shuffled, structured.refit_system(w, h, backwards, damp=0.01)[0])
    refit = structured.solve_refit(*in_place, torch.float32)
    assert torch.equal(refit, torch.linalg.solve(h_kept, rhs.T).T.float())
    sq = torch.rand(13, dtype=torch.float64, generator=g)
    assert torch.equal(structured.row_influence(w, sq), (w.abs().double() * sq.sqrt()).sum(1))
    assert torch.equal(structured.row_influence(w), w.abs().double().sum(1))
    assert torch.equal(structured.column_influence(w, sq), w.abs().double().sum(0) * sq.sqrt())


def test_a_layer_refit_consumes_its_hessians(tiny_model, calib_ids):
    """refit_layer leaves no Hessian behind in the statistics it was given (each one goes at its last
    use, the unused ones first), and the refit equals refit_columns on the same statistics."""
    from asft_ray.export.structured import head_geometry, own_units, refit_layer
    from asft_ray.pruning.structured import refit_columns

    stats = collect_input_norms(tiny_model, calib_ids, hessian=True)
    plan = plan_structured(tiny_model, mlp_ratio=0.5, head_ratio=0.0, stats=stats)
    layer, layer_stats = tiny_model.model.layers[0], stats[0]
    keep = own_units(plan[0], "mlp")
    expected = refit_columns(layer.mlp.down_proj.weight, layer_stats.hessian("mlp.down_proj"), keep)
    assert len(layer_stats.hessians) == 4  # q/k/v, o_proj, gate/up and down_proj inputs
    refit_layer(layer, plan[0], layer_stats, *head_geometry(tiny_model.config))
    assert layer_stats.hessians == {}
    assert torch.equal(layer.mlp.down_proj.weight[:, keep], expected)


def test_a_refit_structured_layer_is_closer_to_the_dense_layer_than_plain_removal(tiny_model, calib_ids):
    from asft_ray.export.structured import refit_consumers

    stats = collect_input_norms(tiny_model, calib_ids, hessian=True)
    plan = plan_structured(tiny_model, mlp_ratio=0.5, head_ratio=0.5, stats=stats)
    plain, refit = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    zero_units(plain, plan)
    refit_consumers(refit, plan, stats)
    zero_units(refit, plan)  # the removed rows of gate/up/q/k/v; down/o columns are already zero
    inputs = []
    handle = tiny_model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
    with torch.no_grad():
        for i in range(calib_ids.shape[0]):
            tiny_model(calib_ids[i : i + 1])
    handle.remove()
    x = torch.cat(inputs)
    with torch.no_grad():
        dense = tiny_model.model.layers[1].mlp(x)
        plain_error = (plain.model.layers[1].mlp(x) - dense).pow(2).sum()
        refit_error = (refit.model.layers[1].mlp(x) - dense).pow(2).sum()
    assert refit_error < plain_error
    assert (refit.model.layers[1].mlp.down_proj.weight == 0).all(0).sum() == 64  # half the channels gone


def test_depth_pruning_reloads_with_fewer_layers_and_the_outputs_of_skipping_them(tmp_path, calib_ids):
    from transformers import AutoModelForCausalLM

    from asft_ray.export.structured import drop_layers, save_structured
    from asft_ray.pruning.structured import block_influences, layers_to_drop
    from tests.conftest import build_tiny_llama

    model = build_tiny_llama(num_hidden_layers=5)
    influences = block_influences(model, calib_ids)
    dropped = layers_to_drop(influences, 2)
    assert len(dropped) == 2 and all(influences[i] <= min(influences[j] for j in range(5) if j not in dropped)
                                     for i in dropped)
    skipping = copy.deepcopy(model)  # the reference: the full model with the dropped layers passing their input through
    for i in dropped:
        skipping.model.layers[i].register_forward_hook(lambda m, a, kw, out: a[0] if a else kw["hidden_states"],
                                                       with_kwargs=True)
    drop_layers(model, dropped)
    save_structured(model, None, tmp_path / "d", {"layers_dropped": dropped})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    assert reloaded.config.num_hidden_layers == 3 and len(reloaded.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in reloaded.model.layers] == [0, 1, 2]
    assert torch.allclose(logits(reloaded), logits(skipping), atol=1e-5)
    with pytest.raises(AsftError, match="can drop 0 to 4"):
        layers_to_drop(influences, 5)


def test_cli_depth_and_refit_need_calibration_and_a_valid_count(tiny_model_dir, tmp_path, capsys):
    from asft_ray.cli import main

    base = ["export", "--model", str(tiny_model_dir), "--format", "structured", "--out", str(tmp_path / "o")]
    assert main([*base, "--refit"]) == 2
    assert "pass --nsamples" in capsys.readouterr().err
    assert main([*base, "--drop-layers", "2", "--nsamples", "2", "--seqlen", "32"]) == 2  # the tiny model has 2 layers
    assert "between 1 and 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main([*base, "--drop-layers", "1", "--refit", "--mlp-ratio", "0.25", "--nsamples", "2", "--seqlen", "32",
                 "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["after"]["num_hidden_layers"] == 1 and len(report["layers_dropped"]) == 1 and report["refit"]
