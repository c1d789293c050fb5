"""Layer streaming: prune a model that is never fully in memory.

The model is built on the `meta` device (no storage). Only the parts outside the decoder
layers that the first step needs are materialised (embeddings, final norm, rotary tables;
lm_head only when it is pruned), and the embeddings go back to `meta` once the inputs of
layer 0 are captured. Each decoder layer is read from the safetensors shards (plain reads; a
layer that is only read, as in an evaluation, is memory-mapped) just before it is pruned,
written to its own output shard right after, and returned to `meta`; finish() copies the
untouched tensors from the source. Peak memory: one layer, the pruning temporaries, and the
calibration activations (which a ShardedRunner keeps in Ray's object store instead of this process).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from asft_ray.errors import AsftError
from asft_ray.memory import return_free_memory
from asft_ray.models import decoder_layers

INDEX = "model.safetensors.index.json"


# safetensors dtype names -> torch dtypes (the format: an 8-byte little-endian header length,
# a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _read_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, where the data starts); a file that is not whole safetensors is one clear line."""
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 2 <= size <= file_size - 8:
            raise AsftError(f"{path} is not a valid safetensors file (truncated or not safetensors)")
        try:
            header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise AsftError(f"{path} is not a valid safetensors file (unreadable header)") from None
    if 8 + size + data_end > file_size:
        raise AsftError(f"{path} is truncated: its header describes {8 + size + data_end} bytes, the file has {file_size}")
    return header, 8 + size


class SafetensorsReader:
    """Tensors by name across a model folder's safetensors shards.

    Reads with plain file I/O straight into each new tensor's memory: no memory map, so the
    shard pages read so far never count in this process's resident memory (the OS keeps
    them in its page cache). `get_many(..., mapped=True)` maps each tensor's bytes instead
    (copy-on-write): no copy and no freshly zeroed pages, for a layer that is only read; its pages
    count in this process's memory while the tensor lives, as a read copy's would, and are unmapped
    with it."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            weight_map = {k: "model.safetensors" for k in _read_header(folder / "model.safetensors")[0]}
        else:
            raise AsftError(f"layer streaming needs safetensors weights in {folder} (model.safetensors or {INDEX})")
        self.folder = folder
        self.weight_map = weight_map
        self._headers: dict[str, tuple[dict, int]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[key]

    def get_many(self, keys: list[str], mapped: bool = False) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.weight_map[key], []).append(key)
        tensors = {}
        for filename, names in by_file.items():
            header, data_start = self.header(filename), self._headers[filename][1]
            if mapped:
                tensors.update((key, _mapped(self.folder / filename, data_start, header[key])) for key in names)
                continue
            with open(self.folder / filename, "rb", buffering=0) as f:
                for key in names:
                    info = header[key]
                    begin, end = info["data_offsets"]
                    tensor = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
                    if tensor.numel():
                        f.seek(data_start + begin)
                        if f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != end - begin:
                            raise AsftError(f"{filename} is truncated at {key}")
                    tensors[key] = tensor
        return tensors

    def header(self, filename: str) -> dict:
        """{tensor name: {dtype, shape, data_offsets}} of one shard (read once)."""
        if filename not in self._headers:
            self._headers[filename] = _read_header(self.folder / filename)
        return self._headers[filename][0]

    def keys_under(self, prefix: str) -> list[str]:
        return [k for k in self.weight_map if k.startswith(prefix)]

    def weight_bytes(self) -> int:
        """Bytes of every tensor in the shards, as their headers describe them (no tensor is read)."""
        return sum(end - begin for filename in dict.fromkeys(self.weight_map.values())
                   for begin, end in (info["data_offsets"] for info in self.header(filename).values()))


def _mapped(path: Path, data_start: int, info: dict) -> torch.Tensor:
    """One tensor of a shard as a copy-on-write memory map of its bytes (the header was checked
    against the file's size when read): writes to it stay private, the file never changes. (numpy
    marks a copy-on-write map writable, so torch.from_numpy shares it without a warning.)"""
    import numpy as np

    begin, end = info["data_offsets"]
    dtype = _DTYPES[info["dtype"]]
    if end == begin:
        return torch.empty(info["shape"], dtype=dtype)
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=data_start + begin, shape=(end - begin,))
    return torch.from_numpy(raw).view(dtype).reshape(info["shape"])


def layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    return next(name for name, m in model.named_modules() if m is layers)


def checkpoint_dtype(reader: "SafetensorsReader") -> torch.dtype:
    """The dtype of the checkpoint's floating-point weights (the first decoder weight's)."""
    for filename in dict.fromkeys(reader.weight_map.values()):
        header = reader.header(filename)
        for info in header.values():
            dtype = _DTYPES.get(info["dtype"])
            if dtype is not None and dtype.is_floating_point:
                return dtype
    return torch.float32


def build_skeleton(folder: Path, load_head: bool = True):
    """The model with no weights in memory; only the modules outside the decoder layers are filled in,
    in the checkpoint's own dtype (bf16 stays bf16).

    `load_head=False` leaves an untied lm_head on `meta` too (it is only needed to prune it;
    StreamedLayers.finish copies it from the source)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    config.use_cache = False
    reader = SafetensorsReader(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=checkpoint_dtype(reader))
    model.eval()
    _materialise_outside_layers(model, reader, load_head)
    return model, reader


def _materialise_outside_layers(model: nn.Module, reader: SafetensorsReader, load_head: bool = True) -> None:
    inside = {id(m) for m in decoder_layers(model).modules()}
    head = model.get_output_embeddings()
    tied = getattr(model.config, "tie_word_embeddings", False)
    if not load_head and head is not None and not tied:
        inside.add(id(head))  # stays on meta
    for module_name, module in list(model.named_modules()):
        if id(module) in inside:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            key = f"{module_name}.{name}" if module_name else name
            if key in reader:
                module._parameters[name] = nn.Parameter(reader.get(key), requires_grad=False)
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if type(module).__name__.endswith("RotaryEmbedding"):
                fresh = type(module)(config=model.config)
                parent_name, _, child = module_name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
            else:
                raise AsftError(f"cannot stream {type(model).__name__}: buffer of {module_name} is not in the checkpoint")
    if getattr(model.config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    prefix = layers_prefix(model) + "."
    missing = [n for n, p in model.named_parameters()
               if p.is_meta and not n.startswith(prefix) and not (id(p) == id(getattr(head, "weight", None)) and not load_head)]
    if missing:
        raise AsftError(f"the checkpoint lacks {missing[0]} ({len(missing)} tensors outside the layers missing)")


def copy_generation_config(source: Path, out: Path) -> None:
    """The source folder's generation_config.json, if it has one (save_pretrained writes it for a loaded model)."""
    generation = Path(source) / "generation_config.json"
    if generation.is_file():
        (Path(out) / "generation_config.json").write_bytes(generation.read_bytes())


class StreamedLayers:
    """engine layer_store: load layer i from the source shards, write it to its own output shard, free it."""

    def __init__(self, model: nn.Module, reader: SafetensorsReader, out_dir: Path | None,
                 dtype: torch.dtype | None = None):
        self.reader = reader
        self.dtype = dtype  # floating tensors are written in it (None: as they are)
        self.prefix = layers_prefix(model)
        self.out_dir = Path(out_dir) if out_dir is not None else None  # None: read only (evaluation)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def load(self, index: int, layer: nn.Module) -> None:
        if any(True for _ in layer.buffers()):
            layer.to_empty(device="cpu")  # buffers need storage; parameters are replaced below
        prefix = f"{self.prefix}.{index}."
        # a layer that is only read (out_dir None) is mapped: no copy of what the page cache holds
        tensors = self.reader.get_many(self.reader.keys_under(prefix), mapped=self.out_dir is None)
        state = {k[len(prefix) :]: v for k, v in tensors.items()}
        layer.load_state_dict(state, strict=True, assign=True)  # take the tensors as stored (dtype too), no copy

    def _write(self, tensors: dict[str, torch.Tensor], filename: str) -> None:
        if self.dtype is not None:
            tensors = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        tmp = self.out_dir / f".{filename}.tmp"
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, self.out_dir / filename)
        for key, value in tensors.items():
            self.weight_map[key] = filename
            self.total_size += value.numel() * value.element_size()

    def after_capture(self, model: nn.Module) -> None:
        """The layer-0 inputs are captured: embeddings and lm_head are not needed again until
        finish(), which copies them from the source shards. (Not called when lm_head is pruned.)"""
        embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head is not None and head.weight is embeddings.weight
        embeddings.to("meta")
        if tied:
            head.weight = embeddings.weight  # moving to meta makes new parameters: tie them again
        elif head is not None:
            head.to("meta")
        return_free_memory()

    def free(self, index: int, layer: nn.Module) -> None:
        """Back to `meta` without writing anything (the layer was only read)."""
        layer.to("meta")
        return_free_memory()

    def release(self, index: int, layer: nn.Module) -> None:
        if self.out_dir is not None:
            prefix = f"{self.prefix}.{index}."
            self._write({prefix + k: v for k, v in layer.state_dict().items()}, f"model-layer-{index:05d}.safetensors")
        layer.to("meta")
        return_free_memory()

    def finish(self, model: nn.Module) -> None:
        """Write everything outside the decoder layers, and the shard index transformers reads.

        One tensor at a time, each into its own shard: tensors freed after capture are read back
        from the source, so the peak stays at one embedding matrix, not all of them."""
        inside = {id(p) for p in decoder_layers(model).parameters()}
        seen = set()
        for number, (key, param) in enumerate(model.named_parameters(remove_duplicate=False)):
            if id(param) in inside or id(param) in seen:
                continue  # tied weights are saved once, as the checkpoint had them
            seen.add(id(param))
            tensor = self.reader.get(key) if param.is_meta else param  # freed after capture: copy from the source
            self._write({key: tensor}, f"model-rest-{number:05d}.safetensors")
            del tensor
            return_free_memory()
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2))
