import math

import pytest
import torch

from asft_ray.eval.perplexity import perplexity
from asft_ray.eval.sparsity import model_sparsity
from asft_ray.models import decoder_layers


@torch.no_grad()
def hand_perplexity(model, ids: torch.Tensor, seqlen: int) -> float:
    """exp of the mean, over windows, of the mean next-token NLL, one token at a time."""
    window_means = []
    for w in range(ids.numel() // seqlen):
        x = ids[w * seqlen : (w + 1) * seqlen]
        logits = model(input_ids=x[None]).logits[0]
        nll = [-torch.log_softmax(logits[t].double(), -1)[x[t + 1]].item() for t in range(seqlen - 1)]
        window_means.append(sum(nll) / len(nll))
    return math.exp(sum(window_means) / len(window_means))


def test_perplexity_equals_a_hand_computation_on_a_tiny_text(tiny_model):
    ids = torch.tensor([[5, 17, 42, 7, 7, 99, 3, 250, 11, 12, 13, 14, 15, 2]])  # 14 tokens: 3 windows of 4, 2 left over
    result = perplexity(tiny_model, ids, seqlen=4, show_progress=False)
    assert result["windows"] == 3 and result["tokens"] == 12
    assert math.isclose(result["ppl"], hand_perplexity(tiny_model, ids.reshape(-1)[:12], 4), rel_tol=1e-5)


def test_max_windows_uses_only_the_first_windows(tiny_model):
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    full = perplexity(tiny_model, ids, seqlen=8, show_progress=False)
    first2 = perplexity(tiny_model, ids, seqlen=8, max_windows=2, show_progress=False)
    assert first2["windows"] == 2 and full["windows"] == 5
    assert first2["window_nll"] == full["window_nll"][:2]
    assert math.isclose(first2["ppl"], hand_perplexity(tiny_model, ids.reshape(-1)[:16], 8), rel_tol=1e-5)


def test_model_sparsity_counts_exact_zeros(tiny_model):
    assert model_sparsity(tiny_model)["total"] == 0.0
    q = decoder_layers(tiny_model)[1].self_attn.q_proj.weight
    with torch.no_grad():
        q[:, :16] = 0  # a quarter of a 64x64 matrix
    result = model_sparsity(tiny_model)
    assert result["layers"][0] == 0.0
    assert result["layers"][1] == 1024 / result["prunable_weights"] * 2
    assert math.isclose(result["total"], 1024 / result["prunable_weights"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.bool])
def test_count_zeros_is_what_equality_with_zero_counts(dtype):
    from asft_ray.eval.sparsity import count_zeros

    t = torch.randn(37, 53, generator=torch.Generator().manual_seed(0))
    t[::3, ::2] = 0.0
    t[1, :5] = -0.0  # a zero too
    if dtype.is_floating_point:
        t[2, 1] = float("nan")  # not a zero
    t = t.to(dtype)
    assert count_zeros(t) == int((t == 0).sum()) > 0
