"""`+lsq`: least-squares values for the kept weights of any mask (asft_ray.scoring.lsq), from the
layer's input Hessian (collected as for SparseGPT, dampened the same way). The last step of a
method string: `wanda+lsq`, `ria+dsnot+lsq`, `sparsegpt+lsq`."""

from asft_ray.methods.registry import Refinement, register_refinement


def refine(weight, keep, pattern, stats, setting):
    from asft_ray.scoring.lsq import lsq_reconstruct

    return lsq_reconstruct(weight, keep, stats["hessian"])


register_refinement(Refinement("lsq", needs=("hessian",), changes="weights",
                               summary="least-squares values of the kept weights on the calibration inputs",
                               refine=refine))
