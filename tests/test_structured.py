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
    assert main(["export", "--model", str(tiny_model_dir), "--format", "structured", "--head-ratio", "1",
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asft: error: ") and "removes all 2" in err and "\n" not in err
