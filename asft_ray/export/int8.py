"""int8 export: the decoder linears (and the output head) as int8 weights, one scale per output channel.

Quantization (symmetric, per output channel = per weight row):
    scale[r] = max_c |W[r, c]| / 127   (1.0 for an all-zero row)     q = round(W / scale[:, None]) in [-127, 127]
so W ≈ q * scale[:, None]. Weight-only: activations stay floating point. The matmul is torch's
int8 weight-only CPU kernel `aten._weight_int8pack_mm` (the kernel torchao's int8 weight-only
config and gpt-fast reach on the CPU in eager mode; torchao itself is not installed here), fed
bfloat16 activations. Why weight-only: on the first 1024 WikiText-2 test tokens, SmolLM2-135M
has ppl 13.82 dense, 13.92 with this module, 14.75 with per-token dynamic int8 activations
(torch._int_mm) and 40.0 with torch.ao's dynamic quantized Linear, which quantizes a whole
sequence's activations with one scale (benchmarks/int8_kernels.py --quality; BENCHMARKS.md).
The kernels' decode-shape speeds are in the same script and table.

Folder (format asft-int8-v1):
  config.json, generation_config.json, tokenizer files   as the source's (the head untied if it is
                                                         quantized while the source ties it)
  model.int8-NNNNN.safetensors   one shard per decoder layer, then one per other tensor: a
                                 quantized linear's `<module>.weight` is int8 (I8) and
                                 `<module>.weight_scale` float32 [out]; every other tensor (norms,
                                 embeddings, biases) as in the source
  int8.json                      which modules are quantized, the scheme, the kernel, sizes
Loading (`load_int8`) builds the model on `meta`, puts every quantized module back from exactly
the stored int8 values and scales (no re-quantization), and assigns the other tensors.

From a safetensors model folder the export reads one decoder layer's tensors at a time and writes
its shard before reading the next, so the model is never whole in memory. Any other source (a
GGUF alias, a hub id) is loaded whole first. A structured export is a plain model folder, so
`asft export --format int8 --model STRUCTURED_DIR` gives pruned + int8.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from asft_ray.artifacts import atomic_output_dir, write_json_atomic
from asft_ray.errors import AsftError
from asft_ray.models import decoder_layers, prunable_linears

FORMAT = "asft-int8-v1"
MANIFEST = "int8.json"
SCALE = "_scale"  # `<module>.weight_scale` beside the int8 `<module>.weight`
SHARD = "model.int8-{:05d}.safetensors"
SCHEME = "symmetric int8 per output channel: W ~ q * scale[:, None], q in [-127, 127], float32 scale"
KERNEL = "aten._weight_int8pack_mm (int8 weight-only, bfloat16 activation and scale)"


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, float32 scale per row) with weight ≈ q * scale[:, None]."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T + bias through torch's int8 weight-only CPU kernel
    (`aten._weight_int8pack_mm`, the one torchao's and gpt-fast's int8 weight-only paths call on
    the CPU in eager mode). The activation and the scale enter the kernel in `compute_dtype`
    (bfloat16: the fast path here, see the module docstring); input and output keep their dtype.
    The kernel needs in_features divisible by 16 (other sizes crash it): the weight is padded
    with zero columns and each input with zeros, which changes no product."""

    ALIGN = 16

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != q.shape[:1]:
            raise AsftError(f"an int8 linear needs an int8 [out, in] weight and a [out] scale, got {q.dtype} "
                            f"{tuple(q.shape)} and {tuple(scale.shape)}")
        self.out_features, self.in_features = q.shape
        self.pad = -self.in_features % self.ALIGN
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", torch.nn.functional.pad(q, (0, self.pad)).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("kernel_scale", self.scale.to(compute_dtype), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @property
    def weight(self) -> torch.Tensor:
        """The int8 values (no padding): what sparsity counts read as this linear's weight."""
        return self.qweight[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.compute_dtype)
        if self.pad:
            x2 = torch.nn.functional.pad(x2, (0, self.pad))
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.kernel_scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 weight, compute_dtype={self.compute_dtype}")


def int8_linear(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
    """The int8 module holding exactly `q` (int8 [out, in]) and `scale` ([out])."""
    return Int8Linear(q, scale, bias)


def int8_values(module: Int8Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, float32 scale) held by an int8 module: what its kernel multiplies with."""
    return module.weight, module.scale


def quantized_module_names(model: nn.Module, head: bool) -> list[str]:
    """The decoder layers' Linear modules (and the output head with `head`), by module name."""
    ids = {id(lin) for layer in decoder_layers(model) for lin in prunable_linears(layer).values()}
    if head and model.get_output_embeddings() is not None:
        ids.add(id(model.get_output_embeddings()))
    return [name for name, m in model.named_modules() if id(m) in ids]


@torch.no_grad()
def quantize_model(model: nn.Module, head: bool = True) -> list[str]:
    """Replace the decoder linears (and the head) of an in-memory float model by int8 modules, in
    place, with the same quantization as the export. Returns the names replaced. The model then
    runs in float32 around the int8 matmuls."""
    names = quantized_module_names(model, head)
    for name in names:
        lin = model.get_submodule(name)
        q, scale = quantize_weight(lin.weight)
        model.set_submodule(name, int8_linear(q, scale, lin.bias))
    return names


def _state_groups(model) -> Iterator[dict[str, torch.Tensor]]:
    """An in-memory model's state dict, one decoder layer per group, then one tensor per group
    (shared tensors once)."""
    from asft_ray.pruning.streaming import layers_prefix

    prefix, seen, rest = layers_prefix(model), set(), {}
    state = model.state_dict()
    for i in range(len(decoder_layers(model))):
        under = f"{prefix}.{i}."
        yield {k: t for k, t in state.items() if k.startswith(under)}
    for key, t in state.items():
        if key.startswith(prefix + ".") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        rest[key] = t
    for key, t in rest.items():
        yield {key: t}


def _reader_groups(reader, prefix: str, n_layers: int) -> Iterator[dict[str, torch.Tensor]]:
    """A safetensors folder's tensors, read one decoder layer (then one other tensor) at a time."""
    inside = set()
    for i in range(n_layers):
        keys = reader.keys_under(f"{prefix}.{i}.")
        inside.update(keys)
        yield reader.get_many(keys)
    for key in reader.weight_map:
        if key not in inside:
            yield reader.get_many([key])


def _write_shards(groups, quantized: set[str], head: str | None, head_source: str | None, tmp: Path) -> dict:
    """Write each group as a shard, the `quantized` modules' weights as int8 + scale. With a tied head,
    `head_source` (the embedding) is quantized a second time under `head`."""
    from safetensors.torch import save_file

    totals = {"dense_bytes": 0, "quantized_dense_bytes": 0, "quantized_stored_bytes": 0, "weights_file_bytes": 0}
    dtypes = set()
    for number, group in enumerate(groups):
        stored = {}
        for key, t in group.items():
            totals["dense_bytes"] += t.numel() * t.element_size()
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            if module in quantized:
                stored[key], stored[key + SCALE] = quantize_weight(t)
                totals["quantized_dense_bytes"] += t.numel() * t.element_size()
                totals["quantized_stored_bytes"] += t.numel() + 4 * t.shape[0]
            else:
                stored[key] = t.contiguous()
                dtypes.add(str(t.dtype).replace("torch.", ""))
            if key == head_source:  # tied head: the embedding stays float, the head gets its own int8 copy
                stored[f"{head}.weight"], stored[f"{head}.weight{SCALE}"] = quantize_weight(t)
                totals["quantized_dense_bytes"] += t.numel() * t.element_size()
                totals["quantized_stored_bytes"] += t.numel() + 4 * t.shape[0]
        path = tmp / SHARD.format(number)
        save_file(stored, str(path), metadata={"format": FORMAT})
        totals["weights_file_bytes"] += path.stat().st_size
        del stored
    return {**totals, "dtype": ",".join(sorted(dtypes))}


def save_int8(source, out: Path, tokenizer=None, head: bool = True) -> dict:
    """Write `source` (an in-memory model, or the Path of a safetensors model folder, streamed one
    decoder layer at a time) in the int8 format into `out`, atomically. Returns the size report."""
    from transformers import AutoConfig

    from asft_ray.models import model_skeleton
    from asft_ray.pruning.streaming import SafetensorsReader, copy_generation_config, layers_prefix

    streamed = isinstance(source, (str, Path))
    config = AutoConfig.from_pretrained(source, trust_remote_code=False) if streamed else source.config
    skeleton = model_skeleton(config)
    names = quantized_module_names(skeleton, head)
    head_name = next((n for n, m in skeleton.named_modules() if m is skeleton.get_output_embeddings()), None)
    tied = bool(getattr(config, "tie_word_embeddings", False)) and head_name is not None
    if streamed:
        reader = SafetensorsReader(Path(source))
        groups = _reader_groups(reader, layers_prefix(skeleton), len(decoder_layers(skeleton)))
        head_stored = f"{head_name}.weight" in reader
    else:
        groups = _state_groups(source)  # a tied head is the embedding's tensor: stored once, as the embedding
        head_stored = not tied
    head_source = None
    if head and head_name is not None and not head_stored:  # quantize a copy of the embedding; it stays float
        embed = skeleton.get_input_embeddings()
        head_source = next(n for n, m in skeleton.named_modules() if m is embed) + ".weight"
    with atomic_output_dir(Path(out)) as tmp:
        report = _write_shards(groups, set(names), head_name, head_source, tmp)
        saved_config = type(config).from_dict(config.to_dict())
        if head and tied:
            saved_config.tie_word_embeddings = False
        saved_config.save_pretrained(tmp)
        if streamed:
            copy_generation_config(Path(source), tmp)
        elif getattr(source, "generation_config", None) is not None:
            source.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report.update({"file_format": FORMAT, "scheme": SCHEME, "kernel": KERNEL, "quantized": names,
                       "head_quantized": bool(head and head_name), "head_untied": bool(head and tied),
                       "streamed": streamed, "quantized_ratio": report["quantized_stored_bytes"] / max(1, report["quantized_dense_bytes"]),
                       "file_ratio": report["weights_file_bytes"] / max(1, report["dense_bytes"])})
        write_json_atomic(tmp / MANIFEST, report)
    return report


def export_int8(model_spec: str, out: Path, head: bool = True, show_progress: bool = True) -> dict:
    """`asft export --format int8`: streamed from a safetensors model folder, else loaded whole."""
    from asft_ray.models import is_safetensors_dir, load_model, load_tokenizer, resolve_model

    source = resolve_model(model_spec)
    if is_int8_folder(source.location):
        raise AsftError(f"{model_spec} is already an int8 export; give the float model it came from")
    if is_safetensors_dir(source):
        return save_int8(Path(source.location), out, load_tokenizer(model_spec), head=head)
    model, tokenizer = load_model(model_spec, "cpu", show_progress=show_progress)
    return save_int8(model, out, tokenizer, head=head)


def is_int8_folder(path) -> bool:
    """The one test for an int8 export (what load_model loads with load_int8): its manifest is there."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise AsftError(f"{folder} is not an int8 export (no readable {MANIFEST})") from err
    if manifest.get("file_format") != FORMAT:
        raise AsftError(f"{folder}/{MANIFEST} is format {manifest.get('file_format')!r}, not {FORMAT}")
    return manifest


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every stored tensor of an int8 folder, by name (int8 weights and their scales as stored)."""
    from safetensors import safe_open

    paths = sorted(Path(folder).glob("model.int8-*.safetensors"))
    if not paths:
        raise AsftError(f"{folder} has no model.int8-*.safetensors shards")
    state = {}
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") != FORMAT:
                raise AsftError(f"{path} is not in format {FORMAT}")
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


@torch.no_grad()
def load_int8(folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The model of an int8 folder: quantized modules with exactly the stored int8 values and
    scales, every other tensor in `dtype`. CPU only (torch's int8 Linear is a CPU kernel)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if device != "cpu":
        raise AsftError(f"int8 models run on the CPU (torch's quantized Linear); device {device!r} asked for")
    folder = Path(folder)
    manifest = read_manifest(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    config.use_cache = False
    state = load_state(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    for name in manifest["quantized"]:
        key = f"{name}.weight"
        if key not in state or key + SCALE not in state or state[key].dtype != torch.int8:
            raise AsftError(f"{folder}: quantized module {name} has no int8 weight and scale")
        bias = state.pop(f"{name}.bias", None)
        model.set_submodule(name, int8_linear(state.pop(key), state.pop(key + SCALE), bias))
    for key, t in state.items():  # not load_state_dict: the quantized modules would ask for their own keys
        module_name, _, attr = key.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        if module is None or attr not in module._parameters:
            raise AsftError(f"{folder}: tensor {key} has no place in the model the config describes")
        module._parameters[attr] = nn.Parameter(t.to(dtype) if t.is_floating_point() else t, requires_grad=False)
    if getattr(config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _fresh_rotary(model)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise AsftError(f"{folder}: weights missing for {left[:3]} ({len(left)} in all)")
    return model.eval()


def _fresh_rotary(model: nn.Module) -> None:
    """Rotary tables are computed from the config, not stored: rebuild the ones still on `meta`."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not type(module).__name__.endswith("RotaryEmbedding"):
                raise AsftError(f"cannot rebuild buffer of {name} ({type(module).__name__}): not in the checkpoint")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, type(module)(config=model.config))
