"""Gradient-based influence, from gradients of the causal-LM loss on calibration text."""

import torch


def taylor_scores(weight: torch.Tensor, grad_sum: torch.Tensor) -> torch.Tensor:
    """First-order Taylor: |W * dL/dW|, the loss change predicted by removing each weight.

    `grad_sum` is the gradient summed over calibration samples (its scale does not change the ranking).
    """
    return (weight.double() * grad_sum.double()).abs().to(weight.dtype)


def fisher_scores(weight: torch.Tensor, grad_sq_sum: torch.Tensor) -> torch.Tensor:
    """Diagonal Fisher (second order, OBD-style): 1/2 * W^2 * sum_samples (dL/dW)^2."""
    return (0.5 * weight.double() ** 2 * grad_sq_sum.double()).to(weight.dtype)
