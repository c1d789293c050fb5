"""Influence scores: one small pure function per method, over a layer's weight and its statistics.

Higher score = more important = kept. SparseGPT is different: it also updates the
weights it keeps (`sparsegpt.prune`), so it returns the new weight, not a score.
"""

from asft_ray.scoring.gradient import fisher_scores, taylor_scores
from asft_ray.scoring.magnitude import magnitude_scores
from asft_ray.scoring.wanda import wanda_scores

__all__ = ["fisher_scores", "magnitude_scores", "taylor_scores", "wanda_scores"]
