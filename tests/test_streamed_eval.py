"""Streamed evaluation (one decoder layer in memory, windows sharded over Ray actors) equals in-memory evaluation."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from asft_ray.eval.perplexity import perplexity
from asft_ray.eval.sparsity import model_sparsity
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
    assert "sparsity" not in got  # counted only when asked


def test_the_sparsity_is_counted_in_the_evaluations_own_pass_reading_each_tensor_once(monkeypatch, model_dir, ids):
    from collections import Counter

    from asft_ray.pruning.streaming import SafetensorsReader

    reads, real = Counter(), SafetensorsReader.get_many

    def counting(self, keys, mapped=False):
        reads.update(keys)
        return real(self, keys, mapped)

    monkeypatch.setattr(SafetensorsReader, "get_many", counting)
    got = streamed_perplexity(model_dir, ids, 64, show_progress=False, sparsity=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert reads.keys() == set(model.state_dict()) and set(reads.values()) == {1}  # every tensor, once
    streamed, resident = got["sparsity"], model_sparsity(model)
    assert streamed["total"] == resident["total"] > 0  # the same integer counts
    assert streamed["layers"] == resident["layers"] and streamed["lm_head"] == resident["lm_head"]
    assert got["window_nll"] == streamed_perplexity(model_dir, ids, 64, show_progress=False)["window_nll"]


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


# ---- activations bounded: passes over the layers ----

def test_passes_cover_every_row_once_within_the_budget_at_chunk_boundaries():
    from asft_ray.eval.streamed import passes
    from asft_ray.pruning.engine import CHUNK_SIZE

    groups = [torch.zeros(10, 8, dtype=torch.long), torch.zeros(3, 32, dtype=torch.long), torch.zeros(9, 4, dtype=torch.long)]
    hidden, budget = 16, 4 * 16 * 8 * 6  # room for 6 rows of the first group: 4 (a whole chunk) per pass
    plan = passes(groups, hidden, budget)
    seen = {g: [] for g in range(len(groups))}
    for pieces in plan:
        held = sum((b - a) * 4 * hidden * groups[g].shape[1] for g, a, b in pieces)
        assert held <= budget or len(pieces) == 1 and pieces[0][2] - pieces[0][1] <= CHUNK_SIZE
        for g, a, b in pieces:
            assert a % CHUNK_SIZE == 0 and b > a
            seen[g] += list(range(a, b))
    assert seen == {g: list(range(len(rows))) for g, rows in enumerate(groups)}
    assert len(plan) > 3
    assert passes(groups, hidden, 10**9) == [[(0, 0, 10), (1, 0, 3), (2, 0, 9)]]  # everything fits: one pass


def test_an_evaluation_over_the_activation_budget_takes_passes_with_the_same_results(monkeypatch, model_dir, ids, lm_dir,
                                                                                     data_dir):
    from transformers import AutoTokenizer

    from asft_ray.eval import streamed
    from asft_ray.eval.streamed_zeroshot import streamed_loglikelihoods

    one_pass = streamed_perplexity(model_dir, ids, 64, show_progress=False)
    tokenizer, requests = AutoTokenizer.from_pretrained(lm_dir), _requests(data_dir)
    one_pass_zeroshot = streamed_loglikelihoods(lm_dir, tokenizer, requests)
    held, real = [], streamed.stream_through_layers

    def spy(folder, groups, *args, **kwargs):
        held.append(sum(4 * 64 * rows.numel() for rows in groups))  # both tiny models: hidden 64
        return real(folder, groups, *args, **kwargs)

    monkeypatch.setattr(streamed, "stream_through_layers", spy)
    monkeypatch.setattr(streamed, "ACTIVATION_BUDGET_BYTES", 4 * 64 * 64 * 4)  # one chunk of 4 windows of 64
    got = streamed_perplexity(model_dir, ids, 64, show_progress=False)
    assert len(held) == 2 and max(held) <= streamed.ACTIVATION_BUDGET_BYTES  # 5 windows: 4 + 1
    assert got["window_nll"] == one_pass["window_nll"]  # bit for bit: the same chunks
    held.clear()
    assert streamed_loglikelihoods(lm_dir, tokenizer, requests) == one_pass_zeroshot
    assert len(held) > 1


# ---- zero-shot, streamed: the same log-likelihoods and accuracies as in memory ----

ZEROSHOT = ["arc_easy", "lambada"]  # multiple choice (acc, acc_norm) and greedy last word (acc, ppl)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tiny_model_dir):
    """A 3-layer untied tiny Llama in several shards, with the test tokenizer."""
    from transformers import AutoTokenizer

    from tests.conftest import build_tiny_llama

    folder = tmp_path_factory.mktemp("zeroshot-model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    build_tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=3, tie_word_embeddings=False).save_pretrained(
        folder, max_shard_size="200KB")
    tokenizer.save_pretrained(folder)
    return folder


def _requests(data_dir, limit=4):
    from asft_ray.eval.zeroshot import all_requests
    from asft_ray.eval.zeroshot_tasks import load_task

    return [r for name in ZEROSHOT for r in all_requests(load_task(name, data_dir, limit))]


def test_streamed_zeroshot_equals_in_memory(lm_dir, data_dir):
    from transformers import AutoTokenizer

    from asft_ray.eval.streamed_zeroshot import length_groups, streamed_evaluate_tasks, streamed_loglikelihoods
    from asft_ray.eval.zeroshot import evaluate_tasks, loglikelihoods, requests_by_input

    model, tokenizer = AutoModelForCausalLM.from_pretrained(lm_dir).eval(), AutoTokenizer.from_pretrained(lm_dir)
    requests = _requests(data_dir)
    inputs = list(requests_by_input(tokenizer, requests, 2048)[0])
    assert len(length_groups([len(tokens) for tokens, _ in inputs])) > 1  # rows padded to different widths
    expected, got = loglikelihoods(model, tokenizer, requests), streamed_loglikelihoods(lm_dir, tokenizer, requests)
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], rel=1e-5, abs=1e-5)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    whole = evaluate_tasks(model, tokenizer, ZEROSHOT, data_dir, limit=4)
    streamed = streamed_evaluate_tasks(lm_dir, tokenizer, ZEROSHOT, data_dir, limit=4)
    assert streamed["mean_acc"] == whole["mean_acc"] and streamed["streamed"]
    for name in ZEROSHOT:
        mine, theirs = streamed["tasks"][name], whole["tasks"][name]
        assert mine.keys() == theirs.keys() - {"seconds"}  # the tasks share one pass: its time is the whole's
        assert mine["task"] == name and mine["n"] == theirs["n"] == 4
        for metric in ("acc", "acc_norm"):  # means of right/wrong choices: equal, not close
            assert mine.get(metric) == theirs.get(metric), (name, metric)
        if "ppl" in theirs:
            assert mine["ppl"] == pytest.approx(theirs["ppl"], rel=1e-5)


def test_streamed_zeroshot_on_two_ray_actors_equals_in_process(local_ray, lm_dir, data_dir):
    import ray
    from transformers import AutoTokenizer

    from asft_ray.distributed.sharded import WorkerResources, sharded_runner_factory, start_workers
    from asft_ray.eval.streamed_zeroshot import streamed_loglikelihoods

    tokenizer, requests = AutoTokenizer.from_pretrained(lm_dir), _requests(data_dir)
    workers = start_workers(2, WorkerResources(cpus=0.5))
    try:
        sharded = streamed_loglikelihoods(lm_dir, tokenizer, requests, make_runner=sharded_runner_factory(workers))
    finally:
        for worker in workers:
            ray.kill(worker)
    local = streamed_loglikelihoods(lm_dir, tokenizer, requests)
    assert [ll for ll, _ in sharded] == pytest.approx([ll for ll, _ in local], rel=1e-6)
    assert [greedy for _, greedy in sharded] == [greedy for _, greedy in local]


# ---- the pipeline's evaluation of a model over eval.whole_model_max_gb ----

def test_a_model_over_the_threshold_is_evaluated_layer_by_layer_with_a_predicted_speed(
        lm_dir, data_dir, tmp_path, monkeypatch, streamed_live_bytes):
    """The same ppl, sparsity and zero-shot as loading it whole, `models.load_model` never called,
    at most one decoder layer (and the final norm) in memory whenever a layer is read, and the
    decode speed the calibrated cost model predicts, marked predicted."""
    import dataclasses
    import json

    from asft_ray import models
    from asft_ray.eval.cost_model import FEATURES, CostModel, DecoderShape
    from asft_ray.pipeline import EvalSpec, evaluate_model
    from tests.conftest import one_layer_bytes

    spec = EvalSpec(ppl_windows=2, ppl_seqlen=64, zeroshot=("arc_easy",), zeroshot_limit=4, speed_prompt=16,
                    speed_new_tokens=4, speed_repeats=1)
    whole = evaluate_model(str(lm_dir), spec, data_dir, "cpu")
    assert not streamed_live_bytes and "streamed" not in whole and not whole["speed"].get("predicted")
    cost_model = tmp_path / "cost_model.json"  # as a run folder holds it after its first calibration
    coefficients = {name: 0.0 for name in FEATURES} | {"token": 1e-3, "float_bytes": 1e-9}
    cost_model.write_text(json.dumps({"coefficients": coefficients}))

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded whole")

    monkeypatch.setattr(models, "load_model", refuse)
    streamed = evaluate_model(str(lm_dir), dataclasses.replace(spec, whole_model_max_gb=0.0), data_dir, "cpu",
                              cost_model=cost_model)
    assert streamed["streamed"] and streamed["ppl_windows"] == whole["ppl_windows"] == 2
    assert streamed["ppl"] == pytest.approx(whole["ppl"], rel=1e-5)
    assert streamed["sparsity_layers"] == pytest.approx(whole["sparsity_layers"])
    assert streamed["zeroshot"]["tasks"]["arc_easy"]["acc"] == whole["zeroshot"]["tasks"]["arc_easy"]["acc"]
    assert streamed["zeroshot"]["tasks"]["arc_easy"]["acc_norm"] == whole["zeroshot"]["tasks"]["arc_easy"]["acc_norm"]
    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    shape, context = DecoderShape.from_config(model.config), spec.speed_prompt + spec.speed_new_tokens // 2
    seconds = CostModel.from_dict(json.loads(cost_model.read_text())).predict(shape, context)
    assert streamed["speed"]["predicted"] and streamed["speed"]["decode_tok_s"] == pytest.approx(1 / seconds)
    assert streamed["speed"]["context"] == context and streamed["speed"]["cost_model"] == str(cost_model)
    assert len(streamed_live_bytes) == 2 * 3  # the ppl pass and the zero-shot pass each read the 3 layers once
    assert max(b for _, b in streamed_live_bytes) <= one_layer_bytes(model), streamed_live_bytes
