"""The method registry, RIA and the DSnoT-style refinement, each on a tiny layer or model."""

import copy

import pytest
import torch

from asft_ray.config import PruneConfig, Pattern
from asft_ray.errors import AsftError
from asft_ray.methods import Method, register, resolve, unregister
from asft_ray.models import decoder_layers, prunable_linears
from asft_ray.pruning.engine import prune_model, prune_weight
from asft_ray.pruning.masks import is_valid_nm
from asft_ray.scoring.dsnot import dsnot_refine
from asft_ray.scoring.ria import ria_scores
from tests.workers import same_with_worker_counts


# --- the registry -----------------------------------------------------------------------------

def test_a_method_registered_from_one_place_runs_on_the_layerwise_engine(tiny_model, calib_ids, tmp_path):
    """A new method is one declaration: config validation, the engine's path and the statistics follow."""
    seen = []

    def smallest_first(weight, stats):  # keeps the smallest |W| of each row: the opposite of magnitude
        seen.append(sorted(stats))
        return -weight.abs()

    register(Method("test-smallest", needs=("sq_norms",), compare="row", summary="-|W|", score=smallest_first))
    try:
        cfg = PruneConfig(model="m", method="test-smallest", sparsity=0.5, out=str(tmp_path / "o"), true_sequential=True)
        assert cfg.recipe.layerwise and cfg.needs_calibration
        model = copy.deepcopy(tiny_model)
        prune_model(model, "test-smallest", Pattern.parse("unstructured"), 0.5, calib_ids, show_progress=False)
    finally:
        unregister("test-smallest")
    assert seen and all("sq_norms" in keys for keys in seen)  # the engine collected what it declared
    dense = {f"{i}.{n}": lin.weight for i, layer in enumerate(decoder_layers(tiny_model))
             for n, lin in prunable_linears(layer).items()}
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in prunable_linears(layer).items():
            w, d = lin.weight, dense[f"{i}.{name}"]
            kept_max = torch.where(w != 0, d.abs(), torch.zeros_like(d)).amax(1)
            pruned_min = torch.where(w == 0, d.abs(), torch.full_like(d, float("inf"))).amin(1)
            assert (kept_max <= pruned_min).all(), (i, name)  # every row kept its smallest weights
    with pytest.raises(AsftError, match="unknown method 'test-smallest'"):
        resolve("test-smallest")


def test_method_strings_that_cannot_work_are_refused():
    with pytest.raises(AsftError, match="sparsegpt also updates the kept weights"):
        PruneConfig(model="m", method="sparsegpt+dsnot", sparsity=0.5, out="o")
    with pytest.raises(AsftError, match="gradient method taylor"):
        PruneConfig(model="m", method="taylor+dsnot", sparsity=0.5, out="o")
    with pytest.raises(AsftError, match="unknown refinement 'polish'"):
        PruneConfig(model="m", method="wanda+polish", sparsity=0.5, out="o")
    with pytest.raises(AsftError, match="positive integer"):
        PruneConfig(model="m", method="wanda+dsnot:x", sparsity=0.5, out="o")
    recipe = PruneConfig(model="m", method="magnitude+dsnot:7", sparsity=0.5, out="o", resume=True).recipe
    assert recipe.layerwise and recipe.refinements[0][1] == 7  # a data-free mask refined from input statistics


def test_the_derived_method_groups():
    from asft_ray.config import CALIBRATED_METHODS, LAYERWISE_METHODS, METHODS

    assert METHODS[:5] == ("magnitude", "wanda", "sparsegpt", "taylor", "fisher") and "ria" in METHODS
    assert set(LAYERWISE_METHODS) == {"wanda", "sparsegpt", "ria"}
    assert set(CALIBRATED_METHODS) == set(METHODS) - {"magnitude"}


# --- RIA --------------------------------------------------------------------------------------

def test_ria_scores_match_a_hand_computation():
    w = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])  # |W| row sums 3, 7; column sums 4, 6
    sq_norms = torch.tensor([16.0, 1.0])  # ||X|| = 4, 1; to the power 0.5: 2, 1
    expected = torch.tensor([[(1 / 3 + 1 / 4) * 2, (2 / 3 + 2 / 6) * 1],
                             [(3 / 7 + 3 / 4) * 2, (4 / 7 + 4 / 6) * 1]])
    assert torch.allclose(ria_scores(w, sq_norms), expected)


def test_ria_prunes_per_row_where_wanda_would_not():
    w = torch.tensor([[1.0, 0.9], [10.0, 0.1]])  # |W| row sums 1.9, 10.1; column sums 11, 1
    sq_norms = torch.ones(2)
    # by hand, row 0: 1/1.9 + 1/11 = 0.617 < 0.9/1.9 + 0.9/1 = 1.374, so RIA keeps column 1 where
    # Wanda (|W|: 1 > 0.9) keeps column 0; row 1: 10/10.1 + 10/11 = 1.899 > 0.1/10.1 + 0.1/1 = 0.110
    ria = prune_weight("ria", w, Pattern.parse("unstructured"), 0.5, sq_norms=sq_norms)
    wanda = prune_weight("wanda", w, Pattern.parse("unstructured"), 0.5, sq_norms=sq_norms)
    assert torch.equal(ria, torch.tensor([[0.0, 0.9], [10.0, 0.0]]))
    assert torch.equal(wanda, torch.tensor([[1.0, 0.0], [10.0, 0.0]]))


def test_ria_on_the_engine_keeps_exact_sparsity_and_valid_nm(tiny_model, calib_ids):
    for pattern in ("unstructured", "2:4"):
        model = copy.deepcopy(tiny_model)
        prune_model(model, "ria", Pattern.parse(pattern), 0.5, calib_ids, show_progress=False)
        for layer in decoder_layers(model):
            for name, lin in prunable_linears(layer).items():
                w = lin.weight
                assert int((w == 0).sum()) == w.numel() // 2, name
                if pattern == "2:4":
                    assert is_valid_nm(w, 2, 4), name


# --- DSnoT-style refinement -------------------------------------------------------------------

def test_dsnot_swaps_match_a_hand_computation():
    """One row, inputs constant 1 (mean 1, variance 0): the error is (sum of pruned weights)^2.
    Start: keep 3 and -2, prune 2 and 0.5 (e = 2.5, error 6.25).
    Cycle 1: revive 2 (change -2*2.5*2 + 4 = -6; reviving 0.5 would give -2.25), then e' = 0.5 and
    prune -2 (2*0.5*(-2) + 4 = 2; pruning 3 would cost 12): total -4 < 0, swapped: e = -1.5, error 2.25.
    Cycle 2: revive -2 (-2*(-1.5)*(-2) + 4 = -2), e' = 0.5, prune 2 (2*0.5*2 + 4 = 6): total +4, stop."""
    w = torch.tensor([[3.0, -2.0, 2.0, 0.5]])
    keep = torch.tensor([[True, True, False, False]])
    ones = torch.ones(4)
    refined = dsnot_refine(w, keep, mean=ones, sq_mean=ones, cycles=10)
    assert torch.equal(refined, torch.tensor([[True, False, True, False]]))
    one_cycle = dsnot_refine(w, keep, mean=ones, sq_mean=ones, cycles=1)
    assert torch.equal(one_cycle, refined)
    assert torch.equal(dsnot_refine(w, keep, mean=ones, sq_mean=ones, cycles=1, group=2), keep)  # 2:4 groups: no swap helps


def inputs_with_means(tokens: int, width: int, seed: int = 0) -> torch.Tensor:
    """Activations with per-channel means and unequal scales (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(width, generator=g) * 2
    scales = torch.logspace(-0.5, 0.5, width)[torch.randperm(width, generator=g)]
    return means + torch.randn(tokens, width, generator=g) * scales


def layer_stats(x: torch.Tensor) -> dict:
    x = x.double()
    return {"sq_norms": x.pow(2).sum(0), "sums": x.sum(0), "tokens": torch.tensor(float(x.shape[0]), dtype=torch.float64)}


def output_error(w, w_hat, x) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ w_hat.T))


@pytest.mark.parametrize("base", ["wanda", "magnitude", "ria"])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5)])
def test_dsnot_lowers_the_output_error_and_keeps_sparsity_and_nm(base, pattern, sparsity):
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = inputs_with_means(1024, 64)
    pat, stats = Pattern.parse(pattern), layer_stats(x)
    before = prune_weight(base, w, pat, sparsity, **stats)
    after = prune_weight(f"{base}+dsnot", w, pat, sparsity, **stats)
    assert not torch.equal(before != 0, after != 0)  # it did swap
    assert torch.equal((before == 0).sum(1), (after == 0).sum(1))  # same count per row: exact sparsity
    assert torch.equal(after[after != 0], w[after != 0])  # kept weights unchanged
    if pat.kind == "nm":
        assert is_valid_nm(after, pat.n, pat.m)
    assert output_error(w, after, x) < 0.9 * output_error(w, before, x)
    fewer = prune_weight(f"{base}+dsnot:1", w, pat, sparsity, **stats)
    assert ((fewer != 0) != (before != 0)).sum(1).max() <= 2  # one swap (two changed entries) per row at most


def test_dsnot_on_the_engine_with_true_sequential(tiny_model, calib_ids):
    model = copy.deepcopy(tiny_model)
    plain = copy.deepcopy(tiny_model)
    prune_model(model, "wanda+dsnot", Pattern.parse("2:4"), 0.5, calib_ids, show_progress=False, true_sequential=True)
    prune_model(plain, "wanda", Pattern.parse("2:4"), 0.5, calib_ids, show_progress=False, true_sequential=True)
    changed = 0
    for layer, ref in zip(decoder_layers(model), decoder_layers(plain)):
        for name, lin in prunable_linears(layer).items():
            assert is_valid_nm(lin.weight, 2, 4) and int((lin.weight == 0).sum()) == lin.weight.numel() // 2, name
            changed += int(((lin.weight == 0) != (prunable_linears(ref)[name].weight == 0)).sum())
    assert changed > 0


@pytest.mark.parametrize("spec,plain_spec", [("ria+dsnot", "ria"), ("wanda+lsq", "wanda")])
def test_refinements_are_identical_with_one_and_two_ray_workers(scoring_pool, tiny_model, spec, plain_spec):
    """The input sums and token counts DSnoT reads travel through the sharded runner like the squared
    norms; +lsq is solved on the Hessian's owner actor with the other statistics the method needs."""
    from asft_ray.distributed.sharded import sharded_runner_factory

    calib = torch.randint(0, 512, (8, 48), generator=torch.Generator().manual_seed(1))

    def run(method, workers=None):
        model = copy.deepcopy(tiny_model)
        kwargs = {"make_runner": sharded_runner_factory(workers)} if workers else {}
        prune_model(model, method, Pattern.parse("unstructured"), 0.5, calib, show_progress=False, **kwargs)
        return {k: v.clone() for k, v in model.state_dict().items()}

    one = same_with_worker_counts(scoring_pool, lambda workers: run(spec, workers))[1]
    local, plain = run(spec), run(plain_spec)
    differs = 0
    for key, value in local.items():
        assert ((one[key] == 0) == (value == 0)).float().mean() > 0.999, key
        differs += int((value != plain[key]).sum())
    assert differs > 0  # the refinement ran on the workers' statistics


# --- least-squares reconstruction -------------------------------------------------------------

def test_lsq_equals_a_per_row_least_squares_fit():
    from asft_ray.scoring.lsq import lsq_reconstruct

    torch.manual_seed(0)
    x = inputs_with_means(256, 12).double()
    w = torch.randn(5, 12, dtype=torch.float64)
    keep = torch.rand(5, 12, generator=torch.Generator().manual_seed(3)) < 0.5
    keep[0] = True  # a dense row stays as it is
    got = lsq_reconstruct(w, keep, x.T @ x, percdamp=0.0, rows_per_batch=2)
    for i in range(5):
        k = keep[i]
        best = torch.linalg.lstsq(x[:, k], (x @ w[i]).unsqueeze(1)).solution.squeeze(1)  # min ||X_K v - X w_i||
        assert torch.allclose(got[i, k], best, atol=1e-8), i
        assert (got[i, ~k] == 0).all()
    assert torch.allclose(got[0], w[0])


@pytest.mark.parametrize("base", ["wanda", "ria+dsnot", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_lsq_lowers_the_output_error_of_any_mask_and_keeps_it(base, pattern):
    torch.manual_seed(0)
    w = torch.randn(24, 48)
    x = inputs_with_means(512, 48)
    stats = {**layer_stats(x), "hessian": x.double().T @ x.double()}
    pat = Pattern.parse(pattern)
    before = prune_weight(base, w, pat, 0.5, **stats)
    after = prune_weight(f"{base}+lsq", w, pat, 0.5, **stats)
    assert torch.equal(after == 0, before == 0)  # the same mask
    assert output_error(w, after, x) < output_error(w, before, x) * (0.999 if base == "sparsegpt" else 0.9)


def test_lsq_comes_last_and_needs_input_statistics():
    with pytest.raises(AsftError, match="lsq sets the kept weights, so it must come last"):
        resolve("wanda+lsq+dsnot")
    with pytest.raises(AsftError, match="gradient method fisher"):
        resolve("fisher+lsq")
    assert resolve("sparsegpt+lsq").layerwise and resolve("wanda+lsq").hessian


def test_new_methods_streamed_equal_in_memory_and_write_their_method(tiny_model_dir, tmp_path, data_dir):
    """run_prune end to end: streamed (one layer at a time from the shards) and in memory, same bits."""
    import json

    from safetensors.torch import load_file

    from asft_ray.prune import run_prune

    def run(out, stream):
        cfg = PruneConfig(model=str(tiny_model_dir), method="ria+dsnot:10+lsq", pattern="2:4", sparsity=0.5,
                          nsamples=4, seqlen=32, out=str(tmp_path / out), data_dir=data_dir, device="cpu",
                          stream=stream, true_sequential=True)
        run_prune(cfg, show_progress=False)
        tensors = {k: v for f in sorted((tmp_path / out).glob("*.safetensors")) for k, v in load_file(f).items()}
        return tensors, json.loads((tmp_path / out / "asft_run.json").read_text())

    resident, record = run("resident", False)
    streamed, _ = run("streamed", True)
    assert record["inputs"]["method"] == "ria+dsnot:10+lsq" and record["sparsity"]["total"] == pytest.approx(0.5)
    assert resident.keys() == streamed.keys()
    for key in resident:
        assert torch.equal(resident[key], streamed[key]), key
        if key.endswith("proj.weight"):
            assert is_valid_nm(resident[key], 2, 4), key


def test_obs_is_sparsegpts_update_for_any_mask():
    torch.manual_seed(0)
    w = torch.randn(24, 256)
    x = inputs_with_means(512, 256)
    stats = {**layer_stats(x), "hessian": x.double().T @ x.double()}
    for pattern in ("unstructured", "2:4"):
        pat = Pattern.parse(pattern)
        sparsegpt = prune_weight("sparsegpt", w, pat, 0.5, **stats)
        assert torch.equal(prune_weight("sparsegpt+obs", w, pat, 0.5, **stats), sparsegpt)  # its own mask: same bits
        wanda = prune_weight("wanda", w, pat, 0.5, **stats)
        obs = prune_weight("wanda+obs", w, pat, 0.5, **stats)
        lsq = prune_weight("wanda+lsq", w, pat, 0.5, **stats)
        assert torch.equal(obs == 0, wanda == 0)
        assert output_error(w, lsq, x) < output_error(w, obs, x) < 0.9 * output_error(w, wanda, x)


def test_dsnot_never_revives_a_zero_weight():
    """A weight already zero (pruned at an earlier stage) stays pruned: keeping it would change nothing
    but leave one more zero in the row than the target. Inputs constant 1, pruned 0, 1 and -0.8 (e = 0.2):
    reviving the zero (change 0) and pruning -0.1 (2*0.2*(-0.1) + 0.01 = -0.03) would be the best swap;
    reviving 1 (+0.6) or -0.8 (+0.96) helps with no pruning, so nothing changes."""
    w = torch.tensor([[3.0, -2.0, -0.1, 0.0, 1.0, -0.8]])
    keep = torch.tensor([[True, True, True, False, False, False]])
    ones = torch.ones(6)
    assert torch.equal(dsnot_refine(w, keep, mean=ones, sq_mean=ones, cycles=10), keep)
