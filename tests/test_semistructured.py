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
