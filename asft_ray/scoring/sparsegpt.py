"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with the weight update, column block by block.

`prune(W, H, ...)` takes one Linear's weight [rows, cols] and H = sum_tokens x x^T [cols, cols]
and returns the pruned, updated weight. It follows the reference implementation
(blocked, dampened, adaptive mask per block of 128 columns), with one difference: the
number of weights pruned per block is exact (k lowest), not a `<=` threshold.

With `keep` (a keep-mask from any method), the mask is taken as given and only SparseGPT's
weight update runs: the `+obs` refinement.
"""

from __future__ import annotations

import torch

from asft_ray.config import Pattern
from asft_ray.pruning.masks import prune_lowest


def inverse_hessian_cholesky(hessian: torch.Tensor, weight: torch.Tensor, percdamp: float,
                              consume: bool = False) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1; zeroes weight columns whose input is always zero.
    Factored in float64, or in float32 for a float32 Hessian (a 16-bit linear's: stats.hessian_dtype).
    `consume`: the caller no longer needs `hessian`, so it is factored in its own memory instead of
    a copy (the same bits: the copy would be factored the same way)."""
    dtype = torch.float32 if hessian.dtype == torch.float32 else torch.float64
    H = hessian if consume and hessian.dtype == dtype else hessian.to(dtype, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    weight[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    if H.device.type == "cpu" and torch.equal(H, H.mT):  # (checked bit-identical on CPU LAPACK only)
        return _factor_in_place(H)
    # one step at a time, so that at most two cols x cols matrices are alive
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    return torch.linalg.cholesky(H, upper=True)


def _factor_in_place(H: torch.Tensor) -> torch.Tensor:
    """cholesky(cholesky_inverse(cholesky(H)), upper=True) in H's own memory: one cols x cols
    matrix instead of two (8 x 5632^2 bytes less for a 5632-wide float64 input).

    LAPACK works on column-major matrices, so torch copies a row-major H into a column-major
    buffer for each of the three steps. A symmetric H read column-major (H.mT, a view) is the very
    same matrix, so each step runs the same LAPACK routine on the same values in place: the
    result is bit-identical to the three out-of-place calls (tests/test_scoring.py). The caller
    checks that H is exactly symmetric (the sums of x^T x are, in practice); if not, it uses the
    out-of-place path."""
    view, info = H.mT, torch.empty((), dtype=torch.int32, device=H.device)
    torch.linalg.cholesky_ex(view, out=(view, info))
    if info.item():
        raise torch.linalg.LinAlgError(f"the dampened Hessian is not positive definite (leading minor {info.item()})")
    torch.cholesky_inverse(view, out=view)
    torch.linalg.cholesky_ex(view, upper=True, out=(view, info))
    if info.item():
        raise torch.linalg.LinAlgError(f"the inverse Hessian is not positive definite (leading minor {info.item()})")
    return view  # column-major, as the out-of-place steps return it


def _narrow_in_place(factor: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """The float32, row-major copy of an upper-triangular, column-major factor (float64 or float32),
    written into the factor's own memory instead of a new cols x cols float32 matrix (127 MB for a
    5632-wide input). Blocks of rows go in increasing order: block [i, i + rows) reads the factor's
    columns >= i (its upper part; the lower part is exactly +0.0 and is written as zeros) and writes
    over bytes that held columns < i + rows (float32; < (i + rows) / 2 from float64), which later
    blocks no longer read. The same values as factor.float(), bit for bit (tests/test_scoring.py)."""
    n = factor.shape[0]
    out = torch.empty(0, dtype=torch.float32, device=factor.device)
    out.set_(factor.untyped_storage(), 0, (n, n), (n, 1))
    for i in range(0, n, rows):
        block = factor[i : i + rows, i:].to(torch.float32, copy=True)  # read before this block writes anything
        out[i : i + rows, :i] = 0
        out[i : i + rows, i:] = block
    return out


def prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    keep: torch.Tensor | None = None,
    consume_hessian: bool = False,
) -> torch.Tensor:
    W = weight.detach().to(torch.float32, copy=True)  # one float32 copy, whatever the weight's dtype
    rows, cols = W.shape
    Hinv = inverse_hessian_cholesky(hessian, W, percdamp, consume_hessian)
    # the loop reads rows of the factor: a row-major float32 working matrix (reading LAPACK's
    # column-major float32 result in place made a solve 1.4-1.6 x slower: BENCHMARKS.md)
    if consume_hessian and Hinv.stride() == (1, cols):  # the caller's H, factored in place
        Hinv = _narrow_in_place(Hinv)
    else:  # a copy; the factor is freed here
        Hinv = torch.empty(Hinv.shape, dtype=W.dtype, device=W.device).copy_(Hinv)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        # saliency w^2 / [H^-1]_jj^2 decides the mask; pruned = True
        if keep is not None:
            pruned = ~keep[:, i1:i2].to(W.device)
        elif pattern.kind == "unstructured":
            saliency = W1**2 / d.unsqueeze(0) ** 2
            pruned = ~prune_lowest(saliency.reshape(1, -1), round(saliency.numel() * sparsity)).reshape(W1.shape)
        else:
            pruned = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if keep is None and pattern.kind == "nm" and i % pattern.m == 0:
                saliency = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].unsqueeze(0) ** 2
                pruned[:, i : i + pattern.m] = ~prune_lowest(saliency, pattern.m - pattern.n)
            w = W1[:, i]
            q = torch.where(pruned[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)  # -= Err1 @ Hinv[...] without a product as large as W: same bits
    return W.to(weight.dtype)
