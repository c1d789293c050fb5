"""Wanda (Sun et al. 2023): |W| * ||X||, compared per output row."""

from asft_ray.methods.registry import Method, register


def score(weight, stats):
    from asft_ray.scoring.wanda import wanda_scores

    return wanda_scores(weight.float(), stats["sq_norms"])  # float32 scores for 16-bit weights too


register(Method("wanda", needs=("sq_norms",), compare="row", summary="|W|·‖X‖", score=score))
