"""int8 export: the quantization by hand, exact reload of the written int8 values, logits within a
stated tolerance, streamed == in memory, pruned + int8, and clear errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from asft_ray.errors import AsftError
from asft_ray.export.int8 import (
    MANIFEST, SCALE, Int8Linear, dequantize, load_int8, load_state, quantize_model, quantize_weight, save_int8,
)
from tests.conftest import build_tiny_llama

# Logits tolerance of the int8 model against the float model it came from, on the tiny model:
# max |logit difference| <= 2 % of max |logit| (measured: 0.6 %). Against the float model whose
# weights are the dequantized int8 ones (only the bfloat16 activations differ): <= 1 %.
LOGIT_TOLERANCE, KERNEL_TOLERANCE = 0.02, 0.01


def ids(n: int = 32) -> torch.Tensor:
    return torch.randint(0, 512, (2, n), generator=torch.Generator().manual_seed(0))


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def test_quantize_weight_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [0.3, 0.1, -0.3]])
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.allclose(scale, torch.tensor([2 / 127, 1.0, 0.3 / 127]))
    # 1 / (2/127) = 63.5 rounds to even (64), 0.5 / (2/127) = 31.75 -> 32; 0.1 / (0.3/127) = 42.33 -> 42
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [127, 42, -127]]
    assert ((dequantize(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("in_features", [64, 65, 24])  # 65 and 24 are padded to the kernel's multiple of 16
def test_int8_linear_computes_the_dequantized_matmul(in_features):
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(33, in_features, generator=g), torch.randn(33, generator=g), torch.randn(3, 5, in_features, generator=g)
    q, scale = quantize_weight(w)
    y = Int8Linear(q, scale, b)(x)
    reference = torch.nn.functional.linear(x, dequantize(q, scale), b)
    assert y.shape == (3, 5, 33) and y.dtype == torch.float32
    assert relative_gap(reference, y) <= KERNEL_TOLERANCE


def test_reload_holds_exactly_the_written_int8_values_and_the_float_rest(tmp_path):
    model = build_tiny_llama()  # ties the head to the embedding
    report = save_int8(model, tmp_path / "q")
    stored, loaded = load_state(tmp_path / "q"), load_int8(tmp_path / "q")
    assert len(report["quantized"]) == 2 * 7 + 1 and report["head_quantized"] and report["head_untied"]
    for name in report["quantized"]:
        module, source = loaded.get_submodule(name), model.get_submodule(name)
        assert isinstance(module, Int8Linear)
        q, scale = module.qweight[:, : module.in_features], module.scale
        assert torch.equal(q, stored[f"{name}.weight"]) and torch.equal(scale, stored[f"{name}.weight{SCALE}"])
        assert all(torch.equal(a, b) for a, b in zip((q, scale), quantize_weight(source.weight)))
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)  # stays float, untied
    assert torch.equal(loaded.model.norm.weight, model.model.norm.weight)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["tie_word_embeddings"] is False
    weights = [model.get_submodule(name).weight for name in report["quantized"]]
    assert report["quantized_dense_bytes"] == sum(4 * w.numel() for w in weights)
    assert report["quantized_stored_bytes"] == sum(w.numel() + 4 * w.shape[0] for w in weights)  # int8 + a float32 per row


def test_reloaded_logits_are_within_the_stated_tolerance(tmp_path):
    model = build_tiny_llama()
    save_int8(model, tmp_path / "q")
    with torch.no_grad():
        dense, int8 = model(ids()).logits, load_int8(tmp_path / "q")(ids()).logits
        dequantized = copy.deepcopy(model)
        dequantized.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
        for name, module in dequantized.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(dequantize(*quantize_weight(module.weight)))
        reference = dequantized(ids()).logits
    assert 0 < relative_gap(dense, int8) <= LOGIT_TOLERANCE
    assert relative_gap(reference, int8) <= KERNEL_TOLERANCE


def test_without_the_head_the_tie_stays(tmp_path):
    model = build_tiny_llama()
    report = save_int8(model, tmp_path / "q", head=False)
    loaded = load_int8(tmp_path / "q")
    assert not report["head_quantized"] and "lm_head" not in report["quantized"]
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("tied", [True, False])
def test_streamed_export_writes_what_the_in_memory_one_writes(tmp_path, tied, monkeypatch):
    """From a sharded safetensors folder, one decoder layer at a time: the same stored tensors."""
    from asft_ray.pruning.streaming import SafetensorsReader

    model = build_tiny_llama(tie_word_embeddings=tied)
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    reads, get_many = [], SafetensorsReader.get_many
    monkeypatch.setattr(SafetensorsReader, "get_many", lambda self, keys, mapped=False: reads.append(list(keys)) or get_many(self, keys, mapped))
    whole, streamed = save_int8(model, tmp_path / "whole"), save_int8(tmp_path / "src", tmp_path / "streamed")
    def one_layer_or_one_tensor(keys: list[str]) -> bool:
        inside = all(k.startswith("model.layers.") for k in keys)
        return len(keys) == 1 or (inside and len({k.split(".")[2] for k in keys}) == 1)

    assert reads and all(one_layer_or_one_tensor(keys) for keys in reads)
    assert [len(keys) for keys in reads[:2]] == [9, 9]  # 7 linears + 2 norms per layer
    assert streamed["streamed"] and len(list((tmp_path / "streamed").glob("model.int8-*.safetensors"))) > 2
    for key in ("quantized_dense_bytes", "quantized_stored_bytes", "dense_bytes", "quantized"):
        assert streamed[key] == whole[key], key
    a, b = load_state(tmp_path / "whole"), load_state(tmp_path / "streamed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(load_int8(tmp_path / "whole")(ids()).logits, load_int8(tmp_path / "streamed")(ids()).logits)


def test_quantize_model_in_memory_equals_the_export(tmp_path):
    model = build_tiny_llama()
    save_int8(model, tmp_path / "q")
    in_memory = copy.deepcopy(model)
    quantize_model(in_memory)
    with torch.no_grad():
        assert torch.equal(in_memory(ids()).logits, load_int8(tmp_path / "q")(ids()).logits)


def test_cli_int8_of_a_structured_export_and_clear_errors(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from asft_ray.cli import main

    pruned, out = tmp_path / "pruned", tmp_path / "pruned-int8"
    assert main(["export", "--model", str(tiny_model_dir), "--format", "structured", "--mlp-ratio", "0.5",
                 "--out", str(pruned), "--no-progress"]) == 0
    assert main(["export", "--model", str(pruned), "--format", "int8", "--out", str(out), "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["format"] == "int8" and report["streamed"] and (out / MANIFEST).is_file() and (out / "tokenizer.json").is_file()
    model = load_int8(out)
    assert model.model.layers[0].mlp.down_proj.in_features == 64  # the structured shape, 128 -> 64 channels
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(pruned)(ids()).logits
        assert relative_gap(dense, model(ids()).logits) <= LOGIT_TOLERANCE

    assert main(["eval", "--model", str(out), "--seqlen", "64", "--max-windows", "2", "--json", "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stored = load_state(out)
    layer_weights = [t for k, t in stored.items() if t.dtype == torch.int8 and k.startswith("model.layers.")]
    zeros = sum(int((t == 0).sum()) for t in layer_weights) / sum(t.numel() for t in layer_weights)
    assert evaluated["windows"] == 2 and evaluated["ppl"] > 1
    assert evaluated["sparsity"] == pytest.approx(zeros)  # measured on the int8 values (zeros after rounding)
    assert main(["export", "--model", str(pruned), "--format", "int8", "--out", str(out)]) == 2
    assert "already holds an asft-ray output" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "nope"), "--format", "int8", "--out", str(tmp_path / "o")]) == 2
    assert main(["export", "--model", str(pruned), "--format", "int8", "--refit", "--nsamples", "2",
                 "--out", str(tmp_path / "o")]) == 2
    assert main(["export", "--model", str(out), "--format", "int8", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "already an int8 export" in err[2] and all(line.startswith("asft: error:") for line in err)
    with pytest.raises(AsftError, match="not an int8 export"):
        load_int8(pruned)
    with pytest.raises(AsftError, match="run on the CPU"):
        load_int8(out, device="cuda")


def test_biases_stay_float_and_come_back(tmp_path):
    model = build_tiny_llama(attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.1)
    save_int8(model, tmp_path / "q")
    loaded = load_int8(tmp_path / "q")
    q_proj = loaded.model.layers[1].self_attn.q_proj
    assert torch.equal(q_proj.bias, model.model.layers[1].self_attn.q_proj.bias)
    with torch.no_grad():
        assert relative_gap(model(ids()).logits, loaded(ids()).logits) <= LOGIT_TOLERANCE
