"""DSnoT-style training-free mask refinement (after Zhang et al., ICLR 2024, "Dynamic Sparse No
Training"): in every output row, repeatedly revive one pruned weight and prune one kept weight
when the swap lowers the row's expected reconstruction error, estimated from input means and
variances only.

For one output row with pruned part d (d_j = W_j where pruned, else 0), the error on an input x
is d·x. With input means mu and variances var, treating input channels as uncorrelated around
their means,

    E[(d·x)^2] ~= e^2 + sum_j d_j^2 var_j,        e = sum_j d_j mu_j

(e is DSnoT's expected reconstruction error; the second term is what Wanda's |W|·||X|| ranks,
less the means). Reviving pruned weight j (a_j = W_j mu_j) changes this by
-2 e a_j + a_j^2 - W_j^2 var_j; then pruning kept weight k, with e' = e - a_j, changes it by
2 e' a_k + W_k^2 E[x_k^2]. Each cycle every row takes its best revival and, given it, its best
pruning (within the same group of m inputs for N:M), and keeps the swap if the sum is negative.
So the count of kept weights per row (and per N:M group) never changes, every accepted swap
lowers the estimate, and a row stops when no swap helps. DSnoT's reference code picks the
revival by sign(e)·W·mu/var and the pruning by Wanda's score among weights of the opposite sign,
with a fixed threshold on |e|; this is the same prune-and-grow driven by the expected error, with
both choices read off one objective.
"""

from __future__ import annotations

import torch


def dsnot_refine(weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, sq_mean: torch.Tensor,
                 group: int | None = None, cycles: int = 50) -> torch.Tensor:
    """The refined keep-mask (True = kept) of one linear.

    weight [rows, cols]; keep [rows, cols] bool; mean[j] = E[x_j] and sq_mean[j] = E[x_j^2] over
    calibration tokens; swaps stay within consecutive groups of `group` inputs (N:M: m; None:
    the whole row); at most `cycles` swaps per row."""
    rows, cols = weight.shape
    group = group or cols
    if cols % group:
        raise ValueError(f"group {group} does not divide the input width {cols}")
    n_groups = cols // group
    w = weight.double()
    mean, sq_mean = mean.double().to(w.device), sq_mean.double().to(w.device)
    var = (sq_mean - mean**2).clamp_min(0)
    a = w * mean  # each weight's expected contribution to the row's output
    revive_base = a * a - w * w * var  # change from reviving j, less the -2 e a_j term
    prune_base = w * w * sq_mean  # change from pruning k, less the 2 e' a_k term
    keep = keep.clone()
    error = torch.where(keep, torch.zeros_like(a), a).sum(1)  # e: dense minus sparse output, expected
    tolerance = 1e-12 * prune_base.sum(1)  # a swap must lower the estimate by more than rounding
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    row_ids = torch.arange(rows, device=w.device)
    grouped_a = a.view(rows, n_groups, group)
    zero = (w == 0).view(rows, n_groups, group)  # never revived: keeping a zero changes nothing (staged runs)
    for _ in range(cycles):
        kept = keep.view(rows, n_groups, group)
        revive = torch.where(kept | zero, inf,
                             -2 * error.view(rows, 1, 1) * grouped_a + revive_base.view(rows, n_groups, group))
        revive_delta, revive_at = revive.min(-1)  # best revival per group
        error_after = error.view(rows, 1) - grouped_a.gather(-1, revive_at.unsqueeze(-1)).squeeze(-1)
        prune = torch.where(kept, 2 * error_after.unsqueeze(-1) * grouped_a + prune_base.view(rows, n_groups, group), inf)
        prune_delta, prune_at = prune.min(-1)  # best pruning per group, given that group's revival
        best, g = (revive_delta + prune_delta).min(-1)
        accept = best < -tolerance
        if not bool(accept.any()):
            break
        r, g = row_ids[accept], g[accept]
        j = g * group + revive_at[r, g]
        k = g * group + prune_at[r, g]
        keep[r, j] = True
        keep[r, k] = False
        error[r] += a[r, k] - a[r, j]
    return keep
