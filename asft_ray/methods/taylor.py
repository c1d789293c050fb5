"""First-order Taylor |W·∂L/∂W| from summed gradients of the LM loss, compared per output row."""

from asft_ray.methods.registry import Method, register


def score(weight, stats):
    from asft_ray.scoring.gradient import taylor_scores

    return taylor_scores(weight, stats["grad_sum"])


register(Method("taylor", needs=("grad_sum",), compare="row", summary="|W·∂L/∂W|", score=score))
