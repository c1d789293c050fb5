"""Layer streaming gives the same pruned model as pruning it in memory."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from asft_ray.config import PruneConfig
from asft_ray.errors import AsftError
from asft_ray.prune import run_prune


@pytest.mark.parametrize("method,pattern,true_sequential,schedule",
                         [("wanda", "unstructured", False, "uniform"), ("sparsegpt", "2:4", False, "uniform"),
                          ("wanda", "2:4", True, "uniform"), ("sparsegpt", "unstructured", False, "owl")])
def test_streamed_equals_in_memory(sharded_model_dir, tmp_path, data_dir, method, pattern, true_sequential, schedule):
    def cfg(out, stream):
        return PruneConfig(model=str(sharded_model_dir), method=method, pattern=pattern, sparsity=0.5, nsamples=4,
                           seqlen=32, out=str(tmp_path / out), data_dir=data_dir, device="cpu", stream=stream,
                           true_sequential=true_sequential, schedule=schedule)

    resident = run_prune(cfg("resident", False), show_progress=False)
    streamed = run_prune(cfg("streamed", True), show_progress=False)
    assert streamed["schedule"] == resident["schedule"]  # owl: the same outlier ratios, read layer by layer
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
    assert (sharded_model_dir / "generation_config.json").is_file()  # the source has one: both outputs keep it
    assert a.generation_config.to_dict() == b.generation_config.to_dict()
    assert (tmp_path / "streamed" / "generation_config.json").is_file()


def test_streaming_refuses_what_it_cannot_stream(tmp_path):
    cfg = PruneConfig(model="smollm2-135m", method="wanda", sparsity=0.5, out=str(tmp_path / "o"), stream=True)
    with pytest.raises(AsftError, match="needs a local model directory with safetensors"):
        run_prune(cfg, show_progress=False)


def test_the_shard_reader_returns_exactly_what_safetensors_wrote(tmp_path):
    from safetensors.torch import save_file

    from asft_ray.pruning.streaming import SafetensorsReader

    tensors = {"w": torch.randn(3, 5), "h": torch.randn(7).to(torch.bfloat16), "i": torch.arange(4),
               "empty": torch.empty(0), "scalar": torch.tensor(3.0), "mask": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "model.safetensors")
    file_bytes = (tmp_path / "model.safetensors").read_bytes()
    for mapped in (False, True):
        read = SafetensorsReader(tmp_path).get_many(list(tensors), mapped=mapped)
        for key, value in tensors.items():
            assert read[key].dtype == value.dtype and torch.equal(read[key], value), (key, mapped)
        read["w"].mul_(0)  # a mapped tensor is copy-on-write: the file never changes
        read["h"][0] = 5
    assert (tmp_path / "model.safetensors").read_bytes() == file_bytes
    assert torch.equal(SafetensorsReader(tmp_path).get_many(["w"], mapped=True)["w"], tensors["w"])


def _linear_masks(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    return model, {k: v == 0 for k, v in model.state_dict().items() if k.endswith("proj.weight")}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_bf16_in_bf16_out_with_the_masks_of_the_float32_run(sharded_model_dir, tmp_path, data_dir, method):
    """A bf16 checkpoint is streamed, computed in float32 layer by layer and written back in bf16,
    the same size as it came; its masks equal those of the same weights pruned as float32. (SparseGPT
    sums and factors a bf16 linear's Hessian in float32, a float32 one's in float64: stats.hessian_dtype.)"""
    bf16_dir, fp32_dir = tmp_path / "bf16", tmp_path / "fp32"
    source = AutoModelForCausalLM.from_pretrained(sharded_model_dir)
    source.to(torch.bfloat16).save_pretrained(bf16_dir, max_shard_size="100KB")
    source.to(torch.bfloat16).float().save_pretrained(fp32_dir)  # the same values, as float32
    for folder in (bf16_dir, fp32_dir):
        (folder / "tokenizer.json").write_bytes((sharded_model_dir / "tokenizer.json").read_bytes())
        (folder / "tokenizer_config.json").write_bytes((sharded_model_dir / "tokenizer_config.json").read_bytes())

    def prune(model, out):
        cfg = PruneConfig(model=str(model), method=method, sparsity=0.5, nsamples=4, seqlen=32, out=str(tmp_path / out),
                          data_dir=data_dir, device="cpu")
        assert cfg.streams()  # a safetensors directory streams by default
        return run_prune(cfg, show_progress=False)

    prune(bf16_dir, "out-bf16")
    prune(fp32_dir, "out-fp32")
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert abs(size(tmp_path / "out-bf16") - size(bf16_dir)) <= 0.01 * size(bf16_dir)
    pruned16, masks16 = _linear_masks(tmp_path / "out-bf16")
    pruned32, masks32 = _linear_masks(tmp_path / "out-fp32")
    assert all(p.dtype == torch.bfloat16 for p in pruned16.parameters())
    for key in masks32:
        if method != "sparsegpt" or ".layers.0." in key:
            assert torch.equal(masks16[key], masks32[key]), key
        else:  # the next layers see inputs through bf16-rounded updated weights: near-ties may flip
            agree = (masks16[key] == masks32[key]).float().mean()
            assert agree > 0.99, (key, float(agree))
        if method == "sparsegpt" and ".layers.0." in key:  # updated weights: the float32 run's, rounded to bf16,
            w16, w32 = pruned16.state_dict()[key].float(), pruned32.state_dict()[key].to(torch.bfloat16).float()
            kept = (w16 != 0) & (w32 != 0)  # float32 against float64 factors: a few rounded apart
            moved = (w16 - w32).abs()[kept]  # measured: at most 0.1 % differ, by at most 0.3 % of the largest weight
            assert float((moved > 0).float().mean()) < 0.01, key
            assert float(moved.max()) <= 2**-7 * float(w32.abs().max()), key


@pytest.mark.parametrize("method", ["sparsegpt", "fisher"])
def test_no_more_than_one_decoder_layer_is_ever_materialised(sharded_model_dir, tmp_path, data_dir, streamed_live_bytes,
                                                            method):
    """Bytes of the model's non-meta parameters, checked whenever a layer is loaded or released:
    at most one decoder layer plus the small parts outside the layers (norm; embeddings only
    until layer 0's inputs are captured)."""
    from tests.conftest import one_layer_bytes

    cfg = PruneConfig(model=str(sharded_model_dir), method=method, sparsity=0.5, nsamples=4, seqlen=32,
                      out=str(tmp_path / "o"), data_dir=data_dir, device="cpu")
    run_prune(cfg, show_progress=False)
    full = AutoModelForCausalLM.from_pretrained(sharded_model_dir)
    bound = one_layer_bytes(full)
    assert len(streamed_live_bytes) >= 2 * full.config.num_hidden_layers
    if method == "fisher":  # the loss needs the final norm and lm_head (untied) or the embeddings (tied)
        bound += full.lm_head.weight.numel() * 4 + full.model.embed_tokens.weight.numel() * 4
    assert max(b for _, b in streamed_live_bytes) <= bound, (streamed_live_bytes, bound)


@pytest.mark.parametrize("method", ["taylor", "fisher"])
def test_layer_streamed_backward_gives_the_in_memory_gradient_masks(sharded_model_dir, tmp_path, data_dir, method):
    """Taylor/Fisher from a backward that holds one decoder layer at a time: the gradients of a
    whole-model backward (float tolerance), hence the same masks but for near-ties."""
    def cfg(out, stream):
        return PruneConfig(model=str(sharded_model_dir), method=method, sparsity=0.5, nsamples=4, seqlen=32,
                           out=str(tmp_path / out), data_dir=data_dir, device="cpu", stream=stream)

    run_prune(cfg("resident", False), show_progress=False)
    streamed = run_prune(cfg("streamed", True), show_progress=False)
    assert streamed["streamed"] and streamed["sparsity"]["total"] == pytest.approx(0.5)
    _, resident_masks = _linear_masks(tmp_path / "resident")
    _, streamed_masks = _linear_masks(tmp_path / "streamed")
    for key, mask in resident_masks.items():
        agree = (mask == streamed_masks[key]).float().mean()
        assert agree > 0.995, (key, float(agree))


def test_layer_gradients_equal_whole_model_gradients(tiny_model, calib_ids):
    """The per-layer sums of the streamed backward against engine.gradient_sums (same samples)."""
    from asft_ray.eval.streamed import FinalHead
    from asft_ray.models import decoder_layers, prunable_linears
    from asft_ray.pruning.engine import capture_layer0_inputs, gradient_sums
    from asft_ray.pruning.layer_gradients import _layer_output, layer_backward, loss_gradients

    whole = gradient_sums(tiny_model, calib_ids, show_progress=False)
    inputs, args, kwargs = capture_layer0_inputs(tiny_model, calib_ids)
    kept = []
    with torch.no_grad():
        for layer in decoder_layers(tiny_model):
            kept.append(inputs)
            inputs = [_layer_output(layer, x, args, kwargs) for x in inputs]
    grads = loss_gradients(FinalHead(tiny_model.model.norm, tiny_model.lm_head), inputs, calib_ids)
    for index in reversed(range(len(kept))):
        layer = decoder_layers(tiny_model)[index]
        for squared in (False, True):
            sums, in_grads = layer_backward(layer, kept[index], grads, args, kwargs, squared)
            for name in prunable_linears(layer):
                assert torch.allclose(sums[name], whole[(index, name)][int(squared)], rtol=1e-4, atol=1e-9), (index, name)
        grads = in_grads
