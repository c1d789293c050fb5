"""OWL: outlier-weighted layerwise sparsity (Yin et al., 2023).

Layers whose Wanda scores |W|·‖X‖ hold more outliers (scores above M times the layer's
mean) matter more, so they keep more weights. The layer sparsities spread over
target ± lambda and average to the target (the budget fit then makes it exact).
As in the OWL reference code, the statistics come from the *dense* model: calibration
inputs go through each layer unpruned.
"""

from __future__ import annotations

import math

import torch

from asft_ray.models import decoder_layers, prunable_linears
from asft_ray.progress import progress
from asft_ray.scoring import wanda_scores

M_GRID = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0)  # outlier thresholds measured in one pass (a sweep may pick any)
CHUNK = 1 << 20  # score entries held in float64 at a time (8 MiB)


def ratios_of(pieces, ms) -> dict[float, float]:
    """{m: fraction of all the entries above m times their mean}, over the float64 tensors that
    `pieces()` yields (called twice: for the mean, then for the counts), so they need not be whole
    in memory at once."""
    sums, count = [], 0
    for piece in pieces():
        sums.append(float(piece.sum()))
        count += piece.numel()
    mean = math.fsum(sums) / count
    above = dict.fromkeys(ms, 0)
    for piece in pieces():
        for m in above:
            above[m] += int((piece > m * mean).sum())
    return {m: above[m] / count for m in ms}


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    """Fraction of entries of `scores` above m times their mean."""
    return ratios_of(lambda: [scores.double()], [m])[m]


def score_chunks(layer, stats):
    """The Wanda scores |W|·‖X‖ of one decoder layer's linears, one linear at a time, in float64
    pieces of at most CHUNK entries: the layer's scores are never whole in memory (as one float64
    vector they would be twice the layer's fp32 bytes)."""
    for name, lin in prunable_linears(layer).items():
        for piece in wanda_scores(lin.weight.data, stats.sq_norm(name)).flatten().split(CHUNK):
            yield piece.double()


def layer_ratios(layer, stats, ms) -> dict[float, float]:
    """{m: outlier_ratio of all the layer's Wanda scores together}, read piece by piece."""
    return ratios_of(lambda: score_chunks(layer, stats), ms)


@torch.no_grad()
def layer_outlier_ratios(model, runner, ms=M_GRID, show_progress: bool = True,
                         layer_store=None) -> dict[float, list[float]]:
    """{m: [outlier ratio of each decoder layer]} from one pass of the calibration inputs
    through the dense layers. `runner` is the engine's LocalRunner or a ShardedRunner; with a
    read-only `layer_store` (pruning.streaming.StreamedLayers) each layer is read from disk and
    dropped again, so a streamed model is never whole in memory."""
    ratios = {float(m): [] for m in ms}
    for index, layer in enumerate(progress(decoder_layers(model), "owl outliers", show_progress)):
        if layer_store is not None:
            layer_store.load(index, layer)
        for m, ratio in layer_ratios(layer, runner.collect(layer, hessian=False), ratios).items():
            ratios[m].append(ratio)
        runner.advance(layer)  # dense outputs feed the next layer
        if layer_store is not None:
            layer_store.free(index, layer)
    return ratios


def owl_sparsities(outlier_ratios: list[float], target: float, lam: float) -> list[float]:
    """OWL's layer sparsities: outlier ratios rescaled to [0, 2·lambda], centred, subtracted from the target."""
    r = torch.tensor(outlier_ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread * (2 * lam) if spread > 0 else torch.zeros_like(r)
    return [float(target - (s - scaled.mean())) for s in scaled]


def nearest_m(ratios: dict, m: float) -> float:
    """The measured threshold closest to `m` (keys of layer_outlier_ratios' result, possibly JSON strings)."""
    return min(ratios, key=lambda k: abs(float(k) - m))
