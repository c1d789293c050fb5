"""A killed layer-wise run resumes after its last finished layer and ends bit-identical."""

import pytest
import torch
from safetensors.torch import load_file

from asft_ray.config import PruneConfig
from asft_ray.prune import partial_dir, run_prune
from asft_ray.pruning.engine import LocalRunner


class Killed(Exception):
    pass


def runner_killed_at_layer(k: int):
    class KilledRunner(LocalRunner):
        calls = 0

        def advance(self, layer):
            KilledRunner.calls += 1
            if KilledRunner.calls == k + 1:
                raise Killed(f"killed while finishing layer {k}")
            super().advance(layer)

    return KilledRunner


@pytest.fixture(scope="module")
def four_layer_model_dir(tmp_path_factory):
    from tests.conftest import build_tiny_llama, build_tokenizer

    folder = tmp_path_factory.mktemp("four-layers")
    tokenizer = build_tokenizer()
    build_tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def saved_tensors(folder):
    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streamed"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "sparsegpt 2:4 permuted", "wanda reconstructed"])
def test_resumed_run_equals_an_uninterrupted_one(four_layer_model_dir, tmp_path, data_dir, method, stream):
    method, *variant = method.split(" ")
    kill_at = 2  # the runner's advance calls: killed while finishing layer 2
    if variant == ["2:4", "permuted"]:  # finished layers are saved permuted: the resumed run must not permute them again
        variant = {"pattern": "2:4", "channel_permutation": True}
    elif variant == ["reconstructed"]:  # the dense targets' runner is rebuilt through the dense layers
        variant = {"reconstruct_epochs": 2, "reconstruct_lr": 1e-3}
        kill_at = 5  # two runners advance each layer: the dense targets' and the pruned model's

    def cfg(out, **kw):
        return PruneConfig(model=str(four_layer_model_dir), method=method, sparsity=0.5, nsamples=4, seqlen=32,
                           out=str(out), data_dir=data_dir, device="cpu", stream=stream, **(variant or {}), **kw)

    run_prune(cfg(tmp_path / "straight"), show_progress=False)

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        run_prune(cfg(out), show_progress=False, make_runner=runner_killed_at_layer(kill_at))
    assert not out.exists()  # nothing half-written
    assert sorted(p.name for p in partial_dir(out).iterdir()) == [
        "layer-0000.safetensors", "layer-0001.safetensors", "state.json"]

    record = run_prune(cfg(out, resume=True), show_progress=False)
    assert record["resumed_layers"] == 2
    assert not partial_dir(out).exists()
    a, b = saved_tensors(tmp_path / "straight"), saved_tensors(out)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_without_resume_a_stale_checkpoint_is_discarded(four_layer_model_dir, tmp_path, data_dir):
    cfg = PruneConfig(model=str(four_layer_model_dir), method="wanda", sparsity=0.5, nsamples=2, seqlen=32,
                      out=str(tmp_path / "o"), data_dir=data_dir, device="cpu")
    with pytest.raises(Killed):
        run_prune(cfg, show_progress=False, make_runner=runner_killed_at_layer(1))
    assert run_prune(cfg, show_progress=False)["resumed_layers"] == 0
