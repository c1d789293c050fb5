"""Write the recovered model as an HF folder, one parameter gathered at a time, shard by shard.

Collective (every worker calls it in the same order); rank 0 alone writes. Trained parameters
come from DeepSpeed's fp32 master (equal to the module in fp32 training, more precise under
bf16), gathered one at a time; frozen ones are read back from the source checkpoint where there
is one (they never changed), else gathered (`GatheredParameters` under ZeRO-3; a no-op under
ZeRO-2). Each is cast to the dtype the source stored it in and handed to a ShardWriter that
writes a shard as soon as it is complete. Rank 0 holds at most one shard plus one full
parameter; no worker ever holds a whole state dict or a second model.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from asft_ray.models import resolve_model
from asft_ray.recovery.shards import ShardWriter, plan_shards

# what rank 0 holds at most besides one parameter (at 2 GiB a 0.5 B fp32 model was one shard: held whole)
DEFAULT_SHARD_BYTES = 256 * 2**20
_EXTRA_FILES = ("generation_config.json",)


def _full_shape(param) -> tuple[int, ...]:
    return tuple(param.ds_shape) if hasattr(param, "ds_shape") else tuple(param.shape)


def _gathered(p, trained: bool, dtype, rank: int):
    """One parameter whole on rank 0 (None elsewhere): a trained one from the fp32 master, else gathered.
    Collective: every rank calls it."""
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(p) if trained else None
    if value is None:
        with GatheredParameters([p], modifier_rank=None):
            return p.data.detach().to("cpu", dtype, copy=True) if rank == 0 else None
    return value.detach().reshape(_full_shape(p)).to("cpu", dtype, copy=True) if rank == 0 else None


def export_sharded(model, trainable: list[str], dtypes: dict[str, torch.dtype], spec: str, folder: Path, rank: int,
                   checkpoint=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write `model`'s weights into `folder` as `spec`'s config + tokenizer + sharded safetensors.
    Frozen weights that `checkpoint` (the source's shards.Checkpoint, if any) holds are copied
    from it as they are (they never changed, and a bf16 run's module copy would be rounded)."""
    folder = Path(folder)
    # tied weights appear once, as transformers saves them; vocabulary parts (vocab_parts.py) are
    # written back as the one tensor they were read from
    parts = getattr(model, "vocab_part_sources", {})
    tensors: dict[str, list] = {}
    for name, p in model.named_parameters():
        tensors.setdefault(parts.get(name, (name,))[0], []).append((name, p))
    persistent = set(model.state_dict().keys())
    buffers = [(n, b) for n, b in model.named_buffers() if n in persistent]
    sizes = []
    for stored, group in tensors.items():
        numel = sum(math.prod(_full_shape(p)) for _, p in group)
        sizes.append((stored, numel * dtypes[group[0][0]].itemsize))
    sizes += [(n, b.numel() * b.element_size()) for n, b in buffers]
    writer = None
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(folder, plan_shards(sizes, max_shard_bytes))
    trained = set(trainable)
    for stored, group in tensors.items():
        dtype = dtypes[group[0][0]]
        if not trained & {n for n, _ in group} and checkpoint is not None and stored in checkpoint:
            if rank == 0:
                writer.add(stored, checkpoint.read(stored).to(dtype))
            continue
        values = [_gathered(p, name in trained, dtype, rank) for name, p in group]
        if rank == 0:
            writer.add(stored, values[0] if len(values) == 1 else torch.cat(values))
    if checkpoint is not None:
        checkpoint.close()  # unmap the frozen weights read above (their pages would stay in RSS)
    if rank != 0:
        return
    for name, b in buffers:
        writer.add(name, b.detach().cpu())
    writer.finish()
    _write_config_and_tokenizer(model, spec, dtypes, folder)


def _write_config_and_tokenizer(model, spec: str, dtypes: dict[str, torch.dtype], folder: Path) -> None:
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    config = model.config
    counts: dict[torch.dtype, int] = {}
    for dtype in dtypes.values():
        counts[dtype] = counts.get(dtype, 0) + 1
    config.dtype = max(counts, key=counts.get)
    config.save_pretrained(folder)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    AutoTokenizer.from_pretrained(source.location, trust_remote_code=False, **kwargs).save_pretrained(folder)
    if not (source.gguf_file or source.is_hub):
        for name in _EXTRA_FILES:
            if (Path(source.location) / name).is_file():
                shutil.copy(Path(source.location) / name, folder / name)
