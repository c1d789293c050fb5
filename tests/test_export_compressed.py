"""Bitmask + values format: bit-exact round trip and the size it promises."""

from __future__ import annotations

import json

import pytest
import torch

from asft_ray.errors import AsftError
from asft_ray.export.compressed import (
    MANIFEST, WEIGHTS_FILE, load_compressed, pack, pruned_weight_names, save_compressed, unpack,
)
from asft_ray.models import decoder_layers, prunable_linears


def prune_half(model, seed: int = 0) -> None:
    """Zero a random 50 % of every decoder-linear weight (exactly half of each matrix)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in decoder_layers(model):
            for lin in prunable_linears(layer).values():
                w = lin.weight
                order = torch.randperm(w.numel(), generator=g)[: w.numel() // 2]
                w.view(-1)[order] = 0.0


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_pack_unpack_keeps_every_bit_including_negative_zero():
    w = torch.tensor([[0.0, -0.0, 1.5, float("nan")], [0.0, 2.0, 0.0, -3.0], [0.0, 0.0, 0.0, 7.0]])
    packed, values = pack(w)
    assert packed.dtype == torch.uint8 and packed.numel() == 2  # 12 bits -> 2 bytes
    assert values.numel() == 6  # -0.0 and NaN are kept as values
    assert torch.equal(bits(unpack(packed, values, tuple(w.shape))), bits(w))
    with pytest.raises(AsftError, match="corrupt"):
        unpack(packed, values[:-1], tuple(w.shape))
    from asft_ray.export.compressed import nonzero_bits, nonzero_bits_count

    for t in (w, w.to(torch.bfloat16), w.to(torch.float16)):  # the count the sizes use: the mask's ones
        assert nonzero_bits_count(t) == int(nonzero_bits(t).sum()) == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tiny_model, tmp_path, dtype):
    model = tiny_model.to(dtype)
    prune_half(model)
    first = decoder_layers(model)[0].self_attn.q_proj.weight
    with torch.no_grad():
        first.view(-1)[1] = -0.0
    report = save_compressed(model, tmp_path / "c")
    loaded = load_compressed(tmp_path / "c")
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(bits(a[name]), bits(b[name])), name
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # re-tied
    # same outputs as the standard HF loader gives for the dense checkpoint (a model cast with .to(bf16)
    # also casts its float32 rotary buffer, so it is not the reference)
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "dense")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=dtype).eval()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, loaded(ids).logits)
    assert report["compressed_weights"] == len(pruned_weight_names(model)) == 14


def test_half_sparse_layers_take_at_most_60_percent(tiny_model, tmp_path):
    prune_half(tiny_model)
    report = save_compressed(tiny_model, tmp_path / "c")
    # fp32: 1 bit of mask + half the values = 1/32 + 1/2 of the dense bytes
    assert report["pruned_ratio"] == pytest.approx(1 / 32 + 1 / 2, abs=1e-3)
    assert report["pruned_ratio"] <= 0.60
    assert report["weights_file_bytes"] < report["dense_bytes"]
    assert report["weights_file_bytes"] == (tmp_path / "c" / WEIGHTS_FILE).stat().st_size
    assert json.loads((tmp_path / "c" / MANIFEST).read_text())["pruned_ratio"] == report["pruned_ratio"]


def test_dense_weights_are_stored_dense(tiny_model, tmp_path):
    report = save_compressed(tiny_model, tmp_path / "c")  # random init: no zeros, a bitmask would only add bytes
    assert report["compressed_weights"] == 0 and report["pruned_ratio"] == 1.0
    loaded = load_compressed(tmp_path / "c")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in tiny_model.state_dict().items())


def test_not_a_compressed_folder(tmp_path):
    with pytest.raises(AsftError, match="not a compressed export"):
        load_compressed(tmp_path)


def test_cli_export_compressed(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from asft_ray.cli import main

    out = tmp_path / "c"
    assert main(["export", "--model", str(tiny_model_dir), "--format", "compressed", "--out", str(out),
                 "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "compressed" and report["weights_file_bytes"] > 0
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = load_compressed(out)
    assert all(torch.equal(bits(v), bits(loaded.state_dict()[k])) for k, v in original.state_dict().items())
    assert (out / "tokenizer.json").is_file()
    assert main(["export", "--model", str(tiny_model_dir), "--format", "compressed", "--out", str(out)]) == 2
    assert "already holds an asft-ray output" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_export_reloads_to_the_same_bits_and_sizes_as_in_memory(tiny_model, tmp_path, dtype):
    """From a sharded safetensors folder, one decoder layer at a time: the same weights (bit for bit)
    and the same byte counts as the in-memory writer."""
    from asft_ray.export.compressed import save_compressed_streamed

    prune_half(tiny_model)
    tiny_model.to(dtype).save_pretrained(tmp_path / "src", max_shard_size="100KB")
    in_memory = save_compressed(tiny_model, tmp_path / "whole")
    streamed = save_compressed_streamed(tmp_path / "src", tmp_path / "streamed")
    assert len(list((tmp_path / "streamed").glob("model.compressed-*.safetensors"))) > 2
    for key in ("pruned_dense_bytes", "pruned_stored_bytes", "pruned_weights", "compressed_weights", "dense_bytes"):
        assert streamed[key] == in_memory[key], key
    a, b = load_compressed(tmp_path / "whole"), load_compressed(tmp_path / "streamed")
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert value.dtype == dtype and torch.equal(bits(value), bits(b.state_dict()[key])), key


def test_streamed_export_refuses_a_folder_missing_a_layer_before_writing(tiny_model, tmp_path):
    """A config that names more layers than the files hold is refused with one line, and no output
    folder is created (it used to end in a NameError halfway through the export)."""
    from asft_ray.errors import AsftError
    from asft_ray.export.compressed import save_compressed_streamed

    tiny_model.save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(AsftError, match=f"decoder layer {config['num_hidden_layers'] - 1} of"):
        save_compressed_streamed(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()
