"""Measured sparsity: the fraction of exactly-zero weights in the decoder layers' linears."""

from __future__ import annotations

import torch
from torch import nn

from asft_ray.models import decoder_layers, prunable_linears


def count_zeros(t: torch.Tensor) -> int:
    """Exact zeros of `t`, with no temporary: `(t == 0).sum()` sums a bool tensor as int64, 8 bytes
    per element (2x a float32 weight; 0.5 GiB for a 32000 x 2048 lm_head)."""
    return t.numel() - int(torch.count_nonzero(t))


def zero_fraction(weight: torch.Tensor) -> float:
    return count_zeros(weight) / weight.numel()


def linear_sparsity(linears: dict[str, nn.Linear]) -> dict:
    zeros = {name: count_zeros(lin.weight) for name, lin in linears.items()}
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
        "lm_head": zero_fraction(head.weight) if head is not None else None,
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


class ZeroCounts:
    """model_sparsity of a safetensors model, counted while a streamed pass (eval/streamed.py) has
    each decoder layer in memory anyway: an evaluation reads the shards once, not twice. The
    output projection counts only when it is a matrix of its own (a tied one is the embedding)."""

    def __init__(self):
        self.rows: list[dict] = []

    def add_layer(self, index: int, layer: nn.Module) -> None:
        counted = linear_sparsity(prunable_linears(layer))
        self.rows.append({"layer": index, **{k: counted[k] for k in ("sparsity", "zeros", "weights")}})

    def add_head(self, head: nn.Module, tied: bool) -> None:
        if not tied:
            self.rows.append({"layer": "lm_head", "sparsity": zero_fraction(head.weight)})

    def result(self) -> dict:
        return sparsity_from_report(self.rows)


def linear_zero_fractions_in(folder) -> dict[tuple[int, str], float]:
    """linear_zero_fractions of a safetensors model directory, one linear in memory at a time."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from asft_ray.pruning.streaming import SafetensorsReader, layers_prefix

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=False))
    reader, prefix = SafetensorsReader(folder), layers_prefix(model)
    return {(index, name): zero_fraction(reader.get(f"{prefix}.{index}.{name}.weight"))
            for index, layer in enumerate(decoder_layers(model)) for name in prunable_linears(layer)}
