"""Layer streaming gives the same pruned model as pruning it in memory."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from asft_ray.config import PruneConfig
from asft_ray.errors import AsftError
from asft_ray.prune import run_prune


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def sharded_model_dir(tmp_path_factory, request):
    """Tied: lm_head is the embedding. Untied: streaming leaves lm_head on meta and copies it at the end."""
    from tests.conftest import build_tiny_llama, build_tokenizer

    folder = tmp_path_factory.mktemp("sharded")
    tokenizer = build_tokenizer()
    model = build_tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=3, tie_word_embeddings=request.param)
    model.save_pretrained(folder, max_shard_size="200KB")  # several shards, layers split across them
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.mark.parametrize("method,pattern,true_sequential",
                         [("wanda", "unstructured", False), ("sparsegpt", "2:4", False), ("wanda", "2:4", True)])
def test_streamed_equals_in_memory(sharded_model_dir, tmp_path, data_dir, method, pattern, true_sequential):
    def cfg(out, stream):
        return PruneConfig(model=str(sharded_model_dir), method=method, pattern=pattern, sparsity=0.5, nsamples=4,
                           seqlen=32, out=str(tmp_path / out), data_dir=data_dir, device="cpu", stream=stream,
                           true_sequential=true_sequential)

    resident = run_prune(cfg("resident", False), show_progress=False)
    streamed = run_prune(cfg("streamed", True), show_progress=False)
    assert streamed["sparsity"]["total"] == pytest.approx(resident["sparsity"]["total"])
    assert streamed["sparsity"]["layers"] == resident["sparsity"]["layers"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "resident").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


def test_streaming_refuses_what_it_cannot_stream(tmp_path):
    with pytest.raises(AsftError, match="works with wanda and sparsegpt"):
        PruneConfig(model="x", method="magnitude", sparsity=0.5, out=str(tmp_path), stream=True)
    cfg = PruneConfig(model="smollm2-135m", method="wanda", sparsity=0.5, out=str(tmp_path / "o"), stream=True)
    with pytest.raises(AsftError, match="needs a local model directory with safetensors"):
        run_prune(cfg, show_progress=False)


def test_the_shard_reader_returns_exactly_what_safetensors_wrote(tmp_path):
    from safetensors.torch import save_file

    from asft_ray.pruning.streaming import SafetensorsReader

    tensors = {"w": torch.randn(3, 5), "h": torch.randn(7).to(torch.bfloat16), "i": torch.arange(4),
               "empty": torch.empty(0), "scalar": torch.tensor(3.0), "mask": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "model.safetensors")
    read = SafetensorsReader(tmp_path).get_many(list(tensors))
    for key, value in tensors.items():
        assert read[key].dtype == value.dtype and torch.equal(read[key], value), key
