"""Fixed sparsity masks for recovery: where they come from, and how they stay enforced.

A mask is a bool tensor shaped like its weight, True where the weight may train.
Enforcement is by the gradient, not the weight: the weights are masked once, and a hook
multiplies every gradient by the mask before anything else sees it. Then the optimizer
(AdamW: zero gradient -> zero moments -> zero update; decoupled decay of 0 is 0), gradient
accumulation, clipping and DeepSpeed's fp32 master copy all keep masked entries at exactly 0.
Re-zeroing the weights after each step instead would leave ZeRO-3's master copy unmasked.

Masks are made as bool tensors and kept bit-packed (`PackedMask`, 1 bit per weight instead of
1 byte): whole ones for ZeRO-2, where every worker holds whole weights anyway; under ZeRO-3
each worker keeps only its partition's mask (zero3.py). A packed mask is unpacked one
parameter at a time where it is used (one gradient, one report), so the byte-per-weight form
never exists for the whole model. Either way a mask lives on its weight's device, so the hook
never moves data between devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from asft_ray.errors import AsftError
from asft_ray.models import decoder_layers, prunable_linears


def _bit_values(device) -> torch.Tensor:
    return torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=device)


@dataclass(frozen=True)
class PackedMask:
    """A bool mask stored 8 entries per byte (first entry in the high bit), on the mask's device.
    `numel` entries, flattened in row-major order; `keeps_all`: no entry is False."""

    bits: torch.Tensor
    numel: int
    keeps_all: bool

    @classmethod
    def pack(cls, mask: torch.Tensor) -> "PackedMask":
        flat = mask.reshape(-1)
        pad = (-flat.numel()) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        weighted = flat.view(-1, 8).to(torch.uint8) * _bit_values(flat.device)
        return cls(weighted.sum(dim=1, dtype=torch.uint8), mask.numel(), bool(mask.all()))

    def unpack(self, shape=None) -> torch.Tensor:
        """The bool mask, flat or in `shape` (a new tensor each call)."""
        flat = (self.bits.unsqueeze(1) & _bit_values(self.bits.device)).ne(0).reshape(-1)[: self.numel]
        return flat if shape is None else flat.view(shape)

    @property
    def nbytes(self) -> int:
        return self.bits.numel()


def pack_masks(masks: dict[str, torch.Tensor]) -> dict[str, PackedMask]:
    return {name: PackedMask.pack(mask) for name, mask in masks.items()}


def linear_weight_names(model: nn.Module) -> list[str]:
    """Parameter names of the decoder layers' linear weights (the ones pruning made sparse)."""
    layers = decoder_layers(model)
    prefix = {id(m): name for name, m in model.named_modules()}[id(layers)]
    return [
        f"{prefix}.{i}.{name}.weight" for i, layer in enumerate(layers) for name in prunable_linears(layer)
    ]


def masks_from_zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks of the decoder linears from the model's exact zeros. A model with none is not pruned."""
    params = dict(model.named_parameters())
    masks = {name: params[name].detach() != 0 for name in linear_weight_names(model)}
    require_zeros(not all(bool(m.all()) for m in masks.values()))
    return masks


def require_zeros(has_zeros: bool) -> None:
    """A student without a single zero in its decoder linears was not pruned: nothing to keep."""
    if not has_zeros:
        raise AsftError(
            "the model has no zero weights in its decoder linears, so there is no sparsity to keep: "
            "prune it first (asft prune) or pass --mask-file"
        )


def check_mask_names(path, names, params) -> None:
    """Every mask in a mask file must name a parameter; an empty file is an error."""
    names = list(names)
    if not names:
        raise AsftError(f"mask file {path} holds no masks")
    unknown = sorted(set(names) - set(params))
    if unknown:
        raise AsftError(f"mask file {path}: no parameter named {unknown[0]!r} in the model")


def check_mask_entry(path, name: str, dtype: torch.dtype, shape: tuple, weight_shape: tuple) -> None:
    """One mask of a mask file: bool, shaped like its weight."""
    if dtype != torch.bool:
        raise AsftError(f"mask file {path}: {name} is {dtype}, expected bool")
    if tuple(shape) != tuple(weight_shape):
        raise AsftError(f"mask file {path}: {name} has shape {tuple(shape)}, its weight {tuple(weight_shape)}")


def student_masks(model: nn.Module, mask_file: str | None, dense: bool) -> dict[str, torch.Tensor]:
    """The masks recovery keeps: all-True for a dense run (a structured export is smaller, not
    sparse, so every weight trains), a mask file's, or the model's exact zeros."""
    if dense:
        params = dict(model.named_parameters())
        return {name: torch.ones_like(params[name], dtype=torch.bool) for name in linear_weight_names(model)}
    return load_mask_file(mask_file, model) if mask_file else masks_from_zeros(model)


def load_mask_file(path: str | Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Bool masks from a safetensors file keyed by parameter name; each must match its weight's shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise AsftError(f"cannot read mask file {path}: {err}") from err
    params = dict(model.named_parameters())
    check_mask_names(path, raw, params)
    for name, mask in raw.items():
        check_mask_entry(path, name, mask.dtype, mask.shape, params[name].shape)
        raw[name] = mask.to(params[name].device)
    return raw


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every masked-out weight (once, before training)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))


def mask_gradient(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The gradient with its masked-out entries set to exactly 0 (the hook's whole job). The mask
    is expected on the gradient's device; one elsewhere (a ZeRO-3 partition offloaded to the CPU
    whose gradient is reduced on the GPU) is copied over for this product."""
    return grad * mask.to(grad.device, grad.dtype)


def register_mask_hooks(model: nn.Module, masks: dict[str, PackedMask]) -> list:
    """Hook every masked parameter so its gradient is masked. Register before deepspeed.initialize,
    so the hook runs before ZeRO's own gradient hooks reduce and partition the gradient. A mask
    that keeps every entry (a layer with no zeros, or `--dense`) gets no hook: it would only copy."""
    params = dict(model.named_parameters())
    return [params[name].register_hook(lambda g, m=mask: mask_gradient(g, m.unpack(g.shape)))
            for name, mask in masks.items() if not mask.keeps_all]


def select_trainable(model: nn.Module, masks: dict, norms: bool, biases: bool) -> list[str]:
    """Freeze everything except the masked weights (the names `masks` is keyed by, bool or packed
    masks alike; and, if asked, norm weights and linear biases).
    Embeddings and the output head stay frozen. Returns the names of the trainable parameters."""
    names = set(masks)
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if norms and "norm" in type(module).__name__.lower():
            names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
        if biases and isinstance(module, nn.Linear) and module.bias is not None:
            names.add(prefix + "bias")
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            trainable.append(name)
    return trainable


def count_masked_nonzeros(value: torch.Tensor, mask: torch.Tensor) -> int:
    """How many entries that the mask removes are not exactly zero (0 means the mask held)."""
    return int(torch.count_nonzero(value.detach().reshape(mask.shape)[~mask.to(value.device)]))


def copies_mask_report(weight, param, mask, trainable: bool, get_master, get_state, optimizer_state: bool) -> dict:
    """Masked-out entries that are not exactly zero in one parameter's copies: `weight` (the module's,
    whole or a partition), the fp32 master `get_master(param)` and the Adam moments `get_state(param, key)`
    (DeepSpeed's safe_get_full_* for whole masks, safe_get_local_* for partition masks)."""
    report = {"module": count_masked_nonzeros(weight, mask), "master": 0, "exp_avg": 0, "exp_avg_sq": 0,
              "master_checked": 0, "state_checked": 0}
    if not trainable:
        return report
    master = get_master(param)
    if master is not None:
        report["master"] += count_masked_nonzeros(master, mask)
        report["master_checked"] = 1
    for key in ("exp_avg", "exp_avg_sq") if optimizer_state else ():
        try:
            state = get_state(param, key)
        except (KeyError, AttributeError):  # an optimizer without Adam moments
            state = None
        if state is not None:
            report[key] += count_masked_nonzeros(state, mask)
            report["state_checked"] = 1
    return report
