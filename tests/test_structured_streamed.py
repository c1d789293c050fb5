"""The structured export streamed one decoder layer at a time gives the in-memory export's model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from asft_ray.export.formats.registry import ExportOptions
from asft_ray.export.formats.structured import write_in_memory, write_streamed
from asft_ray.export.structured import REPORT

CASES = {
    "magnitude": dict(mlp_ratio="0.5"),
    "mlp-only": dict(mlp_ratio="0.5", nsamples=4),
    "heads": dict(mlp_ratio="0.25", head_ratio="0.5", nsamples=4),
    "per-layer": dict(mlp_ratio="0.25,0.5,0.75", head_ratio="0.5,0,0", nsamples=4),
    "refit": dict(mlp_ratio="0.5", head_ratio="0.5", refit=True, nsamples=4),
    "drop-layers": dict(mlp_ratio="0.25", head_ratio="0.5", refit=True, drop_layers=1, nsamples=4),
    "reconstruct": dict(mlp_ratio="0.5", head_ratio="0.5", refit=True, nsamples=4, reconstruct_epochs=2),
    "reconstruct-drop": dict(mlp_ratio="0.25,0.5,0.75", drop_layers=1, nsamples=4, reconstruct_epochs=1),
}


def _options(data_dir, **case) -> ExportOptions:
    return ExportOptions(**case, seqlen=32, data_dir=data_dir, device="cpu", show_progress=False)


@pytest.mark.parametrize("case", CASES)
def test_streamed_equals_in_memory(sharded_model_dir, tmp_path, data_dir, case):
    """Same tensors bit for bit (hence the same kept channels and groups), config, report and logits.
    The reports differ only in `streamed` and in weights_bytes: the streamed export writes one
    shard per layer, each with its own header."""
    options = _options(data_dir, **CASES[case])
    resident = write_in_memory(str(sharded_model_dir), tmp_path / "resident", options)
    streamed = write_streamed(str(sharded_model_dir), tmp_path / "streamed", options)
    assert (resident["streamed"], streamed["streamed"]) == (False, True)
    ignored = {"streamed", "weights_bytes"}
    assert {k: v for k, v in streamed.items() if k not in ignored} == {k: v for k, v in resident.items() if k not in ignored}
    assert json.loads((tmp_path / "streamed" / REPORT).read_text()) == streamed
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "resident").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == json.loads(
        (tmp_path / "resident" / "config.json").read_text())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    if case in ("drop-layers", "reconstruct-drop"):
        assert b.config.num_hidden_layers == 2 and len(streamed["layers_dropped"]) == 1
        assert [layer.self_attn.layer_idx for layer in b.model.layers] == [0, 1]
    if case != "magnitude":
        assert b.config.intermediate_size < 128


@pytest.mark.parametrize("case", ["refit", "drop-layers", "reconstruct"])
def test_the_streamed_export_holds_one_decoder_layer_at_a_time(sharded_model_dir, tmp_path, data_dir,
                                                              streamed_live_bytes, case):
    """Bytes of the skeleton's non-meta parameters whenever a layer is loaded or written: at most
    one dense decoder layer plus the final norm (the embeddings are freed once layer 0's inputs
    are captured, an untied lm_head is never loaded)."""
    from tests.conftest import one_layer_bytes

    write_streamed(str(sharded_model_dir), tmp_path / "o", _options(data_dir, **CASES[case]))
    dense = AutoModelForCausalLM.from_pretrained(sharded_model_dir)
    # 3 layers read and 3 written; with a layer dropped, the influence pass reads the 3 once more and 2 are written
    assert len(streamed_live_bytes) == {"refit": 6, "drop-layers": 8, "reconstruct": 6}[case]
    assert max(b for _, b in streamed_live_bytes) <= one_layer_bytes(dense), streamed_live_bytes


def test_asft_export_streams_a_safetensors_folder(tiny_model_dir, tmp_path, data_dir, capsys):
    """(The pipeline's `structure:` stage: tests/test_pipeline.py checks its report says streamed.)"""
    from asft_ray.cli import main

    out = tmp_path / "s"
    assert main(["export", "--model", str(tiny_model_dir), "--format", "structured", "--mlp-ratio", "0.5",
                 "--nsamples", "2", "--seqlen", "32", "--data-dir", data_dir, "--out", str(out), "--no-progress",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["streamed"] is True
    assert json.loads((out / REPORT).read_text())["streamed"] is True


def test_a_model_without_safetensors_is_exported_in_memory(tiny_model_dir, tmp_path, data_dir):
    """The same rule as `asft prune` (models.is_safetensors_dir): a folder with only a .bin checkpoint is loaded whole."""
    import shutil

    from safetensors.torch import load_file

    from asft_ray.export.run import export_model

    folder = tmp_path / "bin-model"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    report = export_model(str(folder), "structured", tmp_path / "s", mlp_ratio="0.5", show_progress=False)
    assert report["streamed"] is False and report["after"]["intermediate_size"] == 64


def test_a_bf16_folder_stays_bf16_with_the_in_memory_values(tmp_path, data_dir):
    """The in-memory path computes in float32 and writes float32; streamed, every layer stays in the
    checkpoint's dtype (statistics in float32, as the engine computes them): the same model rounded
    to bf16, but for the refit weights: streamed, a bf16 linear's Hessian is summed and its refit
    solved in float32 (stats.hessian_dtype), in memory the float32 linear's in float64, so a few of
    those land one bf16 rounding apart."""
    from tests.conftest import build_tiny_llama, build_tokenizer

    tokenizer = build_tokenizer()
    build_tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=3).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    tokenizer.save_pretrained(tmp_path / "bf16")
    options = _options(data_dir, **CASES["drop-layers"])
    resident = write_in_memory(str(tmp_path / "bf16"), tmp_path / "resident", options)
    streamed = write_streamed(str(tmp_path / "bf16"), tmp_path / "streamed", options)
    assert streamed["block_influence"] == resident["block_influence"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "resident").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == torch.float32 and b[key].dtype == torch.bfloat16, key
        expected, got = a[key].to(torch.bfloat16).float(), b[key].float()
        if not key.endswith(("o_proj.weight", "down_proj.weight")):  # not refit: the same bits
            assert torch.equal(expected, got), key
            continue
        moved = (expected - got).abs()  # measured: 0.2-2.4 % of them, by at most 0.15 % of the largest
        assert torch.equal(expected == 0, got == 0), key
        assert float((moved > 0).float().mean()) < 0.05, key
        assert float(moved.max()) <= 2**-7 * float(expected.abs().max()), key


def _last_hidden_error(folder, dense, ids) -> float:
    """Mean squared distance of the structured model's last hidden state to the dense model's."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        mine = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        theirs = dense(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return float(((mine - theirs) ** 2).mean())


def test_block_reconstruction_brings_the_structured_model_closer_to_dense(sharded_model_dir, tmp_path, data_dir):
    """The same shrink and refit, with and without reconstruction: on the calibration windows the
    structured model's last hidden state (before the final norm) moves closer to the dense one's,
    every layer's fit lowers its loss, and the units a layer keeps zeroed (per-layer ratios below
    the largest kept count) stay exactly zero."""
    from asft_ray.data import c4_documents, sample_calibration
    from asft_ray.models import load_tokenizer

    case = dict(mlp_ratio="0.75,0.5,0.5", head_ratio="0.5", refit=True, nsamples=4)
    plain = write_streamed(str(sharded_model_dir), tmp_path / "plain", _options(data_dir, **case))
    fitted = write_streamed(str(sharded_model_dir), tmp_path / "fitted",
                            _options(data_dir, **case, reconstruct_epochs=4, reconstruct_lr=3e-4))
    assert "reconstruction_layers" not in plain
    rows = fitted["reconstruction_layers"]
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert all(r["reconstruction_loss_last_epoch"] < r["reconstruction_loss_first_epoch"] for r in rows), rows
    assert fitted["after"] == plain["after"]  # the same shapes
    ids = sample_calibration(c4_documents(data_dir), load_tokenizer(str(sharded_model_dir)), 4, 32, 0)
    dense = AutoModelForCausalLM.from_pretrained(sharded_model_dir).eval()
    assert _last_hidden_error(tmp_path / "fitted", dense, ids) < _last_hidden_error(tmp_path / "plain", dense, ids)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").model.layers[0].mlp
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "fitted").model.layers[0].mlp
    zero_channels = (a.down_proj.weight == 0).all(dim=0)  # layer 0 keeps 32 of 128, the export shape keeps 64
    assert int(zero_channels.sum()) == 32
    assert (b.down_proj.weight[:, zero_channels] == 0).all() and (b.up_proj.weight[zero_channels] == 0).all()
    assert not torch.equal(a.down_proj.weight, b.down_proj.weight)


def test_reconstruction_options_are_checked_before_any_work(tiny_model_dir, tmp_path, capsys):
    from asft_ray.cli import main

    base = ["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o")]
    assert main([*base, "--format", "structured", "--mlp-ratio", "0.5", "--reconstruct-epochs", "1"]) == 2
    assert "pass --nsamples" in capsys.readouterr().err
    assert main([*base, "--format", "structured", "--mlp-ratio", "0.5", "--nsamples", "2",
                 "--reconstruct-epochs", "1", "--reconstruct-lr", "0"]) == 2
    assert "--reconstruct-lr > 0" in capsys.readouterr().err
    assert main([*base, "--format", "compressed", "--reconstruct-epochs", "1"]) == 2
    assert "belong to --format structured" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
