"""Channel permutation for N:M (pruning/permute.py): same function, more kept under N:M."""

import copy
import json

import pytest
import torch

from asft_ray.config import Pattern, PruneConfig
from asft_ray.errors import AsftError
from asft_ray.models import decoder_layers, prunable_linears
from asft_ray.pruning.engine import prune_model
from asft_ray.pruning.masks import is_valid_nm
from asft_ray.pruning.permute import (
    attention_orders,
    mlp_order,
    permute_attention_values,
    permute_mlp,
    refine_order,
    retained,
    snake_order,
)


def test_snake_order_deals_one_strong_channel_to_each_group_by_hand():
    scores = torch.tensor([[10.0, 9, 8, 7, 1, 1, 1, 1]])
    identity = torch.arange(8)
    assert retained(scores, identity, 2, 4) == 10 + 9 + 1 + 1  # the four strong inputs share one group
    order = snake_order(scores.sum(0), 4)
    # ranks 0..7 go to groups 0, 1, 1, 0, 0, 1, 1, 0: {10, 7, 1, 1} and {9, 8, 1, 1}
    assert order.tolist() == [0, 3, 4, 7, 1, 2, 5, 6]
    assert retained(scores, order, 2, 4) == 10 + 9 + 8 + 7


def test_column_importance_in_row_blocks_and_sampled_rows():
    from asft_ray.pruning.permute import REFINE_ROWS, column_importance, sampled_rows

    w, sq = torch.randn(300, 16), torch.rand(16)
    exact = (w.abs().double() * sq.double().sqrt()).sum(0)
    torch.testing.assert_close(column_importance(w, sq, block=7), exact)
    tall = torch.arange(3 * REFINE_ROWS).float().unsqueeze(1)
    picked = sampled_rows(tall)
    assert picked.shape[0] == REFINE_ROWS and picked[0, 0] == 0 and picked[-1, 0] == 3 * REFINE_ROWS - 1
    assert sampled_rows(w) is w


def test_the_swap_search_only_raises_the_kept_score_and_stays_a_permutation():
    torch.manual_seed(0)
    scores = torch.randn(64, 256).abs() * torch.rand(256).pow(4).unsqueeze(0)  # heavy-tailed columns
    snake = snake_order(scores.sum(0), 4)
    refined = refine_order(scores, snake, 2, 4)
    assert sorted(refined.tolist()) == list(range(256))
    assert retained(scores, refined, 2, 4) > retained(scores, snake, 2, 4) > retained(scores, torch.arange(256), 2, 4)


def test_a_permuted_mlp_computes_the_same_function(tiny_model):
    mlp = copy.deepcopy(decoder_layers(tiny_model)[0].mlp)
    x = torch.randn(3, 5, mlp.gate_proj.in_features)
    before = mlp(x)
    sq_norms = torch.rand(mlp.down_proj.in_features)
    order, gain = mlp_order(mlp.down_proj.weight, sq_norms, 2, 4)
    assert not torch.equal(order, torch.arange(order.numel())) and gain > 0
    scores = mlp.down_proj.weight.detach().abs().double() * sq_norms.double().sqrt()
    assert gain == pytest.approx(retained(scores, order, 2, 4) / retained(scores, torch.arange(order.numel()), 2, 4) - 1)
    permute_mlp(mlp, order)
    torch.testing.assert_close(mlp(x), before, rtol=1e-5, atol=1e-6)


def test_a_model_with_every_mlp_and_value_head_permuted_computes_the_same_logits(tiny_model):
    model = copy.deepcopy(tiny_model)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    before = model(input_ids=ids).logits
    torch.manual_seed(1)
    for layer in decoder_layers(model):
        attn = layer.self_attn  # 4 query heads on 2 KV heads of 16 dims
        o_order, v_order, gain = attention_orders(attn.o_proj.weight, torch.rand(64) ** 4, 4, 2, 2, 4)
        assert gain >= 0 and sorted(v_order.tolist()) == list(range(32)) and sorted(o_order.tolist()) == list(range(64))
        assert all(set(v_order[k * 16:(k + 1) * 16].tolist()) == set(range(k * 16, (k + 1) * 16)) for k in range(2))
        # query heads 0 and 1 read KV head 0: their o_proj columns move as its value dimensions do
        assert torch.equal(o_order[:16], v_order[:16]) and torch.equal(o_order[16:32], v_order[:16] + 16)
        assert torch.equal(o_order[32:48], v_order[16:] + 16) and not torch.equal(v_order, torch.arange(32))
        permute_attention_values(attn, o_order, v_order)
        permute_mlp(layer.mlp, mlp_order(layer.mlp.down_proj.weight, torch.rand(128) ** 4, 2, 4)[0])
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


def _pruned(model, calib_ids, method, permute, make_runner=None):
    model = copy.deepcopy(model)
    report = prune_model(model, method, Pattern.parse("2:4"), 0.5, calib_ids, show_progress=False,
                         channel_permutation=permute, **({"make_runner": make_runner} if make_runner else {}))
    weights = {f"{i}.{name}": lin.weight.detach().clone() for i, layer in enumerate(decoder_layers(model))
               for name, lin in prunable_linears(layer).items()}
    return weights, report


def test_the_engine_permutes_each_mlp_then_prunes_it_exactly(tiny_model, calib_ids):
    plain, _ = _pruned(tiny_model, calib_ids, "wanda", False)
    permuted, report = _pruned(tiny_model, calib_ids, "wanda", True)
    for key, weight in permuted.items():
        assert is_valid_nm(weight, 2, 4), key
    assert len(report) == 2 and all(row["permutation_kept_score_gain"] >= 0 for row in report)
    assert all(row["o_proj_permutation_kept_score_gain"] >= 0 for row in report)
    # Layer 0 sees the same inputs either way and Wanda's 2:4 masks are per row and per group of
    # hidden inputs, which do not move: gate/up come out as the plain run's rows, reordered,
    # and down's columns are the plain model's channels in the same new order.
    rows = {tuple(r.tolist()): i for i, r in enumerate(plain["0.mlp.gate_proj"])}
    order = torch.tensor([rows[tuple(r.tolist())] for r in permuted["0.mlp.gate_proj"]])
    assert sorted(order.tolist()) == list(range(order.numel())) and not torch.equal(order, torch.arange(order.numel()))
    assert torch.equal(permuted["0.mlp.up_proj"], plain["0.mlp.up_proj"][order])
    assert not torch.equal(permuted["0.mlp.down_proj"], plain["0.mlp.down_proj"][:, order])  # its groups changed
    dense_down = decoder_layers(tiny_model)[0].mlp.down_proj.weight[:, order]
    kept = permuted["0.mlp.down_proj"] != 0
    assert torch.equal(permuted["0.mlp.down_proj"][kept], dense_down[kept])  # Wanda keeps values as they are
    # v_proj: the plain run's rows, each moved within its own KV head's block of 16
    v_rows = {tuple(r.tolist()): i for i, r in enumerate(plain["0.self_attn.v_proj"])}
    v_order = [v_rows[tuple(r.tolist())] for r in permuted["0.self_attn.v_proj"]]
    assert sorted(v_order) == list(range(32)) and all(v // 16 == i // 16 for i, v in enumerate(v_order))
    assert v_order != list(range(32))


def test_one_and_two_workers_and_the_streamed_run_permute_alike(scoring_pool, tiny_model, tiny_model_dir, calib_ids,
                                                                tmp_path, data_dir):
    from asft_ray.distributed.sharded import sharded_runner_factory
    from asft_ray.prune import run_prune
    from tests.workers import same_with_worker_counts

    local, _ = _pruned(tiny_model, calib_ids, "sparsegpt", True)
    sharded = same_with_worker_counts(
        scoring_pool, lambda workers: _pruned(tiny_model, calib_ids, "sparsegpt", True, sharded_runner_factory(workers))[0])
    for key in local:  # same masks as in process (thread counts may move the last float bits)
        assert ((local[key] == 0) == (sharded[1][key] == 0)).float().mean() > 0.999, key

    from safetensors.torch import load_file

    def run(out, stream):
        cfg = PruneConfig(model=str(tiny_model_dir), method="sparsegpt", pattern="2:4", sparsity=0.5, nsamples=4,
                          seqlen=32, out=str(tmp_path / out), data_dir=data_dir, device="cpu", stream=stream,
                          channel_permutation=True)
        run_prune(cfg, show_progress=False)
        tensors = {k: v for f in sorted((tmp_path / out).glob("*.safetensors")) for k, v in load_file(f).items()}
        return tensors, json.loads((tmp_path / out / "asft_run.json").read_text())

    resident, record = run("resident", False)
    streamed, _ = run("streamed", True)
    assert record["inputs"]["channel_permutation"] is True
    assert resident.keys() == streamed.keys() and all(torch.equal(resident[k], streamed[k]) for k in resident)


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("magnitude", "2:4")])
def test_channel_permutation_needs_n_m_and_a_layerwise_method(method, pattern, tmp_path):
    with pytest.raises(AsftError, match="channel_permutation reorders channels for N:M groups"):
        PruneConfig(model="m", method=method, pattern=pattern, sparsity=0.5, out=str(tmp_path / "o"),
                    channel_permutation=True)
    assert "channel_permutation" not in PruneConfig(model="m", method="wanda", sparsity=0.5, out="o").identity()
