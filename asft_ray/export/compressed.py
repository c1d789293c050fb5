"""A compact on-disk format for unstructured sparsity: bitmask + non-zero values, in safetensors.

Each decoder-layer Linear weight whose zeros make it worth it is stored as two tensors:
  `<name>.__mask`   uint8, np.packbits of the flattened non-zero pattern (1 bit per weight)
  `<name>.__values` the weight's non-zero entries in row-major order, original dtype
Every other tensor (embeddings, norms, dense weights) is stored as is. A weight is "non-zero"
by its bit pattern, so -0.0 survives and loading gives back the very same bits.

Cost per compressed weight: numel/8 bytes of mask + nnz * itemsize of values. At 50 %
sparsity in float32 that is 1/32 + 1/2 = 53.1 % of the dense bytes; a weight is compressed
only when this is smaller than dense (density below 1 - 1/(8*itemsize), 96.9 % for fp32).

Folder: config.json (+ generation_config.json), tokenizer files when given,
`model.compressed.safetensors` (or, written from a safetensors model directory one decoder
layer at a time, `model.compressed-*.safetensors` shards, each with its own metadata), and
`compressed.json` (format, sizes). Tied weights are stored once and re-tied on load. The
in-memory model after loading is a plain dense model: this format saves disk and download,
not compute.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from asft_ray.artifacts import atomic_output_dir, write_json_atomic
from asft_ray.errors import AsftError
from asft_ray.models import decoder_layers, prunable_linears

FORMAT = "asft-bitmask-v1"
WEIGHTS_FILE = "model.compressed.safetensors"
MANIFEST = "compressed.json"
MASK, VALUES = ".__mask", ".__values"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bit_pattern(weight: torch.Tensor) -> torch.Tensor:
    """The weight's bits as integers of its width (so -0.0 and NaN are non-zero, 0.0 alone is zero)."""
    return weight.contiguous().view(_INT_VIEW[weight.element_size()])


def nonzero_bits(weight: torch.Tensor) -> torch.Tensor:
    """True where the weight's bit pattern is not all zeros (so -0.0 and NaN count as non-zero)."""
    return _bit_pattern(weight) != 0


def nonzero_bits_count(weight: torch.Tensor) -> int:
    """How many of nonzero_bits are True, with no int64 temporary (8 bytes an element) of summing them."""
    return int(torch.count_nonzero(_bit_pattern(weight)))


def pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 bitmask of the flattened weight, its non-zero values in row-major order)."""
    keep = nonzero_bits(weight).reshape(-1)
    packed = torch.from_numpy(np.packbits(keep.numpy()))
    return packed, weight.reshape(-1)[keep].clone()


def unpack(packed: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack`: a dense tensor with the same bits as the one packed."""
    numel = int(np.prod(shape))
    keep = torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).astype(bool))
    if (ones := int(torch.count_nonzero(keep))) != values.numel():
        raise AsftError(f"corrupt compressed weight: mask has {ones} ones but {values.numel()} values")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[keep] = values
    return dense.reshape(shape)


def worth_compressing(weight: torch.Tensor) -> bool:
    nnz = nonzero_bits_count(weight)
    return (weight.numel() + 7) // 8 + nnz * weight.element_size() < weight.numel() * weight.element_size()


def pruned_weight_names(model) -> list[str]:
    """State-dict names of the decoder layers' Linear weights (the ones pruning makes sparse)."""
    names = {id(lin.weight): None for layer in decoder_layers(model) for lin in prunable_linears(layer).values()}
    return [name for name, p in model.named_parameters() if id(p) in names]


def _unique_state(model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with shared tensors kept once: (tensors, {alias name: stored name})."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.device.type != "meta" else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


def size_report(model) -> dict:
    """Bytes of the pruned decoder-layer weights dense vs bitmask+values, without writing anything."""
    dense = compressed = 0
    params = dict(model.named_parameters())
    names = pruned_weight_names(model)
    for name in names:
        w = params[name].detach().cpu()
        nbytes = w.numel() * w.element_size()
        dense += nbytes
        if worth_compressing(w):
            compressed += (w.numel() + 7) // 8 + nonzero_bits_count(w) * w.element_size()
        else:
            compressed += nbytes
    return {"pruned_dense_bytes": dense, "pruned_stored_bytes": compressed,
            "pruned_ratio": compressed / dense if dense else 1.0, "pruned_weights": len(names)}


def save_compressed(model, out: Path, tokenizer=None) -> dict:
    """Write the model in the bitmask format into `out` (atomically). Returns the size report:
    pruned decoder-layer bytes dense vs stored, all tensors' dense bytes, and the file sizes."""
    from safetensors.torch import save_file

    tensors, aliases = _unique_state(model)
    compress = set(pruned_weight_names(model))
    stored, shapes, report = {}, {}, size_report(model)
    for name, t in tensors.items():
        if name in compress and worth_compressing(t):
            stored[name + MASK], stored[name + VALUES] = pack(t)
            shapes[name] = list(t.shape)
        else:
            stored[name] = t
    metadata = {"format": FORMAT, "shapes": json.dumps(shapes), "aliases": json.dumps(aliases)}
    with atomic_output_dir(Path(out)) as tmp:
        save_file(stored, str(tmp / WEIGHTS_FILE), metadata=metadata)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report.update({
            "file_format": FORMAT,
            "compressed_weights": len(shapes),
            "dense_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "weights_file_bytes": (tmp / WEIGHTS_FILE).stat().st_size,
            "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", ""),
        })
        report["file_ratio"] = report["weights_file_bytes"] / report["dense_bytes"]
        write_json_atomic(tmp / MANIFEST, report)
        report["total_bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    return report


def save_compressed_streamed(source: Path, out: Path, tokenizer=None) -> dict:
    """`save_compressed` of a safetensors model directory, never more than one decoder layer in
    memory: each layer's tensors are read, packed and written to a shard of their own, then every
    other tensor one at a time (as stored: tied weights once)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from asft_ray.models import model_skeleton
    from asft_ray.memory import return_free_memory
    from asft_ray.pruning.streaming import SafetensorsReader, copy_generation_config, layers_prefix

    source = Path(source)
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    skeleton = model_skeleton(config)
    reader, prefix = SafetensorsReader(source), layers_prefix(skeleton)
    linears = [f"{name}.weight" for name in prunable_linears(decoder_layers(skeleton)[0])]
    groups = [reader.keys_under(f"{prefix}.{i}.") for i in range(len(decoder_layers(skeleton)))]
    empty = [i for i, group in enumerate(groups) if not group]
    if empty:  # before anything is written: the model's own config names layers its files do not hold
        raise AsftError(f"{source}: decoder layer {empty[0]} of {len(groups)} has no tensors in the safetensors files")
    inside = {key for group in groups for key in group}
    groups += [[key] for key in reader.weight_map if key not in inside]
    totals = {"pruned_dense_bytes": 0, "pruned_stored_bytes": 0, "pruned_weights": 0, "compressed_weights": 0,
              "dense_bytes": 0, "weights_file_bytes": 0}
    dtypes = set()
    with atomic_output_dir(Path(out)) as tmp:
        for number, keys in enumerate(groups):
            stored, shapes = {}, {}
            for name, t in reader.get_many(keys).items():
                nbytes = t.numel() * t.element_size()
                totals["dense_bytes"] += nbytes
                dtypes.add(str(t.dtype).replace("torch.", ""))
                pruned = name in inside and name.split(".", len(prefix.split(".")) + 1)[-1] in linears
                if pruned:
                    totals["pruned_weights"] += 1
                    totals["pruned_dense_bytes"] += nbytes
                if pruned and worth_compressing(t):
                    stored[name + MASK], stored[name + VALUES] = pack(t)
                    shapes[name] = list(t.shape)
                    totals["pruned_stored_bytes"] += stored[name + MASK].numel() + stored[name + VALUES].numel() * t.element_size()
                else:
                    stored[name] = t
                    totals["pruned_stored_bytes"] += nbytes if pruned else 0
            shard = tmp / f"model.compressed-{number:05d}.safetensors"
            save_file(stored, str(shard), metadata={"format": FORMAT, "shapes": json.dumps(shapes), "aliases": "{}"})
            totals["compressed_weights"] += len(shapes)
            totals["weights_file_bytes"] += shard.stat().st_size
            del stored, t
            return_free_memory()  # glibc keeps freed tensors' heap pages; the export held 0.5 GiB of them
        config.save_pretrained(tmp)
        copy_generation_config(source, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report = {**totals, "file_format": FORMAT, "dtype": ",".join(sorted(dtypes)), "streamed": True,
                  "pruned_ratio": totals["pruned_stored_bytes"] / max(1, totals["pruned_dense_bytes"]),
                  "file_ratio": totals["weights_file_bytes"] / totals["dense_bytes"]}
        write_json_atomic(tmp / MANIFEST, report)
        report["total_bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    return report


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise AsftError(f"{folder} is not a compressed export (no readable {MANIFEST})") from err


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """The full state dict (aliases included) from a compressed folder."""
    from safetensors import safe_open

    folder = Path(folder)
    paths = [folder / WEIGHTS_FILE] if (folder / WEIGHTS_FILE).is_file() else sorted(folder.glob("model.compressed-*.safetensors"))
    if not paths:
        raise AsftError(f"{folder} has no {WEIGHTS_FILE} (nor model.compressed-*.safetensors shards)")
    state, aliases = {}, {}
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise AsftError(f"{path} is not in format {FORMAT} (found {meta.get('format')!r})")
            shapes = json.loads(meta["shapes"])
            aliases.update(json.loads(meta["aliases"]))
            for name, shape in shapes.items():
                state[name] = unpack(f.get_tensor(name + MASK), f.get_tensor(name + VALUES), tuple(shape))
            for key in f.keys():
                if not key.endswith((MASK, VALUES)):
                    state[key] = f.get_tensor(key)
    for alias, source in aliases.items():
        state[alias] = state[source]
    return state


def load_compressed(folder: Path, device: str = "cpu"):
    """Rebuild the model from a compressed folder; its tensors have the bits that were saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    read_manifest(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    state = load_state(folder)
    dtype = next(iter(state.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not _is_tied(model, m)]:
        raise AsftError(f"{folder}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.config.use_cache = False
    return model.eval().to(device)


def _is_tied(model, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))
