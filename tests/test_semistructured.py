"""2:4 export: the validity check, and the clear error on machines without CUDA.

The CUDA conversion path (torch.sparse.to_sparse_semi_structured) cannot run on these CPU-only
test machines; tests that need it are skipped when no GPU is present."""

from __future__ import annotations

import pytest
import torch

from asft_ray.errors import AsftError
from asft_ray.export.semistructured import CPU_MESSAGE, check_2to4, to_semistructured
from asft_ray.models import decoder_layers, prunable_linears
from asft_ray.pruning.masks import nm_mask


def prune_2to4(model) -> None:
    with torch.no_grad():
        for layer in decoder_layers(model):
            for lin in prunable_linears(layer).values():
                lin.weight.mul_(nm_mask(lin.weight.abs(), 2, 4))


def test_check_2to4_finds_the_one_bad_linear(tiny_model):
    assert check_2to4(tiny_model)["valid"] == 0  # dense random weights
    prune_2to4(tiny_model)
    assert check_2to4(tiny_model) == {"linears": 14, "valid": 14, "invalid": []}
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.up_proj.weight[5, 8:12] = 1.0  # 4 non-zeros in one group
    assert check_2to4(tiny_model)["invalid"] == ["layers.1.mlp.up_proj"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_cpu_only_is_a_clear_error(tiny_model, tiny_model_dir, tmp_path, capsys):
    from asft_ray.cli import main

    prune_2to4(tiny_model)
    with pytest.raises(AsftError, match="need a CUDA GPU; on CPU the model runs dense"):
        to_semistructured(tiny_model)
    code = main(["export", "--model", str(tiny_model_dir), "--format", "semistructured", "--out", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"asft: error: {CPU_MESSAGE}"
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_conversion_keeps_outputs(tiny_model):
    prune_2to4(tiny_model)
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    dense = tiny_model.to("cuda", torch.float16)
    with torch.no_grad():
        expected = dense(ids.cuda()).logits.float()
    report = to_semistructured(dense, "float16")
    with torch.no_grad():
        got = dense(ids.cuda()).logits.float()
    assert report["converted"] + len(report["dense"]) == 14
    assert torch.allclose(got, expected, atol=5e-2, rtol=1e-2)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_safetensors_folder_is_exported_one_layer_at_a_time(tmp_path, monkeypatch, capsys, streamed_live_bytes, tied):
    """The streamed 2:4 export, with the GPU conversion replaced by a stand-in that refuses the wide
    weights: the folder holds the model's tensors cast to fp16 (bit for bit), loads with
    transformers, lists each refused linear, and no layer is in memory beside another."""
    import json

    from transformers import AutoModelForCausalLM

    from asft_ray.cli import main
    from asft_ray.export import semistructured
    from tests.conftest import build_tiny_llama, build_tokenizer, one_layer_bytes

    tokenizer = build_tokenizer()
    model = build_tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=3, tie_word_embeddings=tied)
    prune_2to4(model)
    model.save_pretrained(tmp_path / "src", max_shard_size="200KB")
    tokenizer.save_pretrained(tmp_path / "src")
    seen = []

    def stand_in(weight):  # what kernel_refusal gets: one fp16, 2:4 CPU weight at a time
        assert weight.dtype == torch.float16 and weight.device.type == "cpu" and semistructured.is_2to4(weight)
        seen.append(tuple(weight.shape))
        return "refused: wide" if weight.shape[1] > weight.shape[0] else None

    monkeypatch.setattr(semistructured, "require_cuda", lambda: None)
    monkeypatch.setattr(semistructured, "kernel_refusal", stand_in)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in")
    out = tmp_path / "out"
    assert main(["export", "--model", str(tmp_path / "src"), "--format", "semistructured", "--out", str(out),
                 "--no-progress"]) == 0
    report = json.loads((out / "semistructured.json").read_text())
    assert report["streamed"] and len(seen) == 21
    assert report["converted"] == sum(s[1] <= s[0] for s in seen) and report["dense"]
    wide = ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")  # 64 inputs > 32 rows, 128 > 64
    assert sorted(report["dense"]) == sorted(f"layers.{i}.{name}" for i in range(3) for name in wide)
    assert len(list(out.glob("model-layer-*.safetensors"))) == 3
    stored = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(stored) == len(model.state_dict()) - tied  # a tied head is the embedding, stored once
    loaded = AutoModelForCausalLM.from_pretrained(out)
    expected = model.to(torch.float16).state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(v.dtype == torch.float16 and torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert max(live for _, live in streamed_live_bytes) <= one_layer_bytes(build_tiny_llama(num_hidden_layers=1))

    with torch.no_grad():  # one group of 4 with 3 non-zeros in the last layer: refused, nothing written
        model.model.layers[2].mlp.up_proj.weight[5, 8:12] = 1.0
    model.save_pretrained(tmp_path / "bad")
    tokenizer.save_pretrained(tmp_path / "bad")
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "bad"), "--format", "semistructured", "--out",
                 str(tmp_path / "bad-out")]) == 2
    assert capsys.readouterr().err.strip() == ("asft: error: 1 of layer 2's 7 linears are not 2:4 "
                                              "(first: layers.2.mlp.up_proj); prune with --pattern 2:4 first")
    assert not (tmp_path / "bad-out").exists() and not list(tmp_path.glob(".bad-out*"))
