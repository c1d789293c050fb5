"""HF safetensors checkpoints read and written one tensor (or one slice of a tensor) at a time.

Reading: `Checkpoint` maps parameter names to the file that holds them (one `model.safetensors`,
or the shards of `model.safetensors.index.json`) and reads a tensor, or only the rows that cover
a flat range of it (what one ZeRO-3 partition needs), without loading anything else.
Writing: `plan_shards` (pure) cuts an ordered list of tensors into shards of at most
`max_bytes`; `ShardWriter` writes each shard once it is complete, and the index last.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from asft_ray.errors import AsftError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class Checkpoint:
    """The safetensors weights of an HF model directory, opened lazily, tensor by tensor."""

    def __init__(self, files: dict[str, Path], where: str):
        self.files = files
        self.where = where
        self._open: dict[Path, object] = {}
        self.bytes_read = 0  # what this process has read: a ZeRO-3 worker should read ~1/world of the model
        self.largest_read = 0  # elements of the largest tensor read at once

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Checkpoint":
        folder = Path(folder)
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            return cls({name: folder / file for name, file in weight_map.items()}, str(folder))
        if (folder / SINGLE).is_file():
            return cls.from_file(folder / SINGLE)
        raise AsftError(f"{folder} has no {SINGLE} or {INDEX}")

    @classmethod
    def from_file(cls, path: str | Path) -> "Checkpoint":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                names = list(f.keys())
        except (OSError, SafetensorError) as err:
            raise AsftError(f"cannot read {path}: {err}") from err
        if not names:
            raise AsftError(f"{path} holds no tensors")
        return cls(dict.fromkeys(names, Path(path)), str(path))

    def _handle(self, name: str):
        from safetensors import safe_open

        if name not in self.files:
            raise AsftError(f"{self.where}: no tensor named {name!r}")
        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), "pt")
        return self._open[path]

    def close(self) -> None:
        """Drop the open files. safetensors reads through a memory map, and every page read stays
        in this process's RSS (as file pages) while the file is mapped: a reader that has read what
        it needs closes, so it does not keep the bytes it read resident. Reading again reopens."""
        self._open.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def read(self, name: str) -> torch.Tensor:
        return self._count(self._handle(name).get_tensor(name))

    def _count(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes_read += tensor.numel() * tensor.element_size()
        self.largest_read = max(self.largest_read, tensor.numel())
        return tensor

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._handle(name).get_slice(name).get_dtype()]

    def read_flat(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the tensor flattened, reading only the rows that hold them."""
        shape = self.shape(name)
        numel = 1
        for d in shape:
            numel *= d
        stop = min(stop, numel)
        if start >= stop:
            return torch.empty(0, dtype=self.dtype(name))
        row = numel // shape[0] if shape else 1
        first, last = start // row, -(-stop // row)
        part = self._count(self._handle(name).get_slice(name)[first:last]) if shape else self.read(name)
        return part.reshape(-1)[start - first * row : stop - first * row]


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Cut (name, bytes) in order into shards of at most `max_bytes` (a larger tensor gets a shard alone)."""
    shards: list[list[str]] = []
    used = max_bytes
    for name, size in sizes:
        if used + size > max_bytes or not shards:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_file_names(count: int) -> list[str]:
    """transformers' names: one `model.safetensors`, or `model-0000k-of-0000n.safetensors`."""
    if count == 1:
        return [SINGLE]
    return [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]


class ShardWriter:
    """Collects one shard's tensors and writes the shard as soon as it holds all of them."""

    def __init__(self, folder: Path, shards: list[list[str]]):
        self.folder = Path(folder)
        self.files = shard_file_names(len(shards))
        self.shard_of = {name: k for k, names in enumerate(shards) for name in names}
        self.remaining = [set(names) for names in shards]
        self.pending: list[dict[str, torch.Tensor]] = [{} for _ in shards]
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        k = self.shard_of[name]
        self.pending[k][name] = tensor.contiguous()
        self.remaining[k].discard(name)
        self.total_bytes += tensor.numel() * tensor.element_size()
        if not self.remaining[k]:
            save_file(self.pending[k], str(self.folder / self.files[k]), metadata={"format": "pt"})
            self.pending[k] = {}

    def finish(self) -> None:
        missing = sorted(n for names in self.remaining for n in names)
        if missing:
            raise AsftError(f"export incomplete: {len(missing)} tensors never written, e.g. {missing[0]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {name: self.files[k] for name, k in sorted(self.shard_of.items())}}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2))
