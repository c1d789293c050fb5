"""Magnitude |W|: no data; compared across the whole matrix."""

from asft_ray.methods.registry import Method, register


def score(weight, stats):
    from asft_ray.scoring.magnitude import magnitude_scores

    return magnitude_scores(weight)


register(Method("magnitude", needs=(), compare="matrix", summary="|W|", score=score))
