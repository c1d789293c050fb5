import torch


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2.

    `input_sq_norms[j]` is the sum over all calibration tokens of x_j^2 (any positive
    scale gives the same ranking within a row).
    """
    return weight.abs() * input_sq_norms.to(weight.dtype).sqrt().unsqueeze(0)
