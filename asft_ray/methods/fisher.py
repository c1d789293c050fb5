"""Diagonal Fisher ½W²·Σ(∂L/∂W)², compared per output row."""

from asft_ray.methods.registry import Method, register


def score(weight, stats):
    from asft_ray.scoring.gradient import fisher_scores

    return fisher_scores(weight, stats["grad_sq_sum"])


register(Method("fisher", needs=("grad_sq_sum",), compare="row", summary="½W²·Σ(∂L/∂W)²", score=score))
