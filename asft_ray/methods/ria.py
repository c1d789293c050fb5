"""RIA (Zhang et al., ICLR 2024): relative importance times ||X||^0.5, compared per output row.

N:M keeps the n best of each group of m inputs. The paper's channel permutation for N:M is the
engine's `channel_permutation` (pruning/permute.py), in a deployable form: MLP channels only."""

from asft_ray.methods.registry import Method, register


def score(weight, stats):
    from asft_ray.scoring.ria import ria_scores

    return ria_scores(weight, stats["sq_norms"])


register(Method("ria", needs=("sq_norms",), compare="row", summary="(|W|/Σrow + |W|/Σcol)·‖X‖^0.5", score=score))
