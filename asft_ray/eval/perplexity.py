"""Perplexity with the protocol of the pruning papers (SparseGPT, Wanda).

The text is tokenized once, cut into non-overlapping windows of `seqlen` tokens,
and ppl = exp(mean over windows of the window's mean next-token NLL).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from asft_ray.errors import AsftError
from asft_ray.progress import progress


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, seqlen: int, w: int) -> float:
    """Mean next-token NLL of the w-th non-overlapping window of `seqlen` tokens of `ids` ([1, T] or [T])."""
    x = ids.reshape(-1)[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(next(model.parameters()).device)
    logits = model(input_ids=x, use_cache=False).logits
    return float(F.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="mean"))


def count_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> int:
    """How many whole non-overlapping windows of `seqlen` tokens are evaluated (at most `max_windows`)."""
    windows = ids.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise AsftError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return windows


def ppl_result(nlls: list[float], seqlen: int, seconds: float) -> dict:
    """The protocol's record from the windows' mean NLLs: ppl = exp(mean window NLL)."""
    mean_nll = math.fsum(nlls) / len(nlls)
    return {"ppl": math.exp(mean_nll), "mean_nll": mean_nll, "windows": len(nlls), "tokens": len(nlls) * seqlen,
            "seqlen": seqlen, "seconds": seconds, "window_nll": nlls}


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, show_progress: bool = True) -> dict:
    ids = ids.reshape(-1)
    windows = count_windows(ids, seqlen, max_windows)
    start = time.perf_counter()
    nlls = [window_nll(model, ids, seqlen, w) for w in progress(range(windows), "ppl windows", show_progress)]
    return ppl_result(nlls, seqlen, time.perf_counter() - start)
