"""Least-squares reconstruction of the kept weights for a given mask: SparseGPT's weight update
made exact, usable after any mask.

For one output row w with kept set K and pruned set P, the error on the calibration inputs X is
||X (w - w_hat)||^2 = (w - w_hat)^T H (w - w_hat), H = X^T X. With w_hat zero on P, the best
kept values solve H_KK (w_hat_K - w_K) = H_KP w_P:

    w_hat_K = w_K + H_KK^-1 H_KP w_P

H is dampened as SparseGPT does (percdamp x its mean diagonal added to the diagonal; an input
that is always zero gets diagonal 1). Rows with the same number of kept weights are solved
together, `rows_per_batch` at a time (memory: rows_per_batch x |K| x (|K| + |P|) float64).
"""

from __future__ import annotations

import torch


def dampened(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    return H


def lsq_reconstruct(weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01,
                    rows_per_batch: int = 32) -> torch.Tensor:
    """The pruned weight: zero where `keep` is False, the least-squares values where it is True."""
    W = weight.double()
    H = dampened(hessian.to(W.device), percdamp)
    out = torch.zeros_like(W)
    counts = keep.sum(1)
    for count in counts.unique().tolist():
        if count == 0:
            continue
        same = (counts == count).nonzero().squeeze(1)
        for start in range(0, len(same), rows_per_batch):
            rows = same[start : start + rows_per_batch]
            order = torch.sort((~keep[rows]).to(torch.int8), dim=1, stable=True).indices  # kept columns first
            kept, pruned = order[:, :count], order[:, count:]
            w = W[rows]
            h_kk = H[kept.unsqueeze(2), kept.unsqueeze(1)]
            rhs = H[kept.unsqueeze(2), pruned.unsqueeze(1)] @ w.gather(1, pruned).unsqueeze(2)
            delta = torch.cholesky_solve(rhs, torch.linalg.cholesky(h_kk)).squeeze(2)
            out[rows.unsqueeze(1), kept] = w.gather(1, kept) + delta
    return out.to(weight.dtype)
