"""Streamed evaluation (one decoder layer in memory, windows sharded over Ray actors) equals in-memory evaluation."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from asft_ray.eval.perplexity import perplexity
from asft_ray.eval.sparsity import model_sparsity, sparsity_from_safetensors
from asft_ray.eval.streamed import evaluate_streamed, streamed_perplexity


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.conftest import build_tiny_llama

    folder = tmp_path_factory.mktemp("eval-model")
    model = build_tiny_llama(num_hidden_layers=3, tie_word_embeddings=False)
    with torch.no_grad():  # some exact zeros, so the sparsity read from the shards is not trivially 0
        model.model.layers[1].mlp.down_proj.weight[:, ::2] = 0
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder


@pytest.fixture
def ids():
    return torch.randint(0, 512, (1, 5 * 64 + 7), generator=torch.Generator().manual_seed(3))


def test_streamed_in_process_equals_in_memory(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    expected = perplexity(model, ids, 64, show_progress=False)
    got = streamed_perplexity(model_dir, ids, 64, show_progress=False)
    assert got["windows"] == expected["windows"] == 5
    assert got["window_nll"] == pytest.approx(expected["window_nll"], rel=1e-5)
    assert got["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
    streamed, resident = sparsity_from_safetensors(model_dir), model_sparsity(model)
    assert streamed["total"] == pytest.approx(resident["total"]) and streamed["total"] > 0
    assert streamed["layers"] == pytest.approx(resident["layers"])


def test_streamed_on_two_ray_workers_equals_one_and_in_memory(local_ray, model_dir, ids):
    one = evaluate_streamed(model_dir, ids, 64, 5, workers=1, worker_resources=(1, 0), show_progress=False)
    two = evaluate_streamed(model_dir, ids, 64, 5, workers=2, worker_resources=(1, 0), show_progress=False)
    local = streamed_perplexity(model_dir, ids, 64, 5, show_progress=False)
    assert one["window_nll"] == two["window_nll"]  # the same chunks, computed alike, whoever computes them
    assert two["window_nll"] == pytest.approx(local["window_nll"], rel=1e-5)


def test_the_gpu_check_exits_at_once_with_one_line_without_a_gpu():
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run `make gpu-check` itself")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "gpu-check: no CUDA device is visible here; nothing was run"
