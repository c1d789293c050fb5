"""Sharded scoring on Ray actors gives the same masks whatever the number of workers."""

import copy

import numpy as np
import pytest
import ray
import torch

from asft_ray.config import Pattern
from asft_ray.distributed.sharded import WorkerResources, sharded_runner_factory, start_workers
from asft_ray.errors import AsftError
from asft_ray.models import decoder_layers, prunable_linears
from asft_ray.pruning.engine import prune_model
from tests.conftest import build_tiny_llama
from tests.workers import same_with_worker_counts


def pruned_weights(model, method, calib_ids, workers=None, pattern="unstructured", true_sequential=False,
                   reconstruction=None):
    model = copy.deepcopy(model)
    kwargs = {"make_runner": sharded_runner_factory(workers)} if workers else {}
    prune_model(model, method, Pattern.parse(pattern), 0.5, calib_ids, show_progress=False,
                true_sequential=true_sequential, reconstruction=reconstruction, **kwargs)
    return {
        f"{i}.{name}": lin.weight.detach().clone()
        for i, layer in enumerate(decoder_layers(model))
        for name, lin in prunable_linears(layer).items()
    }


@pytest.fixture
def calib8():
    return torch.randint(0, 512, (8, 48), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method,true_sequential", [("wanda", False), ("sparsegpt", False), ("wanda", True)])
def test_one_and_two_workers_give_identical_weights(scoring_pool, tiny_model, calib8, method, true_sequential):
    # the same bits: masks and the SparseGPT-updated values
    w1 = same_with_worker_counts(scoring_pool, lambda workers: pruned_weights(
        tiny_model, method, calib8, workers, true_sequential=true_sequential))[1]
    local = pruned_weights(tiny_model, method, calib8, true_sequential=true_sequential)
    for key in w1:  # in-process run: same masks (thread counts may move the last float bits)
        agree = (local[key] == 0) == (w1[key] == 0)
        assert agree.float().mean() > 0.999, key


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_bf16_model_prunes_on_the_workers_as_in_process(scoring_pool, tiny_model, calib8, method):
    """A bf16 layer travels as the bits of its values and is computed in float32 on the workers,
    as in process; the pruned weights stay bf16, the same for 1 and 2 workers."""
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    sharded = same_with_worker_counts(scoring_pool, lambda workers: pruned_weights(model, method, calib8, workers))[1]
    local = pruned_weights(model, method, calib8)
    for key in sharded:
        assert sharded[key].dtype == torch.bfloat16, key
        agree = (local[key] == 0) == (sharded[key] == 0)
        assert agree.float().mean() > 0.999, key


def test_more_workers_than_the_cluster_can_place_fails_with_the_missing_resource(local_ray):
    with pytest.raises(AsftError, match=r"3 scoring workers can never be placed: they ask 2 CPU each "
                                         r"\(the largest node has 2, the cluster 2\)"):
        start_workers(3, WorkerResources(cpus=2), timeout_s=600)  # fails at once, not after the timeout


def test_a_placed_worker_imports_the_layer_modules_before_its_first_layer(local_ray):
    import sys

    from asft_ray.distributed.sharded import WARM_IMPORTS

    (worker,) = start_workers(1, WorkerResources(cpus=1))
    try:  # the actor's calls run in order: this one runs after the warm-up start_workers queued
        imported = ray.get(worker.__ray_call__.remote(lambda self: [m in sys.modules for m in WARM_IMPORTS]))
        assert imported == [True] * len(WARM_IMPORTS)
    finally:
        ray.kill(worker)


def test_a_worker_killed_mid_layer_is_restarted_and_the_result_is_unchanged(scoring_pool, tiny_model, calib8):
    import os
    import signal

    from asft_ray.distributed.sharded import ShardedRunner

    class KillingRunner(ShardedRunner):
        """Submits layer 1's statistics tasks, then kills worker 0 by pid before collecting them."""

        layers_seen = 0

        def collect(self, layer, hessian, only=None):
            KillingRunner.layers_seen += 1
            stats = super().collect(layer, hessian, only)  # the Hessians' reductions are submitted, not done
            if KillingRunner.layers_seen == 2:
                os.kill(ray.get(self.workers[0].ready.remote()), signal.SIGKILL)
            return stats

    workers = scoring_pool.take(2)
    pid_before = ray.get(workers[0].ready.remote())
    reference = pruned_weights(tiny_model, "sparsegpt", calib8, workers)
    model = copy.deepcopy(tiny_model)
    prune_model(model, "sparsegpt", Pattern.parse("unstructured"), 0.5, calib8, show_progress=False,
                make_runner=lambda *a: KillingRunner(workers, *a))
    assert ray.get(workers[0].ready.remote()) != pid_before  # it really died and came back
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in prunable_linears(layer).items():
            assert torch.equal(lin.weight, reference[f"{i}.{name}"]), (i, name)


@pytest.mark.parametrize("method", ["taylor", "fisher"])
def test_gradient_methods_shard_with_identical_results(scoring_pool, tiny_model, calib8, method):
    from asft_ray.distributed.sharded import sharded_gradient_sums

    def run(workers=None):
        model = copy.deepcopy(tiny_model)
        kwargs = {"sum_gradients": sharded_gradient_sums(workers)} if workers else {}
        prune_model(model, method, Pattern.parse("unstructured"), 0.5, calib8, show_progress=False, **kwargs)
        return {k: v.clone() for k, v in model.state_dict().items()}

    one, local = same_with_worker_counts(scoring_pool, run)[1], run()
    for key in one:
        agree = (one[key] == 0) == (local[key] == 0)
        assert agree.float().mean() > 0.999, key


def test_sparsegpt_with_1_2_and_4_workers_is_bit_identical_and_the_reduction_stays_bounded(scoring_pool, tiny_model):
    """Hessians reduced on owner actors in chunk order and solved there (weight-parallel): the
    same bits for any number of workers; with max_pending=1 at most one chunk's partials wait."""
    from asft_ray.distributed.sharded import ShardedRunner

    calib = torch.randint(0, 512, (16, 32), generator=torch.Generator().manual_seed(2))  # 4 chunks
    runners = []

    def run(workers, true_sequential=False):
        def make(*a):
            runners.append(ShardedRunner(workers, *a, max_pending=1))
            return runners[-1]

        model = copy.deepcopy(tiny_model)
        prune_model(model, "sparsegpt", Pattern.parse("2:4"), 0.5, calib, show_progress=False,
                    make_runner=make, true_sequential=true_sequential)
        return {k: v.clone() for k, v in model.state_dict().items()}

    one = same_with_worker_counts(scoring_pool, run, counts=(1, 4))[1]
    two_sequential = run(scoring_pool.take(2), true_sequential=True)
    assert runners and all(r.peak_pending <= 1 for r in runners)
    serial = copy.deepcopy(tiny_model)
    prune_model(serial, "sparsegpt", Pattern.parse("2:4"), 0.5, calib, show_progress=False, true_sequential=True)
    changed = 0
    for key, value in serial.state_dict().items():  # true-sequential with 2 workers vs in-process (same thread count)
        assert torch.allclose(two_sequential[key], value, atol=1e-5), key
        changed += not torch.equal(one[key], two_sequential[key])
    assert changed  # true-sequential did change something (the comparison above is not vacuous)


def test_owners_balance_the_solve_cost():
    from asft_ray.distributed.sharded import assign_owners

    costs = {"q": 3.0, "o": 1.0, "gate": 2.0, "down": 4.0}
    assert assign_owners(costs, 2) == {"down": 0, "q": 1, "gate": 1, "o": 0}
    assert assign_owners(costs, 1) == {s: 0 for s in costs}
    assert set(assign_owners(costs, 8).values()) == {0, 1, 2, 3}


def test_everything_a_worker_gets_moves_to_its_device():
    from asft_ray.distributed.sharded import to_device

    cos, sin, mask = torch.ones(2), torch.zeros(2), torch.ones(1, 1, 2, 2)
    moved = to_device(((cos, sin), {"attention_mask": mask, "position_ids": None, "flag": True}), "meta")
    (c, s), kwargs = moved
    assert c.is_meta and s.is_meta and kwargs["attention_mask"].is_meta
    assert kwargs["position_ids"] is None and kwargs["flag"] is True


def _objects_this_process_tracks() -> int:
    """Entries in this process's Ray reference table: objects it owns or borrows, including the
    ones kept only as lineage (no live ObjectRef) to rebuild a retriable task's outputs."""
    return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())


def test_the_coordinator_stays_at_most_one_layer_ahead_of_the_workers(scoring_pool):
    """advance() returns once the previous layer is computed: however fast the caller reads layers,
    at most two layers are ever submitted and not yet computed, the layers already computed leave
    the object store (it never holds the model: a retried forward would have kept every layer there
    for lineage, spilled to disk), and the outputs are those of the in-process runner."""
    from asft_ray.distributed.sharded import ShardedRunner
    from asft_ray.models import decoder_layers
    from asft_ray.pruning.engine import LocalRunner, capture_layer0_inputs
    from tests.conftest import build_tiny_llama

    model = build_tiny_llama(num_hidden_layers=8)
    ids = torch.randint(0, 512, (16, 256), generator=torch.Generator().manual_seed(4))  # enough work per layer
    runner = ShardedRunner(scoring_pool.take(1), *capture_layer0_inputs(model, ids))
    local = LocalRunner(*capture_layer0_inputs(model, ids))
    objects = []
    for layer in decoder_layers(model):
        runner.advance(layer)
        local.advance(layer)
        objects.append(_objects_this_process_tracks())
    outputs = runner.outputs()
    assert 1 <= runner.peak_layers_ahead <= 2
    assert max(objects[2:]) <= objects[1] + 2, objects  # flat (kept for lineage: 5 more per layer)
    assert all(torch.equal(a, b) for a, b in zip(outputs, local.outputs()))


def test_sharded_solves_hold_no_dense_weight_and_return_one_pruned_weight_at_a_time(scoring_pool, tiny_model, calib8):
    """Every solve is submitted (its weight copied into the object store) before the first result
    is fetched; the runner keeps no dense weight, and yields the pruned ones one by one."""
    import gc
    import weakref

    from asft_ray.distributed.sharded import ShardedRunner
    from asft_ray.pruning.engine import LinearJob, capture_layer0_inputs

    layer = decoder_layers(tiny_model)[0]
    runner = ShardedRunner(scoring_pool.take(2), *capture_layer0_inputs(tiny_model, calib8))
    stats = runner.collect(layer, hessian=True)
    dense, names = [], list(prunable_linears(layer))

    def jobs():
        for name in names:
            weight = prunable_linears(layer)[name].weight.detach().clone()  # held only by its job
            dense.append(weakref.ref(weight))
            yield LinearJob(name, weight, 0.5)

    results = runner.prune("sparsegpt", Pattern.parse("unstructured"), jobs(), stats)
    first_name, first = next(results)
    gc.collect()
    assert len(dense) == len(names) and all(ref() is None for ref in dense)
    rest = dict(results)
    assert [first_name, *rest] == names
    assert all(int((w == 0).sum()) == w.numel() // 2 for w in [first, *rest.values()])
    assert runner.weights_sent == len(names)  # not the collected layer's weights: each copied to the store


def test_the_owner_of_a_llama_mlp_output_input_solves_nothing_else():
    """On the 1.57 B benchmark's layer shape (hidden 2048, MLP 5632), down_proj's solve (its 5632-wide
    factor and update) costs more than all the other linears together: with 2 workers its owner gets
    nothing else; counting only rows x cols^2 gave it o_proj as well."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from asft_ray.distributed.sharded import assign_owners, solve_cost
    from asft_ray.pruning.stats import InputStats

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16)
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, layer_idx=0)
    sources = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
               "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
               "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj"}
    stats = InputStats(source=sources)
    costs = {s: solve_cost(layer, stats, s) for s in dict.fromkeys(sources.values())}
    owners = assign_owners(costs, 2)
    assert [s for s, k in owners.items() if k == owners["mlp.down_proj"]] == ["mlp.down_proj"]
    assert costs["mlp.down_proj"] > sum(costs.values()) / 2


@pytest.mark.parametrize("seqlen", [32, 8])  # 8 tokens: an owner sums 2 chunks' inputs per call
def test_owners_summing_shipped_inputs_give_the_bits_of_shipped_hessians(scoring_pool, tiny_model, seqlen):
    """Workers may send an input's chunk inputs instead of its Hessian partials; the owner then
    computes the partials itself (stats.hessian_of): the same pruned weights, bit for bit, and the
    reduction stays bounded (at most max_pending chunks not yet added)."""
    from asft_ray.distributed.sharded import ShardedRunner

    calib = torch.randint(0, 512, (16, seqlen), generator=torch.Generator().manual_seed(3))  # 4 chunks
    workers = scoring_pool.take(2)

    def run(ship_inputs):
        runners = []

        def make(*a):
            runners.append(ShardedRunner(workers, *a, max_pending=2, ship_inputs=ship_inputs))
            return runners[-1]

        model = copy.deepcopy(tiny_model)
        prune_model(model, "sparsegpt", Pattern.parse("unstructured"), 0.5, calib, show_progress=False, make_runner=make)
        return {k: v.clone() for k, v in model.state_dict().items()}, runners

    hessians, by_hessian = run(False)
    inputs, by_inputs = run(True)
    assert all(not r.shipped for r in by_hessian)
    assert by_inputs[0].shipped == {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}
    assert all(r.peak_pending <= 2 for r in by_inputs)
    for key, value in hessians.items():
        assert torch.equal(inputs[key], value), key


def test_a_shipped_inputs_finished_hessian_never_enters_the_object_store(scoring_pool, tiny_model):
    """The owner sums the last chunks' inputs in the solve call itself: after collect, each shipped
    input's Hessian is the sum so far (none here: 2 chunks, both in the one call) plus the chunks
    still to add, and the pruned weights equal the in-process runner's, bit for bit."""
    from asft_ray.distributed.sharded import ShardedRunner
    from asft_ray.pruning.engine import LinearJob, LocalRunner, capture_layer0_inputs

    calib = torch.randint(0, 512, (8, 8), generator=torch.Generator().manual_seed(5))  # 2 chunks of 4
    layer = decoder_layers(tiny_model)[0]
    captured = capture_layer0_inputs(tiny_model, calib)
    runner = ShardedRunner(scoring_pool.take(2), *captured, max_pending=2, ship_inputs=True)
    local = LocalRunner(*captured)
    stats, local_stats = runner.collect(layer, hessian=True), local.collect(layer, hessian=True)
    assert {s: (h.ref, len(h.chunks)) for s, h in stats.hessians.items()} == dict.fromkeys(stats.hessians, (None, 2))

    def jobs():
        return (LinearJob(name, linear.weight.data, 0.5) for name, linear in prunable_linears(layer).items())

    unstructured = Pattern.parse("unstructured")
    expected = dict(local.prune("sparsegpt", unstructured, jobs(), local_stats))
    pruned = dict(runner.prune("sparsegpt", unstructured, jobs(), stats))
    assert list(pruned) == list(expected)
    assert all(torch.equal(pruned[name], expected[name]) for name in expected)
    assert runner.weights_sent == 0  # the solves read the weights from the layer already in the store


def test_a_hessian_summed_from_shipped_inputs_equals_the_one_summed_while_the_layer_runs():
    from asft_ray.pruning.engine import chunk_stats, chunk_stats_and_inputs
    from asft_ray.pruning.stats import hessian_of

    layer = build_tiny_llama().model.layers[0]
    g = torch.Generator().manual_seed(4)
    chunk = [torch.randn(1, 24, 64, generator=g) for _ in range(3)]
    rotary = build_tiny_llama().model.rotary_emb
    kwargs = {"position_embeddings": rotary(chunk[0], torch.arange(24)[None])}
    direct = chunk_stats(layer, chunk, (), kwargs, True)
    small, inputs = chunk_stats_and_inputs(layer, chunk, (), kwargs, None, ["mlp.down_proj", "self_attn.q_proj"])
    assert set(small.hessians) == {"self_attn.o_proj", "mlp.gate_proj"}
    assert [x.shape for x in inputs["mlp.down_proj"]] == [(24, 128)] * 3
    for source in ("mlp.down_proj", "self_attn.q_proj"):
        assert torch.equal(hessian_of(inputs[source]), direct.hessians[source]), source
    for stat in ("sq_norms", "sums", "tokens"):
        assert all(torch.equal(getattr(small, stat)[s], getattr(direct, stat)[s]) for s in direct.sq_norms)


def test_inputs_are_shipped_for_a_short_calibration_of_a_wide_layer_only():
    """On the 1.57 B benchmark's layer shape, 8 samples of 256 tokens: every input's chunks (1024 x
    width float32) are smaller than its Hessian and their grams cost less than the solves: shipped,
    both chunks in one call. The protocol's 32 x 2048 tokens on SmolLM2's widths: Hessians (the
    inputs are larger); 128 x 2048 on the 1.57 B shape: Hessians (the grams would outweigh the solves)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from asft_ray.distributed.sharded import plan_reduction
    from asft_ray.pruning.stats import InputStats

    def probe(hidden, mlp):
        config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=16, num_key_value_heads=16)
        with torch.device("meta"):
            layer = LlamaDecoderLayer(config, layer_idx=0)
        sources = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
                   "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
                   "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj"}
        widths = {"self_attn.q_proj": hidden, "self_attn.o_proj": hidden, "mlp.gate_proj": hidden, "mlp.down_proj": mlp}
        return layer, InputStats(source=sources, sq_norms={s: torch.zeros(w) for s, w in widths.items()})

    work, ship, per_call, dtypes = plan_reduction(*probe(2048, 5632), 4 * 256, 8 * 256, max_pending=2)
    assert ship == list(work) and per_call == 2 and set(dtypes.values()) == {torch.float64}
    assert plan_reduction(*probe(576, 1536), 4 * 2048, 32 * 2048, max_pending=2)[1] == []
    assert plan_reduction(*probe(2048, 5632), 4 * 2048, 128 * 2048, max_pending=2)[1] == []
    forced = plan_reduction(*probe(576, 1536), 4 * 2048, 32 * 2048, max_pending=2, ship_inputs=True)
    assert forced[1] == list(forced[0]) and forced[2] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_shared_layer_comes_out_of_the_store_without_a_copy_in_any_dtype(local_ray, dtype):
    """Layers travel as numpy buffers that Ray maps from the store (read-only: not a private copy);
    bf16, which numpy lacks, as the int16 of its bits, viewed back as the same bf16 values."""
    from asft_ray.distributed.sharded import SharedLayer

    layer = torch.nn.Linear(64, 32).to(dtype)
    back = ray.get(ray.put(SharedLayer(layer)))
    for name, value in layer.state_dict().items():
        shipped = back.arrays[name]
        array = getattr(shipped, "array", shipped)
        assert isinstance(array, np.ndarray) and not array.flags.writeable, name  # a view of the store's buffer
    out = back.materialize()
    for name, value in layer.state_dict().items():
        assert out.state_dict()[name].dtype == dtype and torch.equal(out.state_dict()[name], value), name


def test_block_reconstruction_gives_the_same_bits_on_one_and_two_workers(scoring_pool, tiny_model, calib8):
    """Each sample's gradient is computed on the worker that holds its chunk (pruning/reconstruct.py)."""
    from asft_ray.pruning.reconstruct import Reconstruction

    fit = Reconstruction(epochs=2, lr=1e-3)
    sharded = same_with_worker_counts(scoring_pool, lambda workers: pruned_weights(
        tiny_model, "sparsegpt", calib8[:4, :24], workers, reconstruction=fit))[1]
    local = pruned_weights(tiny_model, "sparsegpt", calib8[:4, :24], reconstruction=fit)
    for key in sharded:  # in process: thread counts may move the last bits
        torch.testing.assert_close(local[key], sharded[key], rtol=1e-3, atol=1e-5)


def test_block_reconstruction_on_an_actor_never_writes_into_the_object_store(scoring_pool, tiny_model, calib8):
    """The fit moves a float32 layer's weights in place (pruning/reconstruct.py); on an actor the
    layer arrives as views of the store's shared buffers, so the actor fits a private copy: the
    layer in the store reads back unchanged after the fit, and the fit did change the weights."""
    import ray

    from asft_ray.distributed.sharded import SharedLayer
    from asft_ray.models import decoder_layers, prunable_linears
    from asft_ray.pruning.engine import capture_layer0_inputs
    from asft_ray.pruning.reconstruct import Reconstruction

    layer = decoder_layers(tiny_model)[0].float()
    for lin in prunable_linears(layer).values():
        lin.weight.data[:, ::2] = 0
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    inputs, args, kwargs = capture_layer0_inputs(tiny_model, calib8[:2, :16])
    targets = [torch.randn_like(x) for x in inputs]
    layer_ref = ray.put(SharedLayer(layer))
    worker = scoring_pool.take(1)[0]
    weights, row = ray.get(worker.reconstruct.remote(layer_ref, [ray.put(inputs)], [ray.put(targets)], 2, 2,
                                                     (args, kwargs), Reconstruction(epochs=2, lr=1e-2), 0))
    stored = ray.get(layer_ref).materialize().state_dict()
    for key, value in before.items():
        assert torch.equal(stored[key], value), key
    weights = {name: torch.tensor(array) for name, array in weights.items()}  # returned as numpy (store buffers)
    assert any(not torch.equal(weights[name], before[f"{name}.weight"]) for name in weights)
    assert all(torch.equal(weights[name] == 0, before[f"{name}.weight"] == 0) for name in weights)


def test_a_sharded_prune_keeps_no_copy_of_the_calibration_activations(scoring_pool, tiny_model, calib8, monkeypatch):
    """The runners put layer 0's inputs in the object store; the coordinator then holds none of them
    (with 128 windows of 2048 tokens they are 2 GiB at a 1.57 B model's width, 8.6 GB at 70 B's)."""
    import gc
    import weakref

    from asft_ray.distributed.sharded import ShardedRunner
    from asft_ray.pruning import engine

    captured, alive = [], []
    capture = engine.capture_layer0_inputs

    def watched_capture(model, ids):
        inputs, args, kwargs = capture(model, ids)
        captured.extend(weakref.ref(x) for x in inputs)
        return inputs, args, kwargs

    class Counting(ShardedRunner):
        def collect(self, layer, hessian, only=None):
            gc.collect()
            alive.append(sum(ref() is not None for ref in captured))
            return super().collect(layer, hessian, only)

    workers = scoring_pool.take(2)
    monkeypatch.setattr(engine, "capture_layer0_inputs", watched_capture)
    prune_model(copy.deepcopy(tiny_model), "wanda", Pattern.parse("unstructured"), 0.5, calib8, show_progress=False,
                make_runner=lambda *a: Counting(workers, *a))
    assert len(captured) == len(calib8) and len(alive) == len(decoder_layers(tiny_model))
    assert max(alive) == 0, alive
