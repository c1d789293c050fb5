"""Measured sparsity: the fraction of exactly-zero weights in the decoder layers' linears."""

from __future__ import annotations

from torch import nn

from asft_ray.models import decoder_layers, prunable_linears


def linear_sparsity(linears: dict[str, nn.Linear]) -> dict:
    zeros = {name: int((lin.weight == 0).sum()) for name, lin in linears.items()}
    sizes = {name: lin.weight.numel() for name, lin in linears.items()}
    return {
        "sparsity": sum(zeros.values()) / sum(sizes.values()),
        "zeros": sum(zeros.values()),
        "weights": sum(sizes.values()),
        "linears": {name: zeros[name] / sizes[name] for name in linears},
    }


def _measured_linears(layer: nn.Module) -> dict:
    """The layer's float linears, or its int8 ones in a model loaded from an int8 export."""
    from asft_ray.export.int8 import Int8Linear

    return prunable_linears(layer) or {name: m for name, m in layer.named_modules() if isinstance(m, Int8Linear)}


def model_sparsity(model: nn.Module) -> dict:
    """{"total": fraction over the decoder layers' linears, "layers": [fraction per decoder layer],
    "lm_head": fraction of the output projection (pruned only when asked)}."""
    per_layer = [linear_sparsity(_measured_linears(layer)) for layer in decoder_layers(model)]
    zeros = sum(r["zeros"] for r in per_layer)
    weights = sum(r["weights"] for r in per_layer)
    head = model.get_output_embeddings()
    return {
        "total": zeros / weights,
        "prunable_weights": weights,
        "layers": [r["sparsity"] for r in per_layer],
        "lm_head": float((head.weight == 0).float().mean()) if head is not None else None,
    }


def sparsity_from_report(rows: list[dict]) -> dict:
    """model_sparsity's totals from the engine's per-layer report (for streamed models, whose
    layers are no longer in memory)."""
    layers = [r for r in rows if r["layer"] != "lm_head"]
    head = [r for r in rows if r["layer"] == "lm_head"]
    zeros = sum(r["zeros"] for r in layers)
    weights = sum(r["weights"] for r in layers)
    return {
        "total": zeros / weights,
        "prunable_weights": weights,
        "layers": [r["sparsity"] for r in layers],
        "lm_head": head[0]["sparsity"] if head else None,
    }


def linear_zero_fractions(model: nn.Module) -> dict[tuple[int, str], float]:
    """{(layer index, linear name): fraction of exact zeros} of a model in memory."""
    return {(i, name): fraction for i, layer in enumerate(decoder_layers(model))
            for name, fraction in linear_sparsity(prunable_linears(layer))["linears"].items()}


def _linear_zero_counts(folder):
    """(meta-device model, reader, [(layer, linear name, zeros, size)]) of a safetensors model
    directory, read one linear at a time (never the whole model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from asft_ray.pruning.streaming import SafetensorsReader, layers_prefix

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=False))
    reader, prefix = SafetensorsReader(folder), layers_prefix(model)
    counts = []
    for index, layer in enumerate(decoder_layers(model)):
        for name in prunable_linears(layer):
            weight = reader.get(f"{prefix}.{index}.{name}.weight")
            counts.append((index, name, int((weight == 0).sum()), weight.numel()))
    return model, reader, counts


def linear_zero_fractions_in(folder) -> dict[tuple[int, str], float]:
    """linear_zero_fractions of a safetensors model directory, one linear in memory at a time."""
    return {(i, name): zeros / size for i, name, zeros, size in _linear_zero_counts(folder)[2]}


def sparsity_from_safetensors(folder) -> dict:
    """model_sparsity of a safetensors model directory, read one linear at a time (never the whole model)."""
    model, reader, counts = _linear_zero_counts(folder)
    rows = []
    for index in range(len(decoder_layers(model))):
        mine = [(zeros, size) for i, _, zeros, size in counts if i == index]
        zeros, sizes = sum(z for z, _ in mine), sum(n for _, n in mine)
        rows.append({"layer": index, "sparsity": zeros / sizes, "zeros": zeros, "weights": sizes})
    head_key = next((k for k, p in model.named_parameters() if p is getattr(model.get_output_embeddings(), "weight", None)), None)
    if head_key in reader and not getattr(model.config, "tie_word_embeddings", False):
        rows.append({"layer": "lm_head", "sparsity": float((reader.get(head_key) == 0).float().mean())})
    return sparsity_from_report(rows)
