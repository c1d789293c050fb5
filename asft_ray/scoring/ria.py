"""RIA, Relative Importance and Activations (Zhang et al., ICLR 2024).

score_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||^a

the weight's share of its output row plus its share of its input column, times the input
channel's activation norm to the power `a` (0.5 in the paper). An all-zero row or column
contributes 0 (not NaN).
"""

import torch


def ria_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """`input_sq_norms[j]` = sum over calibration tokens of x_j^2 (so ||X_j|| is its square root;
    a common scale of all columns does not change any ranking)."""
    w = weight.double().abs()
    tiny = torch.finfo(torch.float64).tiny
    row_share = w / w.sum(dim=1, keepdim=True).clamp_min(tiny)
    column_share = w / w.sum(dim=0, keepdim=True).clamp_min(tiny)
    activation = input_sq_norms.double().sqrt().pow(power).unsqueeze(0)
    return ((row_share + column_share) * activation).float()
