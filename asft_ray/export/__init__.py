"""Deployment forms of a pruned model: bitmask-compressed files, a structurally smaller model, 2:4 GPU kernels."""
