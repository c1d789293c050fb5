"""`+obs`: SparseGPT's weight update (OBS, column by column, blocked and dampened) for the mask of
any method, the cheap approximation of `+lsq` (one Cholesky factor per linear instead of one
solve per row). The last step of a method string: `wanda+obs`, `ria+dsnot+obs`."""

from asft_ray.methods.registry import Refinement, register_refinement


def refine(weight, keep, pattern, stats, setting):
    from asft_ray.scoring import sparsegpt

    return sparsegpt.prune(weight, stats["hessian"], 0.0, pattern, keep=keep,
                           consume_hessian=stats.get("consume_hessian", False))


register_refinement(Refinement("obs", needs=("hessian",), changes="weights",
                               summary="SparseGPT's weight update for the given mask", refine=refine))
