"""Channel permutation for N:M (after RIA, Zhang et al., ICLR 2024), in the form a model can ship.

N:M keeps n of each group of m consecutive inputs of a row. When the important input channels of
a linear sit next to each other, their groups must drop some of them; reordering the inputs so
that every group mixes strong and weak channels keeps more of what matters. RIA permutes every
linear's inputs, which a runtime would have to undo with an index-select of the activations.
This module permutes only what costs nothing: the intermediate channels of a gated MLP. Reordering
gate_proj's and up_proj's rows together with down_proj's columns gives the same function (every
channel keeps its own gate, up and down weights), and it moves no N:M group of gate/up (their
groups run along the hidden inputs, which do not move). So down_proj, the MLP's widest input, gets
a permutation chosen for its N:M groups, and the saved model is an ordinary dense-layout model.

The same holds inside attention for o_proj: its inputs are the heads' outputs, each a weighting
of its KV head's value vectors, so reordering the dimensions of one KV head (its v_proj rows)
reorders the matching o_proj columns of every query head that shares it. One order per KV head,
chosen over the o_proj columns of all its query heads at once (rotary embeddings touch q and k only).

The permutation is chosen from Wanda's scores |W_ij| * ||X_j|| of down_proj: channels are dealt
to groups in snake order of their summed score (the strongest m/n... spread one per group), then
pairs of channels in different groups are swapped while that raises the score the N:M mask keeps.
"""

from __future__ import annotations

import torch
from torch import nn

REFINE_ROWS = 1024  # rows of the score matrix the swap search evaluates (evenly spaced); all when fewer
SHIFTS = 4  # group offsets the swap search tries (m*m slot pairs each)


def retained(scores: torch.Tensor, order: torch.Tensor, n: int, m: int) -> float:
    """The summed score an n:m mask keeps of `scores` [rows, inputs] with its inputs in `order`."""
    grouped = scores[:, order].view(scores.shape[0], -1, m)
    return grouped.topk(n, dim=2).values.sum().item()


def snake_order(column_importance: torch.Tensor, m: int) -> torch.Tensor:
    """Inputs dealt to groups of m: ranked by importance, rank r goes to group r mod G on even
    passes and G - 1 - (r mod G) on odd ones, so each group gets one channel of every tier."""
    width = column_importance.numel()
    groups = width // m
    ranked = torch.sort(column_importance, descending=True, stable=True).indices
    rank = torch.arange(width)
    tier, k = rank // groups, rank % groups
    group = torch.where(tier % 2 == 0, k, groups - 1 - k)
    order = torch.empty(width, dtype=torch.long)
    order[group * m + tier] = ranked
    return order


def _group_keep(grouped: torch.Tensor, n: int) -> torch.Tensor:
    """Per group: the summed top-n score over rows. grouped: [rows, G, m] -> [G]."""
    return grouped.topk(n, dim=2).values.sum(dim=(0, 2))


@torch.no_grad()
def refine_order(scores: torch.Tensor, order: torch.Tensor, n: int, m: int, shifts: int = SHIFTS,
                 rounds: int = 1) -> torch.Tensor:
    """Swap inputs between groups while the kept score rises. Each step tries, for one group
    offset s (1..`shifts`) and one pair of slots (a, b), the swap of slot a of every group g with
    slot b of group g + s, all groups at once; the gaining swaps are applied greedily, largest gain
    first, with each group in at most one swap per step. `rounds` passes over every offset and slot pair."""
    scores = sampled_rows(scores).double()  # the search reads a fixed subset of rows
    order = order.clone()
    groups = order.numel() // m
    for _ in range(rounds):
        improved = False
        for shift in range(1, min(groups, shifts + 1)):
            for a in range(m):
                for b in range(m):
                    grouped = scores[:, order].view(scores.shape[0], groups, m)
                    base = _group_keep(grouped, n)
                    partner = torch.roll(torch.arange(groups), -shift)  # group g swaps with g + shift
                    mine, theirs = grouped.clone(), grouped[:, partner].clone()
                    mine[:, :, a] = grouped[:, partner, b]
                    theirs[:, :, b] = grouped[:, :, a]
                    gain = _group_keep(mine, n) + _group_keep(theirs, n) - base - base[partner]
                    if not (gain > 1e-12).any():
                        continue
                    used = torch.zeros(groups, dtype=torch.bool)
                    for g in torch.argsort(gain, descending=True).tolist():
                        if gain[g] <= 1e-12:
                            break
                        p = int(partner[g])
                        if used[g] or used[p]:
                            continue
                        used[g] = used[p] = True
                        i, j = g * m + a, p * m + b
                        order[i], order[j] = order[j].clone(), order[i].clone()
                        improved = True
        if not improved:
            break
    return order


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j|| in float64 on the CPU (sq_norms[j] = sum of x_j^2 over the calibration tokens)."""
    return weight.detach().abs().double().cpu() * sq_norms.double().cpu().sqrt().unsqueeze(0)


def sampled_rows(weight: torch.Tensor) -> torch.Tensor:
    """At most REFINE_ROWS evenly spaced rows of `weight` (all of them when it has fewer)."""
    if weight.shape[0] <= REFINE_ROWS:
        return weight
    return weight[torch.linspace(0, weight.shape[0] - 1, REFINE_ROWS).long().to(weight.device)]


@torch.no_grad()
def column_importance(weight: torch.Tensor, sq_norms: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """sum_i |W_ij| * ||X_j|| per input j, in float64 on the CPU, a block of rows at a time (no
    full-size temporary: a 70 B down_proj is 0.9 GB in float32)."""
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for rows in weight.split(block):
        total += rows.abs().sum(0, dtype=torch.float64)
    return total.cpu() * sq_norms.double().cpu().sqrt()


def mlp_order(down_weight: torch.Tensor, sq_norms: torch.Tensor, n: int, m: int,
              shifts: int = SHIFTS) -> tuple[torch.Tensor, float]:
    """The order (on the CPU) of a gated MLP's intermediate channels for down_proj's n:m groups,
    and the relative gain in the score an n:m mask keeps, measured on sampled_rows (exact when
    the weight has at most REFINE_ROWS rows)."""
    sample = wanda_scores(sampled_rows(down_weight), sq_norms)
    order = refine_order(sample, snake_order(column_importance(down_weight, sq_norms), m), n, m, shifts)
    before = retained(sample, torch.arange(order.numel()), n, m)
    return order, (retained(sample, order, n, m) / before - 1.0) if before else 0.0


def attention_orders(o_weight: torch.Tensor, sq_norms: torch.Tensor, n_heads: int, n_kv: int, n: int, m: int,
                     shifts: int = SHIFTS) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(o_proj column order, v_proj row order, relative kept-score gain) for o_proj's n:m groups:
    one order of head_dim per KV head, applied to its v rows and to the o_proj columns of each
    query head h that reads it (h // (n_heads / n_kv), as in repeat_kv). The gain is measured as
    in mlp_order."""
    head_dim, rep = o_weight.shape[1] // n_heads, n_heads // n_kv
    sample = wanda_scores(sampled_rows(o_weight), sq_norms)
    kv_orders = []
    for kv in range(n_kv):  # the query heads of this KV head stacked as rows: one order serves them all
        block = torch.cat([sample[:, h * head_dim:(h + 1) * head_dim] for h in range(kv * rep, (kv + 1) * rep)])
        kv_orders.append(refine_order(block, snake_order(block.sum(0), m), n, m, shifts))
    o_order = torch.cat([h * head_dim + kv_orders[h // rep] for h in range(n_heads)])
    v_order = torch.cat([kv * head_dim + order for kv, order in enumerate(kv_orders)])
    before = retained(sample, torch.arange(o_order.numel()), n, m)
    return o_order, v_order, (retained(sample, o_order, n, m) / before - 1.0) if before else 0.0


@torch.no_grad()
def permute_attention_values(attn: nn.Module, o_order: torch.Tensor, v_order: torch.Tensor) -> None:
    """Reorder v_proj's rows and o_proj's columns in place: the same function, new layout."""
    v, o = attn.v_proj, attn.o_proj
    v.weight.data = v.weight.data[v_order.to(v.weight.device)].contiguous()
    if v.bias is not None:
        v.bias.data = v.bias.data[v_order.to(v.bias.device)].contiguous()
    o.weight.data = o.weight.data[:, o_order.to(o.weight.device)].contiguous()


@torch.no_grad()
def permute_mlp(mlp: nn.Module, order: torch.Tensor) -> None:
    """Reorder a gated MLP's intermediate channels in place: the same function, new layout."""
    order = order.to(mlp.down_proj.weight.device)
    for linear in (mlp.gate_proj, mlp.up_proj):
        linear.weight.data = linear.weight.data[order].contiguous()
        if linear.bias is not None:
            linear.bias.data = linear.bias.data[order].contiguous()
    mlp.down_proj.weight.data = mlp.down_proj.weight.data[:, order].contiguous()
