"""Shrink a model by removing MLP channels and whole KV groups, and save it as a normal HF model.

Transformers' Llama config has one `intermediate_size`, one `num_attention_heads` and one
`num_key_value_heads` for all layers, so the exported model has the same (shrunk) shape in
every layer: the largest count any layer keeps. A layer that asked to keep fewer units keeps
the extra ones zeroed (exact: a zero channel or zero KV group contributes nothing), so a
per-layer ratio list changes the result but only the uniform part of it shrinks the files.
Heads go by whole KV groups (a KV head with all its query heads), so the query-per-KV ratio,
and with it grouped-query attention, is unchanged. head_dim is written into the config.

Each step has a one-layer form (`zero_layer_units`, `refit_layer`, `shrink_layer`): the
model-wide functions loop over them here, and the streamed export (structured_streamed.py)
applies them to each layer as it reads it from the shards.
"""

from __future__ import annotations

from dataclasses import dataclass
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


def head_geometry(cfg) -> tuple[int, int]:
    """(head_dim, query heads per KV head) of the unshrunk config."""
    return _head_dim(cfg), cfg.num_attention_heads // cfg.num_key_value_heads


def _dropped(plan_layer: dict, unit: str) -> torch.Tensor:
    """Units that stay in the tensor shape but beyond this layer's own count: to be zeroed."""
    keep = plan_layer[f"{unit}_keep"]
    return keep[plan_layer[f"{unit}_rank"][keep] >= plan_layer[f"{unit}_count"]]


@torch.no_grad()
def zero_units(model: nn.Module, plan: list[dict], only_dropped: bool = False) -> None:
    """Zero, in the full-size model, every unit the plan removes (or, with `only_dropped`, only the
    kept-for-shape units beyond each layer's count). Zeroing = removing, for the outputs."""
    hd, rep = head_geometry(model.config)
    for layer, p in zip(decoder_layers(model), plan):
        zero_layer_units(layer, p, hd, rep, only_dropped)


@torch.no_grad()
def zero_layer_units(layer: nn.Module, p: dict, hd: int, rep: int, only_dropped: bool = False) -> None:
    """zero_units of one decoder layer with its plan entry `p`."""
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
    hd, rep = head_geometry(model.config)
    for layer, p, s in zip(decoder_layers(model), plan, stats):
        refit_layer(layer, p, s, hd, rep)


@torch.no_grad()
def refit_layer(layer: nn.Module, p: dict, stats, hd: int, rep: int) -> None:
    """refit_consumers of one decoder layer with its plan entry `p` and input statistics `stats`,
    whose Hessians it consumes: those of inputs it does not refit go first, each of the other two
    once its system is built, before the solve (down_proj's input: 254 MB for a 1.57 B model)."""
    from asft_ray.pruning.structured import refit_system, solve_refit

    refits = ((layer.mlp.down_proj, "mlp.down_proj", own_units(p, "mlp")),
              (layer.self_attn.o_proj, "self_attn.o_proj", group_rows(own_units(p, "groups"), rep * hd)))
    used = {stats.source[name] for _, name, _ in refits}
    for unused in [key for key in stats.hessians if key not in used]:
        del stats.hessians[unused]
    for lin, name, keep in refits:
        system = refit_system(lin.weight, stats.hessian(name), keep, consume=True)
        del stats.hessians[stats.source[name]]
        refit = solve_refit(*system, lin.weight.dtype)
        del system
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


def model_sizes(model: nn.Module) -> dict:
    """The config's sizes and the parameter count (a model on `meta` counts as well)."""
    cfg = model.config
    return {"intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "num_hidden_layers": cfg.num_hidden_layers,
            "parameters": parameter_count(model)}


@torch.no_grad()
def shrink_layer(layer: nn.Module, p: dict, hd: int, rep: int) -> None:
    """Remove one decoder layer's planned units in place (plan entry `p`; the config is shrink_config's)."""
    zero_layer_units(layer, p, hd, rep, only_dropped=True)
    mlp, attn = layer.mlp, layer.self_attn
    mlp.gate_proj = keep_rows(mlp.gate_proj, p["mlp_keep"])
    mlp.up_proj = keep_rows(mlp.up_proj, p["mlp_keep"])
    mlp.down_proj = keep_columns(mlp.down_proj, p["mlp_keep"])
    q_rows, kv_rows = group_rows(p["groups_keep"], rep * hd), group_rows(p["groups_keep"], hd)
    attn.q_proj = keep_rows(attn.q_proj, q_rows)
    attn.k_proj = keep_rows(attn.k_proj, kv_rows)
    attn.v_proj = keep_rows(attn.v_proj, kv_rows)
    attn.o_proj = keep_columns(attn.o_proj, q_rows)


def shrink_config(cfg, plan: list[dict]) -> None:
    """The shrunk sizes (every layer has the plan's shape), with head_dim written out."""
    hd, rep = head_geometry(cfg)
    groups = plan[0]["groups_keep"].numel()
    cfg.head_dim = hd
    cfg.intermediate_size = plan[0]["mlp_keep"].numel()
    cfg.num_key_value_heads = groups
    cfg.num_attention_heads = groups * rep


def size_report(model: nn.Module, before: dict, plan: list[dict]) -> dict:
    """Sizes before (model_sizes of the dense model) and now, and each layer's own counts."""
    after = model_sizes(model)
    return {
        "before": before, "after": after, "head_dim": model.config.head_dim,
        "parameter_ratio": after["parameters"] / before["parameters"],
        "mlp_channels_per_layer": [p["mlp_count"] for p in plan],
        "kv_groups_per_layer": [p["groups_count"] for p in plan],
    }


@torch.no_grad()
def shrink(model: nn.Module, plan: list[dict]) -> dict:
    """Remove the planned units in place and update the config. Returns the size report."""
    before = model_sizes(model)
    hd, rep = head_geometry(model.config)
    for layer, p in zip(decoder_layers(model), plan):
        shrink_layer(layer, p, hd, rep)
    shrink_config(model.config, plan)
    return size_report(model, before, plan)


@dataclass(frozen=True)
class StructureSettings:
    """What the structured export removes: MLP channels and KV groups (one ratio, or one per layer),
    whole layers (`drop_layers`, by block influence), whether down_proj / o_proj are refit, and
    whether each shrunk layer is then fitted to the dense hidden states (block reconstruction).
    Refit, drop_layers and reconstruction need calibration data."""

    mlp_ratio: float | list[float] = 0.0
    head_ratio: float | list[float] = 0.0
    refit: bool = False
    drop_layers: int = 0
    reconstruction: object | None = None  # a pruning.reconstruct.Reconstruction: fit each shrunk layer after its refit


def structure_in_memory(model: nn.Module, calib_ids: torch.Tensor | None, settings: StructureSettings) -> dict:
    """The structured model, in place, from a model that is whole in memory. Statistics, block
    influences and refits are all the dense model's. Returns the size report (dropped layers too).
    Block reconstruction fits each layer on the structured model's own activations, so it goes
    layer by layer, through the loop the streamed export runs (structured_streamed.structure_layers)."""
    from asft_ray.pruning.structured import block_influences, collect_input_norms, layers_to_drop, plan_structured

    if settings.reconstruction is not None:
        from asft_ray.export.structured_streamed import structure_resident

        return structure_resident(model, calib_ids, settings)

    stats = collect_input_norms(model, calib_ids, hessian=settings.refit) if calib_ids is not None else None
    influences = block_influences(model, calib_ids) if settings.drop_layers else None  # as ShortGPT measures them
    plan = plan_structured(model, settings.mlp_ratio, settings.head_ratio, stats)
    if settings.refit:
        refit_consumers(model, plan, stats)
    del stats
    report = shrink(model, plan)
    dropped = layers_to_drop(influences, settings.drop_layers) if settings.drop_layers else []
    if dropped:
        drop_layers(model, dropped)
        report = size_report(model, report["before"], plan)
    return {**report, "layers_dropped": dropped, "block_influence": influences}


def write_report(folder: Path, report: dict) -> dict:
    """structured.json in `folder` (the output being written), with the bytes of its weights files."""
    report = {**report, "weights_bytes": sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))}
    write_json_atomic(Path(folder) / REPORT, report)
    return report


def save_structured(model, tokenizer, out: Path, report: dict) -> dict:
    """Save the shrunk model as an ordinary HF checkpoint (safetensors) plus structured.json."""
    with atomic_output_dir(Path(out)) as tmp:
        save_model(model, tokenizer, tmp)
        return write_report(tmp, report)
