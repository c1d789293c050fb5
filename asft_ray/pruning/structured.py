"""Structured pruning: score and choose whole MLP channels and whole grouped-query attention groups.

A unit is one MLP intermediate channel (gate row, up row and down column together) or one
KV group (a KV head, its k and v rows, the rows of the query heads that share it and their
o_proj columns). Removing a unit is exactly the same as zeroing every weight it owns.

A unit's score is the summed influence of its weights, Wanda-style: sum |W_ij| * ||X_j||,
where X_j is the input that weight multiplies over the calibration tokens (for down_proj and
o_proj columns that is the channel's own activation). Without calibration ||X_j|| = 1 and the
score is the weight magnitude. The lowest-scoring units go.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from asft_ray.errors import AsftError
from asft_ray.models import decoder_layers, prunable_linears
from asft_ray.pruning.stats import InputStats, LayerInputStats


SCORE_BLOCK = 256  # rows (or columns) of a weight scored at a time, in float64


def row_influence(weight: torch.Tensor, sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Per output row: sum_j |W_ij| * ||X_j|| (||X_j|| = 1 without statistics). A block of rows at
    a time: a whole float64 |W| and its product (92 + 92 MB for a 1.57 B model's MLP weights)
    never exist; each row's sum is the same either way."""
    w = weight.detach()
    norm = sq_norm.double().sqrt() if sq_norm is not None else None
    out = torch.empty(w.shape[0], dtype=torch.float64, device=w.device)
    for start in range(0, w.shape[0], SCORE_BLOCK):
        block = w[start : start + SCORE_BLOCK].abs().double()
        out[start : start + SCORE_BLOCK] = (block * norm).sum(1) if norm is not None else block.sum(1)
    return out


def column_influence(weight: torch.Tensor, sq_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Per input column j: ||X_j|| * sum_i |W_ij|. A block of columns at a time (each column's sum
    is the same either way)."""
    w = weight.detach()
    sums = torch.empty(w.shape[1], dtype=torch.float64, device=w.device)
    for start in range(0, w.shape[1], SCORE_BLOCK):
        sums[start : start + SCORE_BLOCK] = w[:, start : start + SCORE_BLOCK].abs().double().sum(0)
    return sums * sq_norm.double().sqrt() if sq_norm is not None else sums


def mlp_channel_scores(mlp: nn.Module, stats: InputStats | None = None) -> torch.Tensor:
    """One score per intermediate channel of a gated MLP (gate_proj, up_proj, down_proj)."""
    sq = (lambda n: stats.sq_norm(n)) if stats is not None else (lambda n: None)
    return (row_influence(mlp.gate_proj.weight, sq("mlp.gate_proj")) + row_influence(mlp.up_proj.weight, sq("mlp.up_proj"))
            + column_influence(mlp.down_proj.weight, sq("mlp.down_proj")))


def attention_group_scores(attn: nn.Module, n_heads: int, n_kv: int, stats: InputStats | None = None) -> torch.Tensor:
    """One score per KV group. Query head h belongs to KV head h // (n_heads / n_kv), as in repeat_kv."""
    sq = (lambda n: stats.sq_norm(n)) if stats is not None else (lambda n: None)
    return (row_influence(attn.q_proj.weight, sq("self_attn.q_proj")).view(n_kv, -1).sum(1)
            + row_influence(attn.k_proj.weight, sq("self_attn.k_proj")).view(n_kv, -1).sum(1)
            + row_influence(attn.v_proj.weight, sq("self_attn.v_proj")).view(n_kv, -1).sum(1)
            + column_influence(attn.o_proj.weight, sq("self_attn.o_proj")).view(n_kv, -1).sum(1))


def keep_count(total: int, ratio: float, what: str) -> int:
    """How many of `total` units stay when a fraction `ratio` is removed (rounded to whole units)."""
    if not 0.0 <= ratio <= 1.0:
        raise AsftError(f"{what} ratio must be between 0 and 1, got {ratio}")
    keep = total - round(total * ratio)
    if keep < 1:
        raise AsftError(f"{what} ratio {ratio} removes all {total} {what} units of a layer; at least one must stay")
    return keep


def top_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the `keep` highest scores; ties go to the lower index."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:keep]).values


def layer_ratios(ratio: float | list[float], n_layers: int, what: str) -> list[float]:
    """One ratio for every layer, or a list with exactly one per layer."""
    if isinstance(ratio, (int, float)):
        return [float(ratio)] * n_layers
    if len(ratio) != n_layers:
        raise AsftError(f"{what} ratio list has {len(ratio)} values, the model has {n_layers} layers")
    return [float(r) for r in ratio]


@torch.no_grad()
def collect_input_norms(model: nn.Module, calib_ids: torch.Tensor, hessian: bool = False) -> list[InputStats]:
    """Summed squared inputs of every decoder linear (and, with `hessian`, sum x x^T per distinct
    input, for the least-squares refit), from one pass of the dense model per window."""
    collectors = [LayerInputStats(prunable_linears(layer), hessian=hessian) for layer in decoder_layers(model)]
    device = next(model.parameters()).device
    with ExitStack() as stack:
        for c in collectors:
            stack.enter_context(c)
        for i in range(calib_ids.shape[0]):
            for c in collectors:
                c.begin_sample()
            model(input_ids=calib_ids[i : i + 1].to(device), use_cache=False)
    return [c.result() for c in collectors]


def loadable_group_counts(hidden: int, heads: int, kv_heads: int) -> list[int]:
    """The KV-group counts a structured model may keep: transformers' Llama config (5.x) refuses a
    number of attention heads (groups x query heads per group) that does not divide hidden_size,
    whatever head_dim says. A 16-head, 2048-wide model may keep 1, 2, 4, 8 or 16 groups, not 15."""
    rep = heads // kv_heads
    return [g for g in range(1, kv_heads + 1) if hidden % (g * rep) == 0]


def unit_counts(cfg, n_layers: int, mlp_ratio: float | list[float] = 0.0,
                head_ratio: float | list[float] = 0.0) -> tuple[list[int], list[int]]:
    """(MLP channels, KV groups) each layer keeps by its own ratio: all a layer's plan needs to know of
    the others. The model's shape keeps the most groups any layer keeps, a loadable count."""
    mlp_counts = [keep_count(cfg.intermediate_size, r, "MLP channel") for r in layer_ratios(mlp_ratio, n_layers, "MLP")]
    group_counts = [keep_count(cfg.num_key_value_heads, r, "attention KV-group")
                    for r in layer_ratios(head_ratio, n_layers, "head")]
    allowed = loadable_group_counts(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads)
    if max(group_counts) not in allowed:
        kv, rep = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
        ratios = ", ".join(f"{(kv - g) / kv:g}" for g in reversed(allowed))
        raise AsftError(f"head ratio keeps {max(group_counts)} of {kv} KV groups, {max(group_counts) * rep} attention "
                        f"heads, which do not divide the hidden size {cfg.hidden_size} (transformers' Llama config "
                        f"requires it); ratios that keep a loadable shape: {ratios}")
    return mlp_counts, group_counts


def plan_layer(layer: nn.Module, cfg, index: int, mlp_counts: list[int], group_counts: list[int],
               stats: InputStats | None = None) -> dict:
    """Layer `index`'s entry of plan_structured, from its own weights and statistics and every layer's counts."""
    mlp_scores = mlp_channel_scores(layer.mlp, stats).cpu()  # plans hold CPU indices whatever the device
    group_scores = attention_group_scores(layer.self_attn, cfg.num_attention_heads, cfg.num_key_value_heads, stats).cpu()
    return {
        "mlp_keep": top_units(mlp_scores, max(mlp_counts)), "mlp_count": mlp_counts[index],
        "mlp_rank": torch.argsort(torch.argsort(mlp_scores, descending=True, stable=True)),
        "groups_keep": top_units(group_scores, max(group_counts)), "groups_count": group_counts[index],
        "groups_rank": torch.argsort(torch.argsort(group_scores, descending=True, stable=True)),
    }


def plan_structured(model: nn.Module, mlp_ratio: float | list[float] = 0.0, head_ratio: float | list[float] = 0.0,
                    stats: list[InputStats] | None = None) -> list[dict]:
    """Per layer: which MLP channels and KV groups stay, ranked by score.

    Returns [{"mlp_keep": idx, "mlp_count": n, "groups_keep": idx, "groups_count": n}]: the
    `*_count` best units of a layer are its own choice; `*_keep` holds the best units up to
    the largest count over all layers, so every layer gets the same shape (an HF config has
    one intermediate_size and one head count). Units in `*_keep` beyond a layer's own count
    are zeroed on export, which is exact: a zero channel or zero group adds nothing."""
    layers = decoder_layers(model)
    mlp_counts, group_counts = unit_counts(model.config, len(layers), mlp_ratio, head_ratio)
    return [plan_layer(layer, model.config, i, mlp_counts, group_counts, stats[i] if stats is not None else None)
            for i, layer in enumerate(layers)]


REFIT_BLOCK = 512  # kept columns (and weight rows) of refit_system's right-hand side computed at a time


def refit_system(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, damp: float = 0.01,
                 consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """refit_columns' linear system in the Hessian's dtype (float64; float32 for a 16-bit linear,
    stats.hessian_dtype): (H[keep, keep] dampened, W H[:, keep]); `keep` ascending.

    Built without a wide copy of W or of H[:, keep] (for a 1.57 B model's down_proj: 92 and
    127 MB beside its 254 MB float64 Hessian): the right-hand side a block of REFIT_BLOCK x
    REFIT_BLOCK at a time, each entry the same whole-length product as in one matrix product.
    `consume`: the caller no longer needs `hessian`, so H[keep, keep] is written into its own
    memory instead of a new matrix (the same values)."""
    h = hessian if hessian.dtype in (torch.float32, torch.float64) else hessian.double()
    keep = keep.to(h.device)
    w = weight.detach()
    rhs = torch.empty(w.shape[0], len(keep), dtype=h.dtype, device=h.device)
    for start in range(0, len(keep), REFIT_BLOCK):
        columns = h[:, keep[start : start + REFIT_BLOCK]]
        for row in range(0, w.shape[0], REFIT_BLOCK):
            rhs[row : row + REFIT_BLOCK, start : start + REFIT_BLOCK] = w[row : row + REFIT_BLOCK].to(h.dtype) @ columns
    in_place = consume and h is hessian and h.is_contiguous() and bool((keep[1:] > keep[:-1]).all())
    h_kept = _kept_in_place(h, keep) if in_place else h[keep.unsqueeze(1), keep]
    h_kept.diagonal().add_(damp * h_kept.diagonal().mean().clamp_min(1e-12))
    return h_kept, rhs


def _kept_in_place(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """h[keep][:, keep] (keep ascending) in the first len(keep)^2 elements of h's own memory.
    Blocks of rows in increasing order: block [i, i + b) is read whole before it writes elements
    [i k, (i + b) k), and every row a later block reads starts at keep[i + b] n >= (i + b) k."""
    k, flat = len(keep), h.view(-1)
    for i in range(0, k, REFIT_BLOCK):
        block = h[keep[i : i + REFIT_BLOCK]].index_select(1, keep)  # a copy: read before anything is written
        flat[i * k : i * k + block.numel()] = block.reshape(-1)
    return flat[: k * k].view(k, k)


def solve_refit(h_kept: torch.Tensor, rhs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The refit weight (out x kept) from refit_system's (h_kept, rhs), which it overwrites.

    torch.linalg.solve(h_kept, rhs.T).T, computed in place: LAPACK reads column-major matrices,
    and a symmetric h_kept read column-major (its .mT, a view) is the same matrix, as rhs read
    column-major is rhs.T; so the same LU factorisation and solve run on the same values without
    the two copies torch would make (the same bits: tests/test_structured.py). Not symmetric, or
    not on the CPU: the plain call."""
    if h_kept.device.type == "cpu" and torch.equal(h_kept, h_kept.mT):
        lu, b = h_kept.mT, rhs.mT
        pivots = torch.empty(lu.shape[0], dtype=torch.int32)
        info = torch.empty((), dtype=torch.int32)
        torch.linalg.lu_factor_ex(lu, out=(lu, pivots, info))
        if info.item():
            raise torch.linalg.LinAlgError(f"the refit's dampened Hessian is singular (pivot {info.item()})")
        torch.linalg.lu_solve(lu, pivots, b, out=b)
        return rhs.to(dtype)
    return torch.linalg.solve(h_kept, rhs.T).T.to(dtype)


def refit_columns(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The weight on the kept input columns that best reproduces the layer's output with all of them:
    W' = argmin sum_t ||W x_t - W' x_t[keep]||^2 = W H[:, keep] H[keep, keep]^-1, with H = sum_t x_t x_t^T
    (dampened by `damp` x the mean of its kept diagonal, as SparseGPT does). Plain removal keeps
    W[:, keep] instead; the refit is never worse on the calibration inputs (up to the damping)."""
    return solve_refit(*refit_system(weight, hessian, keep, damp), weight.dtype)


def block_influence(inputs: torch.Tensor, outputs: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of 1 - cos(x_in, x_out), tokens): ShortGPT's block influence of one decoder
    layer, summed so that windows add up. A layer that barely changes its input scores near 0."""
    x, y = inputs.reshape(-1, inputs.shape[-1]).double(), outputs.reshape(-1, outputs.shape[-1]).double()
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    return float((1 - cos).sum()), cos.numel()


def mean_block_influence(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """block_influence of one layer over the calibration samples (its inputs and outputs, sample by
    sample), added in sample order as block_influences adds them."""
    total, count = 0.0, 0
    for x, y in zip(inputs, outputs):
        part, tokens = block_influence(x, y)
        total += part
        count += tokens
    return total / count


@torch.no_grad()
def block_influences(model: nn.Module, calib_ids: torch.Tensor) -> list[float]:
    """Mean block influence of every decoder layer over the calibration windows (dense model)."""
    sums = [[0.0, 0] for _ in decoder_layers(model)]

    def hook(index):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            total, count = block_influence(x, y)
            sums[index][0] += total
            sums[index][1] += count
        return record

    device = next(model.parameters()).device
    with ExitStack() as stack:
        for i, layer in enumerate(decoder_layers(model)):
            stack.callback(layer.register_forward_hook(hook(i), with_kwargs=True).remove)
        for i in range(calib_ids.shape[0]):
            model(input_ids=calib_ids[i : i + 1].to(device), use_cache=False)
    return [total / count for total, count in sums]


def layers_to_drop(influences: list[float], count: int) -> list[int]:
    """The `count` layers of lowest block influence (ties: the later layer goes first), ascending."""
    if not 0 <= count < len(influences):
        raise AsftError(f"can drop 0 to {len(influences) - 1} of the model's {len(influences)} layers, not {count}")
    order = sorted(range(len(influences)), key=lambda i: (influences[i], -i))
    return sorted(order[:count])
