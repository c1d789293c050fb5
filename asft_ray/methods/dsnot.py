"""`+dsnot[:cycles]`: DSnoT-style prune-and-grow refinement of any mask (asft_ray.scoring.dsnot),
from input means and variances; at most `cycles` swaps per output row (default 50, as DSnoT's
max_cycle_time). Sparsity per row and N:M groups are kept exactly."""

from asft_ray.methods.registry import Refinement, register_refinement


def refine(weight, keep, pattern, stats, cycles):
    from asft_ray.scoring.dsnot import dsnot_refine

    tokens = stats["tokens"]
    group = pattern.m if pattern.kind == "nm" else None
    return dsnot_refine(weight, keep, stats["sums"] / tokens, stats["sq_norms"] / tokens, group, cycles)


register_refinement(Refinement("dsnot", needs=("sq_norms", "sums", "tokens"), default=50,
                               summary="prune-and-grow swaps per row from input means/variances", refine=refine))
