"""Masks from scores. A mask is a bool tensor shaped like the weight: True = keep.

Lowest scores are pruned. Ties are broken by position (stable sort), so the same
scores always give the same mask.
"""

from __future__ import annotations

import torch

from asft_ray.config import Pattern
from asft_ray.errors import AsftError


SORT_BLOCK_ELEMENTS = 1 << 20  # scores sorted per call: the sort's int64 indices then take at most 8 MB


def prune_lowest(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Keep-mask over the last dim of `scores` that drops the k lowest entries of every row.

    `k` is one count for all rows, or a tensor with one count per row. Rows are sorted a block
    at a time: a whole-matrix sort would hold int64 indices twice the size of float32 scores
    (92 MB beside a 5632 x 2048 weight). Each row's mask depends on that row alone (a stable
    sort has one answer), so the blocks give the mask one sort would."""
    width = scores.shape[-1]
    rows = scores.reshape(-1, width)
    counts = torch.as_tensor(k, device=scores.device).expand(scores.shape[:-1]).reshape(-1)
    keep = torch.empty(rows.shape, dtype=torch.bool, device=scores.device)
    block = max(1, SORT_BLOCK_ELEMENTS // width)
    positions = torch.arange(width, device=scores.device)
    for start in range(0, rows.shape[0], block):
        part = rows[start : start + block]
        order = torch.sort(part, dim=-1, stable=True).indices
        keep[start : start + block].scatter_(-1, order, (positions >= counts[start : start + block].unsqueeze(-1)).expand_as(part))
    return keep.reshape(scores.shape)


def rows_share(total: int, rows: int) -> torch.Tensor:
    """Split `total` pruned weights over `rows` rows as evenly as possible (first rows take the remainder)."""
    counts = torch.full((rows,), total // rows, dtype=torch.long)
    counts[: total % rows] += 1
    return counts


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Prune exactly round(numel * s) weights: spread evenly over output rows (within one of
    cols * s per row), or the globally lowest of the matrix."""
    total = round(scores.numel() * sparsity)
    if per_row:
        return prune_lowest(scores, rows_share(total, scores.shape[0]))
    return prune_lowest(scores.reshape(1, -1), total).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in every row, each group of m consecutive inputs keeps its n highest scores."""
    rows, cols = scores.shape
    if cols % m:
        raise AsftError(f"pattern {n}:{m} needs the input width to be a multiple of {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    return prune_lowest(groups, m - n).reshape(rows, cols)


def make_mask(scores: torch.Tensor, pattern: Pattern, sparsity: float, per_row: bool = True) -> torch.Tensor:
    if pattern.kind == "nm":
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, sparsity, per_row)


def is_valid_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive inputs in every row has at most n non-zeros."""
    rows, cols = weight.shape
    nonzero = (weight != 0).reshape(rows, cols // m, m).sum(-1)
    return bool((nonzero <= n).all())
