"""Block reconstruction (pruning/reconstruct.py): exact gradients, Adam's step by hand, masks kept
exactly, the layer's error against the dense hidden states lowered, the same bits on 1 and 2 workers."""

import copy

import pytest
import torch

from asft_ray.config import Pattern, PruneConfig
from asft_ray.errors import AsftError
from asft_ray.models import decoder_layers, prunable_linears
from asft_ray.pruning.engine import LocalRunner, capture_layer0_inputs, floats_as, prune_model, run_layer
from asft_ray.pruning.reconstruct import Reconstruction, fit_layer, sample_backward
from tests.conftest import build_tiny_llama


@pytest.fixture
def calib():
    return torch.randint(0, 512, (4, 24), generator=torch.Generator().manual_seed(3))


def test_sample_backward_hands_over_gradients_equal_to_finite_differences(calib):
    model = build_tiny_llama()
    inputs, args, kwargs = capture_layer0_inputs(model, calib[:1])
    layer = copy.deepcopy(decoder_layers(model)[0]).double()
    x, args, kwargs = inputs[0].double(), floats_as(args, torch.float64), floats_as(kwargs, torch.float64)
    target = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = {}
    loss = sample_backward(layer, x, target, args, kwargs, grads.__setitem__)
    assert set(grads) == set(prunable_linears(layer))
    with torch.no_grad():
        assert loss == pytest.approx(float(((run_layer(layer, x, args, kwargs) - target) ** 2).mean()))
    eps = 1e-2  # Llama's norms and softmax round to float32 inside a float64 layer: a small step measures that noise
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        weight = prunable_linears(layer)[name].weight
        for index in ((0, 0), (3, 5)):
            with torch.no_grad():
                weight[index] += eps
                up = float(((run_layer(layer, x, args, kwargs) - target) ** 2).mean())
                weight[index] -= 2 * eps
                down = float(((run_layer(layer, x, args, kwargs) - target) ** 2).mean())
                weight[index] += eps
            assert float(grads[name][index]) == pytest.approx((up - down) / (2 * eps), rel=1e-3, abs=1e-12)
    assert not any(lin.weight.requires_grad for lin in prunable_linears(layer).values())  # left as found


def test_one_adam_step_moves_each_kept_weight_by_lr_against_its_gradient_and_no_pruned_one():
    """Adam's first step is -lr * sign(g) (bias-corrected m / sqrt(v) = g / |g|, up to eps)."""
    layer = build_tiny_llama().model.layers[0]
    for lin in prunable_linears(layer).values():
        lin.weight.data[:, ::2] = 0  # half pruned
    before = {n: lin.weight.detach().clone() for n, lin in prunable_linears(layer).items()}
    grads = {n: torch.randn(w.shape, generator=torch.Generator().manual_seed(i)) for i, (n, w) in enumerate(before.items())}
    seen = []

    def backward_of(lay, k, on_gradient):
        seen.append(k)
        for name, grad in grads.items():
            on_gradient(name, grad.clone())
        return 1.5

    row = fit_layer(layer, backward_of, n_samples=1, epochs=1, lr=1e-3, seed=0)
    assert seen == [0] and row == {"reconstruction_loss_first_epoch": 1.5, "reconstruction_loss_last_epoch": 1.5}
    for name, lin in prunable_linears(layer).items():
        keep = before[name] != 0
        expected = (before[name] - 1e-3 * torch.sign(grads[name])) * keep
        torch.testing.assert_close(lin.weight.data, expected, rtol=0, atol=1e-7)  # Adam eps, float32
        assert bool((lin.weight.data[~keep] == 0).all())


def test_every_sample_is_visited_once_per_epoch_in_a_seeded_order():
    layer = build_tiny_llama().model.layers[0]
    orders = []
    for _ in range(2):
        seen = []
        fit_layer(copy.deepcopy(layer), lambda lay, k, on_gradient: (seen.append(k), 0.0)[1], 5, 3, 1e-3, seed=7)
        orders.append(seen)
    assert orders[0] == orders[1]
    assert [sorted(orders[0][i * 5:(i + 1) * 5]) for i in range(3)] == [list(range(5))] * 3


@pytest.mark.parametrize("mask,block_elements", [("columns", 1 << 20), ("random", 1 << 20), ("random", 100)])
def test_stepping_each_linear_inside_the_backward_equals_one_step_after_it_bit_for_bit(calib, mask, block_elements):
    """fit_layer steps each linear as its gradient is finished, one gradient alive at a time, a
    block of rows at a time on the kept weights only; the reference: all gradients first
    (torch.autograd.grad), then one torch.optim.Adam step over the whole weights, pruned gradients
    zeroed. Random masks put the kept weights anywhere in Adam's vectorised loops; 100-weight blocks
    split every linear into blocks of 1-3 rows."""
    model = build_tiny_llama()
    inputs, args, kwargs = capture_layer0_inputs(model, calib)
    layer = copy.deepcopy(decoder_layers(model)[0])
    for i, lin in enumerate(prunable_linears(layer).values()):
        if mask == "columns":
            lin.weight.data[:, 1::2] = 0
        else:
            lin.weight.data *= torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(i)) > 0.5
    pruned = {n: lin.weight == 0 for n, lin in prunable_linears(layer).items()}
    layer_before = {n: lin.weight.detach().clone() for n, lin in prunable_linears(layer).items()}
    targets = [x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) for i, x in enumerate(inputs)]
    reference = copy.deepcopy(layer)
    linears = prunable_linears(reference)
    keep = {n: lin.weight != 0 for n, lin in linears.items()}
    adam = torch.optim.Adam([lin.weight for lin in linears.values()], lr=1e-3, foreach=False)
    order = torch.Generator().manual_seed(5)
    for _ in range(2):
        for k in torch.randperm(len(inputs), generator=order).tolist():
            with torch.enable_grad():
                loss = torch.nn.functional.mse_loss(run_layer(reference, inputs[k], args, kwargs), targets[k])
                grads = torch.autograd.grad(loss, [lin.weight for lin in linears.values()])
            with torch.no_grad():
                for (name, lin), grad in zip(linears.items(), grads):
                    lin.weight.grad = grad * keep[name]
                adam.step()
                adam.zero_grad(set_to_none=True)

    alive = []

    def backward_of(lay, k, on_gradient):
        def counted(name, grad):  # the gradients that exist when this one is handed over
            alive.append(sum(lin.weight.grad is not None for lin in prunable_linears(lay).values()) + 1)
            on_gradient(name, grad)
        return sample_backward(lay, inputs[k], targets[k], args, kwargs, counted)

    fit_layer(layer, backward_of, len(inputs), epochs=2, lr=1e-3, seed=5, block_elements=block_elements)
    assert alive and max(alive) == 1
    for (name, lin), ref in zip(prunable_linears(layer).items(), linears.values()):
        assert torch.equal(lin.weight.view(torch.int32), ref.weight.view(torch.int32)), name
        assert bool((lin.weight[pruned[name]] == 0).all()) and not torch.equal(lin.weight, layer_before[name]), name


def _pruned(model, calib, reconstruction=None, method="sparsegpt", **kwargs):
    model = copy.deepcopy(model)
    report = prune_model(model, method, Pattern.parse("unstructured"), 0.5, calib, show_progress=False,
                         reconstruction=reconstruction, **kwargs)
    return model, report


def _last_hidden(model, calib):
    runner = LocalRunner(*capture_layer0_inputs(model, calib))
    for layer in decoder_layers(model):
        runner.advance(layer)
    return torch.cat(runner.outputs())


def test_the_engine_keeps_masks_exact_and_brings_the_last_layer_closer_to_dense(calib):
    dense = build_tiny_llama()
    plain, _ = _pruned(dense, calib)
    fitted, report = _pruned(dense, calib, Reconstruction(epochs=4, lr=1e-3))
    for layer in decoder_layers(fitted):
        for name, lin in prunable_linears(layer).items():
            assert int((lin.weight == 0).sum()) == lin.weight.numel() // 2, name  # exact, as SparseGPT left it
    # layer 0 sees the same inputs in both runs: the same mask, other kept values
    for (name, lin_a), lin_b in zip(prunable_linears(decoder_layers(plain)[0]).items(),
                                    prunable_linears(decoder_layers(fitted)[0]).values()):
        assert torch.equal(lin_a.weight == 0, lin_b.weight == 0), name
        assert not torch.equal(lin_a.weight, lin_b.weight), name
    assert all(r["reconstruction_loss_last_epoch"] < r["reconstruction_loss_first_epoch"] for r in report)
    target = _last_hidden(dense, calib)
    assert float(((_last_hidden(fitted, calib) - target) ** 2).mean()) < float(((_last_hidden(plain, calib) - target) ** 2).mean())


@pytest.mark.parametrize("bad, message", [
    ({"reconstruct_epochs": -1}, "reconstruct_epochs must be >= 0"),
    ({"reconstruct_epochs": 2, "reconstruct_lr": 0.0}, "reconstruct_lr > 0"),
    ({"reconstruct_epochs": 2, "method": "magnitude"}, "follows a layer-wise method"),
])
def test_config_errors(bad, message):
    values = {"model": "m", "method": "wanda", "sparsity": 0.5, "out": "o", **bad}
    with pytest.raises(AsftError, match=message):
        PruneConfig(**values)


def test_off_by_default_and_out_of_the_identity_when_off():
    off = PruneConfig(model="m", method="wanda", sparsity=0.5, out="o")
    assert off.reconstruction is None and "reconstruct_epochs" not in off.identity()
    on = PruneConfig(model="m", method="wanda", sparsity=0.5, out="o", reconstruct_epochs=3, reconstruct_lr=2e-4)
    assert on.reconstruction == Reconstruction(3, 2e-4)
    assert on.identity()["reconstruct_epochs"] == 3 and on.identity()["reconstruct_lr"] == 2e-4


def test_a_bf16_layer_is_fitted_in_float32_and_stays_bf16_with_its_zeros(calib):
    dense = build_tiny_llama().to(torch.bfloat16)
    plain, _ = _pruned(dense, calib)
    fitted, report = _pruned(dense, calib, Reconstruction(epochs=4, lr=1e-3))
    for name, lin in prunable_linears(decoder_layers(fitted)[0]).items():
        assert lin.weight.dtype == torch.bfloat16, name
        assert torch.equal(lin.weight == 0, prunable_linears(decoder_layers(plain)[0])[name].weight == 0), name
    assert report[0]["reconstruction_loss_last_epoch"] < report[0]["reconstruction_loss_first_epoch"]


def test_adam_state_is_kept_for_the_kept_weights_only_and_16_bit_layers_are_refused():
    """The fit's Adam moments exist for the kept weights only (none for a pruned one), in blocks of
    whole rows, masks as bits; a 16-bit layer is refused (the runners fit a float32 copy)."""
    from asft_ray.pruning.reconstruct import _blocks

    weight = torch.randn(37, 29, generator=torch.Generator().manual_seed(0))
    weight *= torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.7
    blocks = _blocks(weight, block_elements=100)  # 3 rows of 29 a block
    assert [(b.rows.start, b.rows.stop) for b in blocks][:2] == [(0, 3), (3, 6)] and len(blocks) == 13
    assert sum(b.exp_avg.numel() + b.exp_avg_sq.numel() for b in blocks) == 2 * int((weight != 0).sum())
    assert sum(b.mask.nbytes for b in blocks) <= weight.numel() // 8 + len(blocks)
    assert all(torch.equal(b.mask.unpack(weight[b.rows].shape), weight[b.rows] != 0) for b in blocks)
    layer = build_tiny_llama().model.layers[0].to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        fit_layer(layer, lambda lay, k, on_gradient: 0.0, 1, 1, 1e-3, seed=0)
