"""Shrink a model by removing MLP channels and whole KV groups, and save it as a normal HF model.

Transformers' Llama config has one `intermediate_size`, one `num_attention_heads` and one
`num_key_value_heads` for all layers, so the exported model has the same (shrunk) shape in
every layer: the largest count any layer keeps. A layer that asked to keep fewer units keeps
the extra ones zeroed (exact: a zero channel or zero KV group contributes nothing), so a
per-layer ratio list changes the result but only the uniform part of it shrinks the files.
Heads go by whole KV groups (a KV head with all its query heads), so the query-per-KV ratio,
and with it grouped-query attention, is unchanged. head_dim is written into the config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from asft_ray.artifacts import atomic_output_dir, write_json_atomic
from asft_ray.models import decoder_layers, save_model

REPORT = "structured.json"


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def keep_rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    idx = idx.to(lin.weight.device)
    bias = lin.bias.index_select(0, idx) if lin.bias is not None else None
    return _linear(lin.weight.detach().index_select(0, idx), bias)


def keep_columns(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    return _linear(lin.weight.detach().index_select(1, idx.to(lin.weight.device)), lin.bias)


def group_rows(groups: torch.Tensor, rows_per_group: int) -> torch.Tensor:
    """Row indices of whole groups: group g owns rows g*rows_per_group ... (g+1)*rows_per_group - 1."""
    return (groups[:, None] * rows_per_group + torch.arange(rows_per_group)[None, :]).reshape(-1)


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _dropped(plan_layer: dict, unit: str) -> torch.Tensor:
    """Units that stay in the tensor shape but beyond this layer's own count: to be zeroed."""
    keep = plan_layer[f"{unit}_keep"]
    return keep[plan_layer[f"{unit}_rank"][keep] >= plan_layer[f"{unit}_count"]]


@torch.no_grad()
def zero_units(model: nn.Module, plan: list[dict], only_dropped: bool = False) -> None:
    """Zero, in the full-size model, every unit the plan removes (or, with `only_dropped`, only the
    kept-for-shape units beyond each layer's count). Zeroing = removing, for the outputs."""
    cfg = model.config
    hd, rep = _head_dim(cfg), cfg.num_attention_heads // cfg.num_key_value_heads
    for layer, p in zip(decoder_layers(model), plan):
        if only_dropped:
            channels, groups = _dropped(p, "mlp"), _dropped(p, "groups")
        else:
            channels = torch.tensor([c for c in range(p["mlp_rank"].numel()) if p["mlp_rank"][c] >= p["mlp_count"]],
                                    dtype=torch.long)
            groups = torch.tensor([g for g in range(p["groups_rank"].numel()) if p["groups_rank"][g] >= p["groups_count"]],
                                  dtype=torch.long)
        mlp, attn = layer.mlp, layer.self_attn
        mlp.gate_proj.weight[channels] = 0
        mlp.up_proj.weight[channels] = 0
        mlp.down_proj.weight[:, channels] = 0
        q_rows, kv_rows = group_rows(groups, rep * hd), group_rows(groups, hd)
        attn.q_proj.weight[q_rows] = 0
        attn.k_proj.weight[kv_rows] = 0
        attn.v_proj.weight[kv_rows] = 0
        attn.o_proj.weight[:, q_rows] = 0
        for lin, rows in ((mlp.gate_proj, channels), (mlp.up_proj, channels), (attn.q_proj, q_rows),
                          (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
            if lin.bias is not None:
                lin.bias[rows] = 0


def own_units(plan_layer: dict, unit: str) -> torch.Tensor:
    """The units a layer keeps by its own count (ascending): `*_keep` minus the ones kept only for shape."""
    keep = plan_layer[f"{unit}_keep"]
    return keep[plan_layer[f"{unit}_rank"][keep] < plan_layer[f"{unit}_count"]]


@torch.no_grad()
def refit_consumers(model: nn.Module, plan: list[dict], stats: list) -> None:
    """Least-squares refit (pruning.structured.refit_columns) of the weights that read the removed
    units, in the full-size model: down_proj on its layer's kept MLP channels, o_proj on the kept
    query heads; the removed columns become zero. The kept units' inputs are the dense model's,
    so on the calibration tokens this is the best any reweighting of the kept columns can do."""
    from asft_ray.pruning.structured import refit_columns

    cfg = model.config
    hd, rep = _head_dim(cfg), cfg.num_attention_heads // cfg.num_key_value_heads
    for layer, p, s in zip(decoder_layers(model), plan, stats):
        for lin, name, keep in ((layer.mlp.down_proj, "mlp.down_proj", own_units(p, "mlp")),
                                (layer.self_attn.o_proj, "self_attn.o_proj", group_rows(own_units(p, "groups"), rep * hd))):
            refit = refit_columns(lin.weight, s.hessian(name), keep)
            lin.weight.zero_()
            lin.weight[:, keep.to(lin.weight.device)] = refit


@torch.no_grad()
def drop_layers(model: nn.Module, indices: list[int]) -> None:
    """Remove whole decoder layers in place (depth pruning); the rest are renumbered as transformers
    would build them, so the saved model reloads with `num_hidden_layers` fewer layers."""
    layers = decoder_layers(model)
    kept = [layer for i, layer in enumerate(layers) if i not in set(indices)]
    for new_index, layer in enumerate(kept):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index
    layers_parent = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers_parent.layers = nn.ModuleList(kept)
    cfg = model.config
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in set(indices)]
    cfg.num_hidden_layers = len(kept)


def parameter_count(model: nn.Module) -> int:
    """Parameters, counting tied tensors once."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def shrink(model: nn.Module, plan: list[dict]) -> dict:
    """Remove the planned units in place and update the config. Returns the size report."""
    cfg = model.config
    hd, rep = _head_dim(cfg), cfg.num_attention_heads // cfg.num_key_value_heads
    before = {"intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
              "num_key_value_heads": cfg.num_key_value_heads, "parameters": parameter_count(model)}
    zero_units(model, plan, only_dropped=True)
    for layer, p in zip(decoder_layers(model), plan):
        mlp, attn = layer.mlp, layer.self_attn
        mlp.gate_proj = keep_rows(mlp.gate_proj, p["mlp_keep"])
        mlp.up_proj = keep_rows(mlp.up_proj, p["mlp_keep"])
        mlp.down_proj = keep_columns(mlp.down_proj, p["mlp_keep"])
        q_rows, kv_rows = group_rows(p["groups_keep"], rep * hd), group_rows(p["groups_keep"], hd)
        attn.q_proj = keep_rows(attn.q_proj, q_rows)
        attn.k_proj = keep_rows(attn.k_proj, kv_rows)
        attn.v_proj = keep_rows(attn.v_proj, kv_rows)
        attn.o_proj = keep_columns(attn.o_proj, q_rows)
    groups = plan[0]["groups_keep"].numel()
    cfg.head_dim = hd
    cfg.intermediate_size = plan[0]["mlp_keep"].numel()
    cfg.num_key_value_heads = groups
    cfg.num_attention_heads = groups * rep
    after = {"intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
             "num_key_value_heads": cfg.num_key_value_heads, "parameters": parameter_count(model)}
    return {
        "before": before, "after": after, "head_dim": hd,
        "parameter_ratio": after["parameters"] / before["parameters"],
        "mlp_channels_per_layer": [p["mlp_count"] for p in plan],
        "kv_groups_per_layer": [p["groups_count"] for p in plan],
    }


def save_structured(model, tokenizer, out: Path, report: dict) -> dict:
    """Save the shrunk model as an ordinary HF checkpoint (safetensors) plus structured.json."""
    with atomic_output_dir(Path(out)) as tmp:
        save_model(model, tokenizer, tmp)
        report = {**report, "weights_bytes": sum(f.stat().st_size for f in tmp.glob("*.safetensors"))}
        write_json_atomic(tmp / REPORT, report)
    return report
