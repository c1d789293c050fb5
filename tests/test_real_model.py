"""Checks on the real SmolLM2-135M (slow: `make test-slow`). Quality numbers live in BENCHMARKS.md."""

import copy

import pytest

from asft_ray.config import Pattern
from asft_ray.data import c4_documents, sample_calibration, wikitext2_ids
from asft_ray.eval.perplexity import perplexity
from asft_ray.eval.sparsity import model_sparsity
from asft_ray.models import load_model
from asft_ray.pruning.engine import prune_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    return load_model("smollm2-135m", device="cpu")


def test_wikitext2_test_tokenizes_as_in_the_protocol(smollm2, data_dir):
    _, tokenizer = smollm2
    ids = wikitext2_ids(tokenizer, "test", data_dir)
    assert ids.shape == (1, 304_986)
    assert ids.numel() // 2048 == 148


def test_pruning_smollm2_orders_methods_as_the_papers_do(smollm2, data_dir):
    """At 50 %: dense < sparsegpt, wanda << magnitude in ppl (short windows, few samples: a smoke check)."""
    model, tokenizer = smollm2
    ids = wikitext2_ids(tokenizer, "test", data_dir)
    calib = sample_calibration(c4_documents(data_dir), tokenizer, nsamples=4, seqlen=512, seed=0)
    dense_state = copy.deepcopy(model.state_dict())
    ppl = {"dense": perplexity(model, ids, 512, max_windows=4, show_progress=False)["ppl"]}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model.load_state_dict(dense_state)
        prune_model(model, method, Pattern.parse("unstructured"), 0.5, calib, show_progress=False)
        assert model_sparsity(model)["total"] == pytest.approx(0.5, abs=1e-3)
        ppl[method] = perplexity(model, ids, 512, max_windows=4, show_progress=False)["ppl"]
    model.load_state_dict(dense_state)
    assert ppl["dense"] < ppl["wanda"] < ppl["magnitude"] / 3
    assert ppl["dense"] < ppl["sparsegpt"] < ppl["magnitude"] / 3
