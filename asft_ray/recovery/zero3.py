"""ZeRO-3 recovery where no worker ever holds the whole model.

Building: the model is constructed under `deepspeed.zero.Init` (weight init skipped, an
`HfDeepSpeedConfig` kept alive), so each parameter exists only as this worker's flat partition
`param.ds_tensor` (`partition_numel()` elements; rank r owns elements [r*n, (r+1)*n) of the
flattened weight, the last one padded with zeros). Loading: each worker reads from the
safetensors files only the rows that cover its own partition and copies them into `ds_tensor`.
No full-size tensor is ever made. (A GGUF or hub model has no safetensors to slice: it is
loaded whole on the CPU once per worker and then cut; `partitioned_from_disk` is False then.)
An untied input embedding and LM head are built as vocabulary parts no larger than the largest
decoder linear (vocab_parts.py), read from rows of the tensors on disk, so ZeRO-3 never gathers
a whole vocabulary table.

Masks: one bit per element of each worker's partition (masks.PackedMask), from the partition's exact zeros (or the
same slice of `--mask-file`), on the partition's device. They are enforced on the partitioned
gradient, after ZeRO-3 has reduce-scattered it and before the optimizer steps:
a hook on the parameter (`register_mask_hooks`, the ZeRO-2 way) would see the *full* gradient
(ZeRO-3 gathers the weight for backward, and a tensor hook runs before DeepSpeed's
grad-accumulator hook partitions it), so it would need a full-size mask on every worker.
Masking after the reduction gives the same numbers bit for bit: the reduced sum of masked
gradients and the masked reduced sum agree entry by entry (0 where masked, untouched elsewhere).
"""

from __future__ import annotations

import contextlib

import torch

from asft_ray.errors import AsftError
from asft_ray.models import model_config, resolve_model
from asft_ray.recovery.masks import (
    PackedMask,
    check_mask_entry,
    check_mask_names,
    copies_mask_report,
    linear_weight_names,
    mask_gradient,
)
from asft_ray.recovery.deepspeed_config import zero3_unit
from asft_ray.recovery.shards import Checkpoint
from asft_ray.recovery.vocab_parts import split_vocab_tables


def partition_range(rank: int, partition_numel: int, numel: int) -> tuple[int, int]:
    """The flat [start, stop) of a weight that rank `rank`'s ZeRO-3 partition holds (stop clipped to numel)."""
    start = rank * partition_numel
    return min(start, numel), min(start + partition_numel, numel)


def _partition_rank(param) -> int:
    import deepspeed.comm as dist

    return dist.get_rank(group=getattr(param, "ds_process_group", None))


@contextlib.contextmanager
def _zero3_construction(ds_config: dict):
    """transformers' own zero.Init contexts for `from_config`, without its weight initialisation
    (which gathers every module to rank 0 to draw random weights the checkpoint then replaces)."""
    import deepspeed
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    # No `dtype=` for zero.Init: DeepSpeed 0.19 reads an explicit dtype as `dtype or fp16 if the
    # accelerator has fp16 else bf16 ...`, so on the CPU an explicit float32 becomes bfloat16.
    # Without it, the dtype comes from the config (bf16.enabled -> bf16, else fp32), as wanted.
    with no_init_weights(), prevent_arange_dtype_change(), \
            deepspeed.zero.Init(config_dict_or_path=ds_config), set_zero3_state():
        yield


def build_partitioned(spec: str, ds_config: dict, dtype: torch.dtype):
    """(model, keep_alive, checkpoint or None): the model's skeleton with every parameter partitioned
    across the workers and nothing loaded yet. Keep `keep_alive` (the HfDeepSpeedConfig) referenced
    for as long as the model is used: transformers reads it to know that ZeRO-3 is on."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    keep_alive = HfDeepSpeedConfig(ds_config)
    config = model_config(spec)
    config.use_cache = False
    if hasattr(config, "quantization_config"):  # a GGUF's marker: the weights arrive dequantized
        del config.quantization_config
    # Import the model's classes before zero.Init: a class first defined inside it keeps, after the
    # context exits, the __init__ DeepSpeed saved, so decorators transformers applies to the class
    # afterwards (the `kernels` hub wrappers on LlamaAttention) are lost for every later instance
    # (the teacher built second then fails with "no attribute '_kernel_funcs'").
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    source = resolve_model(spec)
    checkpoint = None if source.gguf_file or source.is_hub else Checkpoint.from_folder(source.location)
    with _zero3_construction(ds_config):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # untied vocabulary tables in parts no larger than ZeRO-3's unit (read by rows from disk)
        unit = zero3_unit(max(dict(model.named_parameters())[n].ds_numel for n in linear_weight_names(model)))
        model.vocab_part_sources = split_vocab_tables(model, unit) if checkpoint is not None else {}
    if next(model.parameters()).ds_tensor.dtype != dtype:
        raise AsftError(f"zero.Init built {next(model.parameters()).ds_tensor.dtype} partitions, expected {dtype}")
    model.tie_weights()  # transformers ties after its own zero3 init, which is skipped here
    return model, keep_alive, checkpoint


class _WholeModel:
    """A GGUF or hub model: loaded whole on the CPU (there is nothing on disk to slice), read like a Checkpoint."""

    def __init__(self, spec: str):
        from asft_ray.models import load_model

        model, _ = load_model(spec, "cpu", show_progress=False)
        self.tensors = dict(model.state_dict())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.tensors[name].reshape(-1)[start:stop]


@torch.no_grad()
def load_partitions(model, spec: str, checkpoint) -> dict[str, torch.dtype]:
    """Copy each worker's own slice of every parameter from disk into its `ds_tensor`.
    Returns the source dtype of each parameter (the export writes them back in it)."""
    source = checkpoint if checkpoint is not None else _WholeModel(spec)
    parts = getattr(model, "vocab_part_sources", {})  # a vocabulary part: rows of a tensor on disk
    dtypes = {}
    for name, param in model.named_parameters():
        stored, first_row = parts.get(name, (name, 0))
        if stored not in source:
            raise AsftError(f"model {spec!r}: no weight named {stored!r} to load (tied or renamed weights?)")
        start, stop = partition_range(_partition_rank(param), param.partition_numel(), param.ds_numel)
        offset = first_row * (param.ds_numel // param.ds_shape[0])
        part = param.ds_tensor.data
        part.zero_()
        part[: stop - start].copy_(source.read_flat(stored, offset + start, offset + stop))
        dtypes[name] = source.dtype(stored)
    return dtypes


def partition_masks(model, spec: str, checkpoint, mask_file: str | None, dense: bool) -> dict[str, PackedMask]:
    """Packed masks of this worker's partitions of the decoder linears (padding: False), on the
    partition's device. From the loaded partitions' exact zeros, or the same slice of `mask_file`
    (then the partition is zeroed where the mask says so). Call after load_partitions."""
    params = dict(model.named_parameters())
    names = linear_weight_names(model)
    masks = {}
    masks_on_disk = Checkpoint.from_file(mask_file) if mask_file else None
    if masks_on_disk is not None:
        check_mask_names(mask_file, masks_on_disk.names(), params)
    for name in names if masks_on_disk is None else masks_on_disk.names():
        param = params[name]
        part = param.ds_tensor.data
        if dense:
            masks[name] = PackedMask.pack(torch.ones(part.numel(), dtype=torch.bool, device=part.device))
            continue
        start, stop = partition_range(_partition_rank(param), param.partition_numel(), param.ds_numel)
        mask = torch.zeros(part.numel(), dtype=torch.bool, device=part.device)
        if masks_on_disk is None:
            mask[: stop - start] = part[: stop - start] != 0
        else:
            check_mask_entry(mask_file, name, masks_on_disk.dtype(name), masks_on_disk.shape(name), param.ds_shape)
            mask[: stop - start] = masks_on_disk.read_flat(name, start, stop).to(part.device)
            part.mul_(mask.to(part.dtype))
        masks[name] = PackedMask.pack(mask)
    return masks


def enforce_masks_on_partitions(model, masks: dict[str, torch.Tensor]):
    """A function that masks this worker's reduced gradient partitions in place. Call it after
    the backward of the last micro-step of an accumulation and before `engine.step()`.
    Masks that keep every entry are skipped (nothing to do, as with the ZeRO-2 hooks)."""
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

    params = dict(model.named_parameters())
    todo = [(params[name], mask) for name, mask in masks.items() if not mask.keeps_all]

    def enforce() -> None:
        for param, mask in todo:
            safe_set_local_grad(param, mask_gradient(safe_get_local_grad(param), mask.unpack()))

    return enforce


def partition_mask_report(model, masks: dict, trainable: list[str], device, optimizer_state: bool = True) -> dict:
    """mask_report for partitioned masks: each worker counts masked-out non-zeros in its own
    partitions of the module weights, the fp32 master and the Adam moments; the counts are
    summed over the workers on `device` (the process group's device). Collective."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    params = dict(model.named_parameters())
    keys = ("module", "master", "exp_avg", "exp_avg_sq")
    found = dict.fromkeys(keys, 0)
    master_checked = state_checked = 0
    for name, mask in masks.items():
        p = params[name]
        one = copies_mask_report(p.ds_tensor, p, mask.unpack(), name in trainable, safe_get_local_fp32_param,
                                 safe_get_local_optimizer_state, optimizer_state)
        for key in keys:
            found[key] += one[key]
        master_checked += one["master_checked"]
        state_checked += one["state_checked"]
    sums = torch.tensor([found[k] for k in keys], dtype=torch.int64, device=device)
    dist.all_reduce(sums)
    checked = torch.tensor([master_checked, state_checked], dtype=torch.int64, device=device)
    dist.all_reduce(checked, op=dist.ReduceOp.MIN)  # a parameter counts as checked if every worker checked it
    return {"params": len(masks), **{k: int(v) for k, v in zip(keys, sums.tolist())},
            "master_checked": int(checked[0]), "state_checked": int(checked[1])}
