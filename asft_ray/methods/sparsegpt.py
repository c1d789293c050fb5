"""SparseGPT (Frantar & Alistarh 2023): OBS with the weight update, per block of 128 columns."""

from asft_ray.methods.registry import Method, register


def prune(weight, pattern, sparsity, stats):
    from asft_ray.scoring import sparsegpt

    return sparsegpt.prune(weight, stats["hessian"], sparsity, pattern, consume_hessian=stats.get("consume_hessian", False))


register(Method("sparsegpt", needs=("hessian",), compare="block", summary="OBS with the weight update", prune=prune))
