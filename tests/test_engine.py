import copy

import pytest
import torch

from asft_ray.config import Pattern
from asft_ray.errors import AsftError
from asft_ray.eval.sparsity import model_sparsity
from asft_ray.models import decoder_layers, prunable_linears
from asft_ray.pruning.engine import (
    LocalRunner,
    run_layer,
    capture_layer0_inputs,
    chunk_stats,
    chunk_stats_and_inputs,
    computing_copy,
    computing_view,
    gradient_sums,
    prune_model,
    prune_weight,
)
from asft_ray.pruning.masks import is_valid_nm
from asft_ray.pruning.stats import hessian_of, input_groups

METHODS = ["magnitude", "wanda", "sparsegpt", "taylor", "fisher"]


@torch.no_grad()
def test_running_captured_inputs_through_the_layers_reproduces_the_model(tiny_model, calib_ids):
    """The engine must pass each layer exactly what the model does (rotary embeddings, masks)."""
    inputs, args, kwargs = capture_layer0_inputs(tiny_model, calib_ids)
    hidden = []
    captured = []
    handle = tiny_model.model.norm.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    for ids in calib_ids:
        tiny_model(input_ids=ids.unsqueeze(0))
    handle.remove()
    for x in inputs:
        for layer in decoder_layers(tiny_model):
            x = run_layer(layer, x, args, kwargs)
        hidden.append(x)
    for mine, theirs in zip(hidden, captured):
        assert torch.allclose(mine, theirs, atol=1e-5)


@torch.no_grad()
def test_a_16_bit_layer_computes_in_float32_a_linear_at_a_time_with_the_bits_of_a_float32_copy(tiny_model, calib_ids):
    """computing_view shares the layer's bf16 linear weights (no float32 copy of them) and upcasts
    each one only while it runs: outputs and statistics equal a whole float32 copy's bit for bit,
    and the layer itself is left as it was."""
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    inputs, args, kwargs = capture_layer0_inputs(model, calib_ids[:2])
    layer = decoder_layers(model)[0]
    whole, view = computing_copy(layer), computing_view(layer)
    for name, linear in prunable_linears(view).items():
        assert linear.weight is prunable_linears(layer)[name].weight and linear.weight.dtype == torch.bfloat16, name
    upcast = sum(p.numel() for p in view.parameters() if p.dtype == torch.float32)
    assert upcast == sum(p.numel() for n, p in layer.named_parameters() if "norm" in n) > 0  # only the norms
    for x in inputs:
        assert torch.equal(run_layer(view, x, args, kwargs), run_layer(whole, x, args, kwargs))
    a = chunk_stats(whole, inputs, args, kwargs, hessian=True)
    b = chunk_stats(view, inputs, args, kwargs, hessian=True)
    assert a.sq_norms.keys() == b.sq_norms.keys() and all(torch.equal(a.sq_norms[k], b.sq_norms[k]) for k in a.sq_norms)
    # the Hessians: summed in float64 for the float32 copy's linears, in float32 for the 16-bit ones
    # (stats.hessian_dtype), over the very same inputs, which the copy hands over
    _, seen = chunk_stats_and_inputs(whole, inputs, args, kwargs, None, keep_inputs=list(a.hessians))
    for k in a.hessians:
        assert a.hessians[k].dtype == torch.float64 and b.hessians[k].dtype == torch.float32, k
        assert torch.equal(a.hessians[k], hessian_of(seen[k], torch.float64)), k
        assert torch.equal(b.hessians[k], hessian_of(seen[k], torch.float32)), k
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert not any("forward" in vars(m) for m in layer.modules())  # the layer's own linears are untouched
    fp32 = decoder_layers(tiny_model)[0]
    assert computing_view(fp32) is fp32
    # a final head whose norm has no weight (a non-parametric norm): its only parameter is the
    # 16-bit head, and the scores still run it in float32 (eval.streamed.last_layer_nll)
    from asft_ray.eval.streamed import FinalHead, last_layer_nll

    final = FinalHead(torch.nn.Identity(), model.lm_head)
    hidden, ids = torch.randn(1, 5, model.config.hidden_size), torch.tensor([1, 2, 3, 4, 5])
    assert last_layer_nll(computing_view(final), hidden, ids) == last_layer_nll(computing_copy(final), hidden, ids)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_unstructured_sparsity_is_exact_in_every_linear(tiny_model, calib_ids, method, sparsity):
    report = prune_model(tiny_model, method, Pattern.parse("unstructured"), sparsity, calib_ids, show_progress=False)
    assert len(report) == 2
    for layer in decoder_layers(tiny_model):
        for name, linear in prunable_linears(layer).items():
            w = linear.weight
            zeros = int((w == 0).sum())
            rows, cols = w.shape
            if method == "sparsegpt":  # exact per block of 128 columns: at most half an element off per block
                assert abs(zeros - w.numel() * sparsity) <= 0.5 * ((cols + 127) // 128), name
            else:
                assert zeros == round(w.numel() * sparsity), name
            if method not in ("magnitude", "sparsegpt"):  # compared per row: within one element of cols * s
                assert torch.all(((w == 0).sum(1) - cols * sparsity).abs() < 1), name
    assert model_sparsity(tiny_model)["total"] == pytest.approx(sparsity, abs=1e-3)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_groups_are_valid_in_every_linear(tiny_model, calib_ids, method, pattern):
    pat = Pattern.parse(pattern)
    prune_model(tiny_model, method, pat, 0.5, calib_ids, show_progress=False)
    for layer in decoder_layers(tiny_model):
        for name, linear in prunable_linears(layer).items():
            assert is_valid_nm(linear.weight, pat.n, pat.m), name
            assert int((linear.weight == 0).sum()) == linear.weight.numel() // 2


def test_embeddings_norms_and_lm_head_are_untouched(tiny_model, calib_ids):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    prune_model(tiny_model, "wanda", Pattern.parse("unstructured"), 0.5, calib_ids, show_progress=False)
    after = tiny_model.state_dict()
    for key in before:
        if "layers." in key and key.endswith("proj.weight"):
            assert not torch.equal(before[key], after[key]), key
        else:
            assert torch.equal(before[key], after[key]), key


def test_wanda_differs_from_magnitude_because_it_uses_the_activations(tiny_model, calib_ids):
    other = copy.deepcopy(tiny_model)
    prune_model(tiny_model, "wanda", Pattern.parse("unstructured"), 0.5, calib_ids, show_progress=False)
    prune_model(other, "magnitude", Pattern.parse("unstructured"), 0.5, calib_ids, show_progress=False)
    w1 = decoder_layers(tiny_model)[0].self_attn.q_proj.weight
    w2 = decoder_layers(other)[0].self_attn.q_proj.weight
    assert not torch.equal(w1 == 0, w2 == 0)


def test_pruning_is_deterministic(tiny_model, calib_ids):
    other = copy.deepcopy(tiny_model)
    for m in (tiny_model, other):
        prune_model(m, "sparsegpt", Pattern.parse("unstructured"), 0.5, calib_ids, show_progress=False)
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k


def test_gradient_sums_match_autograd_on_the_summed_loss(tiny_model, calib_ids):
    sums = gradient_sums(tiny_model, calib_ids[:2], show_progress=False)
    tiny_model.zero_grad()
    total = sum(tiny_model(input_ids=i[None], labels=i[None]).loss for i in calib_ids[:2])
    total.backward()
    w = decoder_layers(tiny_model)[1].mlp.down_proj.weight
    assert torch.allclose(sums[(1, "mlp.down_proj")][0].float(), w.grad, atol=1e-6)
    assert all(p.requires_grad for p in tiny_model.parameters())  # flags restored


def test_nm_that_does_not_divide_the_width_fails_before_any_work(tiny_model, calib_ids):
    with pytest.raises(AsftError, match="not a multiple of 3"):
        prune_model(tiny_model, "wanda", Pattern.parse("1:3"), 2 / 3, calib_ids, show_progress=False)
    assert model_sparsity(tiny_model)["total"] == 0.0


def test_a_model_without_a_layer_stack_is_a_clear_error():
    class NoLayers(torch.nn.Module):
        config = type("C", (), {"num_hidden_layers": 2})()

    with pytest.raises(AsftError, match="unsupported model"):
        decoder_layers(NoLayers())


@pytest.mark.parametrize("method", METHODS)
def test_prune_lm_head_unties_it_and_leaves_embeddings_dense(tiny_model, calib_ids, method, tmp_path):
    from asft_ray.models import save_model
    from transformers import LlamaForCausalLM

    embed_before = tiny_model.model.embed_tokens.weight.clone()
    report = prune_model(tiny_model, method, Pattern.parse("unstructured"), 0.5, calib_ids, False, prune_lm_head=True)
    assert report[-1]["layer"] == "lm_head"
    assert model_sparsity(tiny_model)["lm_head"] == pytest.approx(0.5, abs=1e-3)
    assert torch.equal(tiny_model.model.embed_tokens.weight, embed_before)
    save_model(tiny_model, None, tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(again.lm_head.weight, tiny_model.lm_head.weight)
    assert torch.equal(again.model.embed_tokens.weight, embed_before)
    with torch.no_grad():
        assert torch.equal(again(input_ids=calib_ids).logits, tiny_model(input_ids=calib_ids).logits)


def _tiny_other(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "opt":
        cfg = tf.OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           word_embed_proj_dim=64, max_position_embeddings=128)
        return tf.OPTForCausalLM(cfg).eval()
    cfg = tf.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return tf.Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["opt", "qwen2"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_other_architectures_with_a_layer_modulelist_work(kind, method, calib_ids):
    model = _tiny_other(kind)
    inputs, args, kwargs = capture_layer0_inputs(model, calib_ids[:1])
    with torch.no_grad():
        x = inputs[0]
        for layer in decoder_layers(model):
            x = run_layer(layer, x, args, kwargs)
        final = model(input_ids=calib_ids[:1], output_hidden_states=True).hidden_states[-1]
    if kind == "qwen2":  # Qwen2's last hidden state is after the final norm
        x = model.model.norm(x)
    else:
        x = model.model.decoder.final_layer_norm(x)
    assert torch.allclose(x, final, atol=1e-5)
    prune_model(model, method, Pattern.parse("2:4"), 0.5, calib_ids, show_progress=False)
    for layer in decoder_layers(model):
        for name, linear in prunable_linears(layer).items():
            assert is_valid_nm(linear.weight, 2, 4), name


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_pruned_weights_are_positive_zeros(tiny_model, calib_ids, method):
    """-0.0 equals 0 but not bit for bit: a compressed format would count it as a kept weight."""
    prune_model(tiny_model, method, Pattern.parse("unstructured"), 0.5, calib_ids, show_progress=False)
    for layer in tiny_model.model.layers:
        for lin in prunable_linears(layer).values():
            zeros = lin.weight == 0
            assert zeros.any() and not torch.signbit(lin.weight[zeros]).any()


def test_input_groups_follow_the_layer_order_and_shared_inputs(tiny_model, calib_ids):
    inputs, args, kwargs = capture_layer0_inputs(tiny_model, calib_ids)
    stats = LocalRunner(inputs, args, kwargs).collect(decoder_layers(tiny_model)[0], hessian=False)
    assert input_groups(stats) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"],
    ]


@pytest.mark.parametrize("hessian", [False, True])
def test_statistics_of_some_linears_equal_those_of_the_full_pass(tiny_model, calib_ids, hessian):
    """Stopping the forward once the asked linears have their inputs changes none of their statistics."""
    inputs, args, kwargs = capture_layer0_inputs(tiny_model, calib_ids)
    runner, layer = LocalRunner(inputs, args, kwargs), decoder_layers(tiny_model)[0]
    full = runner.collect(layer, hessian)
    for group in (["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]):
        part = runner.collect(layer, hessian, only=group)
        for name in group:
            assert torch.equal(part.sq_norm(name), full.sq_norm(name)), name
            if hessian:
                assert torch.equal(part.hessian(name), full.hessian(name)), name


@torch.no_grad()
def test_true_sequential_scores_each_group_on_inputs_through_the_pruned_groups(tiny_model, calib_ids):
    """Layer 0 by hand: prune q/k/v on the dense inputs, then o_proj with ||x||^2 of its inputs
    measured through the pruned q/k/v: the masks must be exactly those of true_sequential."""
    pattern = Pattern.parse("unstructured")
    by_hand = copy.deepcopy(tiny_model)
    inputs, args, kwargs = capture_layer0_inputs(by_hand, calib_ids)
    layer = decoder_layers(by_hand)[0]
    linears = prunable_linears(layer)

    def sq_norms_of(name):
        total = []
        handle = linears[name].register_forward_hook(
            lambda m, a, o: total.append(a[0].reshape(-1, a[0].shape[-1]).double().pow(2).sum(0)))
        for x in inputs:
            run_layer(layer, x, args, kwargs)
        handle.remove()
        return sum(total)

    for group in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]):
        norms = {name: sq_norms_of(name) for name in group}
        for name in group:
            linears[name].weight.data = prune_weight("wanda", linears[name].weight.data, pattern, 0.5, sq_norms=norms[name])
    prune_model(tiny_model, "wanda", pattern, 0.5, calib_ids, show_progress=False, true_sequential=True)
    mine = prunable_linears(decoder_layers(tiny_model)[0])
    for name in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj"):
        assert torch.equal(mine[name].weight == 0, linears[name].weight == 0), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_true_sequential_keeps_the_pattern_exact_and_changes_the_later_groups(tiny_model, calib_ids, method, pattern):
    pat = Pattern.parse(pattern)
    at_once = copy.deepcopy(tiny_model)
    prune_model(at_once, method, pat, 0.5, calib_ids, show_progress=False)
    prune_model(tiny_model, method, pat, 0.5, calib_ids, show_progress=False, true_sequential=True)
    first = prunable_linears(decoder_layers(tiny_model)[0])
    other = prunable_linears(decoder_layers(at_once)[0])
    assert torch.equal(first["self_attn.q_proj"].weight, other["self_attn.q_proj"].weight)  # first group: same inputs
    assert not torch.equal(first["mlp.down_proj"].weight == 0, other["mlp.down_proj"].weight == 0)
    for layer in decoder_layers(tiny_model):
        for name, linear in prunable_linears(layer).items():
            w = linear.weight
            if pat.kind == "nm":
                assert is_valid_nm(w, pat.n, pat.m), name
            if method == "wanda":
                assert int((w == 0).sum()) == w.numel() // 2, name


def test_local_statistics_hold_one_chunk_of_hessians_beside_the_total(tiny_model, monkeypatch):
    """The in-process reduction adds each chunk as it is done: never more than the running total
    and one chunk's partial Hessians are alive (counted with weak references)."""
    import gc
    import weakref

    from asft_ray.pruning import stats as stats_module

    live, peak = [], [0]
    original = stats_module.LayerInputStats.result

    def counting_result(self):
        result = original(self)
        gc.collect()
        live[:] = [r for r in live if r() is not None]
        live.extend(weakref.ref(h) for h in result.hessians.values())
        peak[0] = max(peak[0], len({id(r()) for r in live if r() is not None}))
        return result

    monkeypatch.setattr(stats_module.LayerInputStats, "result", counting_result)
    calib = torch.randint(0, 512, (16, 32), generator=torch.Generator().manual_seed(0))  # 4 chunks
    inputs, args, kwargs = capture_layer0_inputs(tiny_model, calib)
    stats = LocalRunner(inputs, args, kwargs).collect(decoder_layers(tiny_model)[0], hessian=True)
    distinct_inputs = len(stats.hessians)
    assert distinct_inputs == 4
    # the first chunk's partials become the total; later: total + one partial (and the new sum while it is built)
    assert peak[0] <= 3 * distinct_inputs, peak[0]


def test_hessians_add_each_float32_gram_exactly_as_its_float64_copy_would():
    """LayerInputStats adds x^T x (float32) into the float64 total in place, without a float64
    copy of the gram: widening is exact, so the sums are those of adding gram.double()."""
    from asft_ray.pruning.stats import LayerInputStats

    linear = torch.nn.Linear(96, 8)
    g = torch.Generator().manual_seed(3)
    samples = [torch.randn(1, 40, 96, generator=g) * torch.logspace(-3, 3, 96) for _ in range(5)]
    with LayerInputStats({"proj": linear}, hessian=True) as stats:
        for x in samples:
            stats.begin_sample()
            linear(x)
    expected = None
    for x in samples:
        gram = (x.reshape(-1, 96).T @ x.reshape(-1, 96)).double()
        expected = gram if expected is None else expected + gram
    assert torch.equal(stats.result().hessians["proj"], expected)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_the_local_runner_lets_each_dense_weight_go_before_the_next_is_pruned(tiny_model, calib_ids, method):
    """Runner.prune reads the jobs one at a time and yields each pruned weight before it takes the
    next job: a caller that swaps weights as they come never holds two copies of a layer."""
    import gc
    import weakref

    from asft_ray.pruning.engine import LinearJob

    layer = decoder_layers(tiny_model)[0]
    runner = LocalRunner(*capture_layer0_inputs(tiny_model, calib_ids))
    stats = runner.collect(layer, hessian=method == "sparsegpt")
    dense = []

    def jobs():
        for name, linear in prunable_linears(layer).items():
            weight = linear.weight.detach().clone()  # held only by its job
            dense.append(weakref.ref(weight))
            yield LinearJob(name, weight, 0.5)

    for count, (name, pruned) in enumerate(runner.prune(method, Pattern.parse("unstructured"), jobs(), stats), 1):
        gc.collect()
        assert len(dense) == count  # the next job is not read before this weight is taken
        assert all(ref() is None for ref in dense[:-1]), name
        assert pruned.shape == prunable_linears(layer)[name].weight.shape


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_hessian_sums_are_the_whole_products_bits_and_never_hold_a_whole_gram():
    """add_gram and add_hessian_of compute x^T x a block of rows at a time: the same bits as the
    whole float32 product widened and summed (x.T @ x, then .double(), then in order), and their
    memory is the float64 total plus a few blocks, never the whole float32 gram or float64 partial."""
    from asft_ray.pruning.stats import add_gram, add_hessian_of, hessian_of

    def status_mib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

    def grown_by(call):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status_mib("VmRSS")
        call()
        return status_mib("VmHWM") - before

    width, tokens = 3000, 64  # a whole float32 gram is 34 MiB, its float64 copy 69 MiB
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-3, 3, width)
    xs = [torch.randn(tokens, width, generator=g) * scale for _ in range(3)]
    grams = [x.T @ x for x in xs]
    assert torch.equal(hessian_of(xs[:2]), grams[0].double() + grams[1].double())  # 2 samples, in order
    expected = grams[0].double() + (grams[1].double() + grams[2].double())  # total + (a chunk's partial)
    add_hessian_of(hessian_of(xs[:1]), xs[1:2], rows=64)  # warm up the allocator and BLAS on these shapes
    total = hessian_of(xs[:1])
    grown = grown_by(lambda: add_hessian_of(total, xs[1:], rows=64))  # blocks of 64 rows: under 4 MiB each
    assert torch.equal(total, expected)
    one_gram_mib = width * width * 4 / 2**20
    assert grown < 0.25 * one_gram_mib, f"{grown:.1f} MiB"  # a few blocks, not a whole gram
    grown = grown_by(lambda: add_gram(total, xs[0], rows=64))
    assert torch.equal(total, expected + grams[0].double())
    assert grown < 0.25 * one_gram_mib, f"{grown:.1f} MiB"
