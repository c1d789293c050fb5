"""ZeRO-3 recovery without whole models: partition reads, partition masks, sharded teacher, sharded export.

Pure pieces run here; the distributed facts come from tests/zero3_worker_check.py run by
torchrun with 2 gloo processes (no Ray), the Ray Train runs are in test_recovery.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from asft_ray.recovery.shards import Checkpoint, ShardWriter, plan_shards, shard_file_names
from asft_ray.recovery.zero3 import partition_range
from tests.conftest import REPO


def test_partition_ranges_tile_the_weight_and_the_last_is_clipped():
    numel, world = 10, 3
    n = -(-numel // world)  # DeepSpeed's partition_numel: ceil
    ranges = [partition_range(r, n, numel) for r in range(world)]
    assert ranges == [(0, 4), (4, 8), (8, 10)]
    assert partition_range(3, n, numel) == (10, 10)  # a rank past the end holds only padding


def test_read_flat_reads_only_the_rows_it_needs(tmp_path):
    w = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    v = torch.arange(7, dtype=torch.bfloat16)
    save_file({"w": w, "v": v}, tmp_path / "model.safetensors")
    ck = Checkpoint.from_folder(tmp_path)
    for start, stop in [(0, 60), (13, 27), (20, 30), (59, 60), (55, 99), (60, 70)]:
        assert torch.equal(ck.read_flat("w", start, stop), w.reshape(-1)[start:stop]), (start, stop)
    assert torch.equal(ck.read_flat("v", 2, 5), v[2:5]) and ck.dtype("v") == torch.bfloat16
    ck = Checkpoint.from_folder(tmp_path)
    ck.read_flat("w", 13, 27)  # rows 1 and 2 only
    assert ck.bytes_read == 2 * 10 * 4 and ck.largest_read == 20


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def test_closing_a_checkpoint_unmaps_the_pages_it_read(tmp_path):
    """safetensors reads through a memory map: what was read stays in RSS until the file is closed."""
    w = torch.arange(16 * 2**20, dtype=torch.float32)  # 64 MiB
    save_file({"w": w}, tmp_path / "model.safetensors")
    ck = Checkpoint.from_folder(tmp_path)
    before = _rss_file_bytes()
    assert torch.equal(ck.read("w"), w)
    mapped = _rss_file_bytes()
    ck.close()
    after = _rss_file_bytes()
    assert mapped - before > 48 * 2**20 and mapped - after > 48 * 2**20, (before, mapped, after)
    assert torch.equal(ck.read_flat("w", 5, 9), w[5:9])  # reading again reopens


def test_shards_are_cut_by_bytes_and_named_like_transformers():
    assert plan_shards([("a", 5), ("b", 5), ("c", 20), ("d", 1)], 10) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards([("a", 5)], 10) == [["a"]]
    assert shard_file_names(1) == ["model.safetensors"]
    assert shard_file_names(2) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_shard_writer_output_reloads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tiny_llama

    model = build_tiny_llama()
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    shards = plan_shards([(n, t.numel() * 4) for n, t in state.items()], 40_000)
    assert len(shards) > 3
    writer = ShardWriter(tmp_path, shards)
    for name, tensor in state.items():
        writer.add(name, tensor)
    writer.finish()
    model.config.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state) and not (tmp_path / "model.safetensors").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(p, state[n]) for n, p in again.named_parameters())


def test_input_check_reads_masks_without_loading_the_model(monkeypatch, tmp_path, tiny_model_dir):
    """check_student (in the driver's input task) reads one tensor at a time: load_model is never
    called, and the largest read is one decoder linear (compare: the whole model's parameters)."""
    from asft_ray.recovery import inputs
    from asft_ray.recovery.config import RecoverConfig
    from tests.test_recovery import magnitude_prune

    from transformers import AutoModelForCausalLM, AutoTokenizer

    pruned = tmp_path / "pruned"
    model = magnitude_prune(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    model.save_pretrained(pruned)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(pruned)
    monkeypatch.setattr(inputs, "load_model", lambda *a, **k: pytest.fail("the input check loaded the whole model"))
    reads = []
    real_read = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, name: reads.append(name) or real_read(self, name))
    _, info = inputs.check_student(RecoverConfig(model=str(pruned), out="o"))
    assert info["masked_params"] == 14 and 0.45 < info["sparsity"] < 0.55
    assert len(reads) == 14 and all(".layers." in n for n in reads)  # only the decoder linears, one by one
    masks = {"model.layers.0.mlp.up_proj.weight": torch.rand(128, 64) > 0.25}
    save_file(masks, tmp_path / "m.safetensors")
    _, info = inputs.check_student(RecoverConfig(model=str(pruned), out="o", mask_file=str(tmp_path / "m.safetensors")))
    assert info["masked_params"] == 1 and info["sparsity"] == pytest.approx(1 - masks["model.layers.0.mlp.up_proj.weight"].float().mean().item())


@pytest.fixture(scope="module", params=["tied", "untied"])
def zero3_facts(tiny_model_dir, tmp_path_factory, request):
    """Run tests/zero3_worker_check.py on 2 gloo processes; its facts, one dict per rank. Untied,
    with a 16384-word vocabulary: the embedding and the head (16384 x 64) are just over ZeRO-3's
    unit (1e6 elements), so each is loaded, run and exported as 2 vocabulary parts
    (recovery/vocab_parts.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asft_ray.models import save_model
    from tests.conftest import build_tiny_llama, build_tokenizer
    from tests.test_recovery import magnitude_prune

    folder = tmp_path_factory.mktemp("zero3")
    dense = tiny_model_dir
    if request.param == "untied":
        dense = folder / "dense"
        tokenizer = build_tokenizer()
        build_tiny_llama(vocab_size=16384, tie_word_embeddings=False).save_pretrained(dense)
        tokenizer.save_pretrained(dense)
    pruned = folder / "pruned"
    save_model(magnitude_prune(AutoModelForCausalLM.from_pretrained(dense)),
               AutoTokenizer.from_pretrained(dense), pruned)
    g = torch.Generator().manual_seed(3)
    save_file({"model.layers.1.mlp.down_proj.weight": torch.rand(64, 128, generator=g) > 0.5,
               "model.layers.0.self_attn.k_proj.weight": torch.rand(32, 64, generator=g) > 0.5}, folder / "masks.safetensors")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(REPO / "tests" / "zero3_worker_check.py"), str(pruned), str(dense),
           str(folder / "masks.safetensors"), str(folder)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads((folder / "facts.json").read_text())
    assert facts[0]["vocab_parts"] == (0 if request.param == "tied" else 4)  # 2 row blocks of each table
    return facts, pruned, folder


def test_zero3_workers_load_only_their_partitions(zero3_facts):
    facts, _, _ = zero3_facts
    whole = facts[0]["model_param_bytes"]
    largest_weight = facts[0]["largest_weight_numel"]  # the embedding, elements
    for f in facts:
        assert f["full_param_bytes_after_build"] == 0 and f["full_param_bytes_after_load"] == 0, f
        assert f["read_bytes"] <= 0.55 * whole, (f["read_bytes"], whole)  # about half, plus the odd boundary row
        assert f["largest_read"] < largest_weight, f  # never one whole big weight
        if f["vocab_parts"]:  # nothing ZeRO-3 gathers is larger than its unit (1e6 elements)
            assert f["largest_param_numel"] == largest_weight // 2 <= 10**6 < largest_weight, f
        assert f["mask_shapes_are_partitions"]
        assert f["mask_bytes"] <= 0.55 * sum(  # one bit per element of this worker's half
            n for n in [64 * 64, 32 * 64, 32 * 64, 64 * 64, 128 * 64, 128 * 64, 64 * 128]) * 2 / 8
    assert sum(f["read_bytes"] for f in facts) >= whole


def test_partition_masks_are_the_slices_of_the_whole_masks(zero3_facts):
    facts, _, _ = zero3_facts
    assert facts[0]["mask_mismatches"] == []
    assert facts[0]["file_masks"] == ["model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"]


def test_sharded_teacher_gives_the_full_teacher_distillation_loss(zero3_facts):
    facts, _, _ = zero3_facts
    assert facts[0]["student_logits_max_diff"] == 0.0
    assert facts[0]["kd_full"] > 1e-4
    assert facts[0]["kd_sharded"] == pytest.approx(facts[0]["kd_full"], rel=1e-5)


def test_sharded_export_reloads_with_identical_weights(zero3_facts):
    from transformers import AutoModelForCausalLM

    _, pruned, folder = zero3_facts
    export = folder / "export"
    assert len(list(export.glob("model-*-of-*.safetensors"))) > 3 and (export / "model.safetensors.index.json").is_file()
    assert (export / "tokenizer.json").is_file()
    source = load_file(pruned / "model.safetensors")
    again = AutoModelForCausalLM.from_pretrained(export)
    params = dict(again.named_parameters())
    assert set(source) == set(params) and all(torch.equal(params[n], source[n]) for n in source)


def test_gpu_check_exits_2_with_a_clear_message_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the check would run")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check_recovery.py")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "no CUDA device" in done.stderr and done.stdout == ""
