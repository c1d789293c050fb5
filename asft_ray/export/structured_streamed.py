"""The structured export of a safetensors model folder, one decoder layer in memory at a time.

The same result as `structure_in_memory` (asft_ray/export/structured.py), with the model never
whole in this process. The model is a skeleton on `meta` (pruning.streaming.build_skeleton);
the calibration inputs of layer 0 are captured, the embeddings freed, and the activations are
carried from layer to layer as the pruning engine carries them. The in-memory export measures
everything on the dense model, so the activations go through each *dense* layer, before it
is shrunk. For each layer:

    read it from the shards -> input statistics -> its plan -> refit -> shrink
        -> [block reconstruction] -> write it -> back to meta

(a layer to be dropped is only read, run for the next layer's inputs and freed). Block
reconstruction fits each shrunk layer on the structured model's own activations, carried beside
the dense ones: the in-memory export runs this same loop then (structure_resident).

A layer's plan needs only its own scores and every layer's unit counts, which the ratios give
before any weight is read (pruning.structured.unit_counts): one pass does it. Dropping layers
needs every layer's block influence before the first layer is written (the written layers are
numbered without the dropped ones), so then a first pass through the dense layers measures
them, as OWL's outlier pass does for streamed pruning.
"""

from __future__ import annotations

from pathlib import Path

import torch

from asft_ray.artifacts import atomic_output_dir
from asft_ray.export.structured import (
    StructureSettings,
    drop_layers,
    head_geometry,
    model_sizes,
    refit_layer,
    shrink_config,
    shrink_layer,
    size_report,
    write_report,
)
from asft_ray.models import decoder_layers
from asft_ray.progress import progress
from asft_ray.pruning.engine import LocalRunner, ResidentLayers, capture_layer0_inputs
from asft_ray.pruning.streaming import StreamedLayers, build_skeleton, copy_generation_config
from asft_ray.pruning.structured import layers_to_drop, mean_block_influence, plan_layer, unit_counts


def _runner(captured: tuple) -> LocalRunner:
    """The activations in this process, all samples in one chunk: statistics are then added
    sample by sample in order, as collect_input_norms adds them in memory (bit-identical sums)."""
    inputs, args, kwargs = captured
    return LocalRunner(inputs, args, kwargs, chunk_size=len(inputs))


@torch.no_grad()
def dense_block_influences(layers, store: StreamedLayers, runner: LocalRunner) -> list[float]:
    """Each dense layer's mean block influence (pruning.structured.block_influences), reading one layer at a time."""
    influences = []
    for index, layer in enumerate(layers):
        store.load(index, layer)
        inputs = runner.outputs()
        runner.advance(layer)
        influences.append(mean_block_influence(inputs, runner.outputs()))
        store.free(index, layer)
    return influences


@torch.no_grad()
def structure_layers(layers: list, cfg, store, captured: tuple | None, settings: StructureSettings, dropped: list[int],
                     show_progress: bool) -> tuple[list[dict], list[dict]]:
    """Plan, refit and shrink each decoder layer in turn (the store loads it before and writes it
    after; dropped layers only feed the next one). Returns the plan and, with block
    reconstruction, one row per kept layer.

    Statistics come from the dense model's activations (`runner`, pushed through each dense layer
    before it is shrunk). With reconstruction, a second runner (`fitted`) carries the structured
    model's own activations: each shrunk layer is fitted so that, fed them, it gives the dense
    layer's outputs (the dense runner's, just advanced), then `fitted` goes through it. Its target
    is the dense hidden state after every layer, dropped ones too, so a layer also makes up for
    what the layers removed before it changed."""
    mlp_counts, group_counts = unit_counts(cfg, len(layers), settings.mlp_ratio, settings.head_ratio)
    hd, rep = head_geometry(cfg)
    runner = _runner(captured) if captured is not None else None
    fitted = _runner(captured) if settings.reconstruction is not None else None
    plan, rows = [], []
    for index, layer in enumerate(progress(layers, "structured layers", show_progress)):
        store.load(index, layer)
        if index in dropped:  # it only feeds the next layer; its plan entry only gives its counts
            if runner is not None:
                runner.advance(layer)
            plan.append(plan_layer(layer, cfg, index, mlp_counts, group_counts))
            store.free(index, layer)
            continue
        stats = None
        if runner is not None:
            stats = runner.collect(layer, hessian=settings.refit)
            runner.advance(layer)  # the dense layer's outputs: the next layer's inputs
        plan.append(plan_layer(layer, cfg, index, mlp_counts, group_counts, stats))
        if settings.refit:
            refit_layer(layer, plan[-1], stats, hd, rep)
        del stats
        shrink_layer(layer, plan[-1], hd, rep)
        if fitted is not None:
            rows.append({"layer": index, **fitted.reconstruct(layer, runner, settings.reconstruction, index)})
            fitted.advance(layer)
        # numbered as in the model that is written: without the dropped layers before it
        store.release(index - sum(d < index for d in dropped), layer)
    return plan, rows


def _reconstruction_report(rows: list[dict]) -> dict:
    return {"reconstruction_layers": rows} if rows else {}


@torch.no_grad()
def structure_resident(model, calib_ids: torch.Tensor, settings: StructureSettings) -> dict:
    """structure_in_memory's form for block reconstruction: the model whole in memory, the same
    layer loop as the streamed export (so both give the same model). Returns the size report."""
    cfg = model.config
    layers = list(decoder_layers(model))
    before = model_sizes(model)
    captured = capture_layer0_inputs(model, calib_ids)
    store = ResidentLayers()
    influences, dropped = None, []
    if settings.drop_layers:
        influences = dense_block_influences(layers, store, _runner(captured))
        dropped = layers_to_drop(influences, settings.drop_layers)
    plan, rows = structure_layers(layers, cfg, store, captured, settings, dropped, show_progress=False)
    shrink_config(cfg, plan)
    if dropped:
        drop_layers(model, dropped)
    return {**size_report(model, before, plan), "layers_dropped": dropped, "block_influence": influences,
            **_reconstruction_report(rows)}


@torch.no_grad()
def structure_streamed(folder: Path, tokenizer, out: Path, calib_ids: torch.Tensor | None,
                       settings: StructureSettings, extra_report: dict, show_progress: bool = True) -> dict:
    """Write the structured model of the safetensors folder `folder` into `out` (atomically): the
    weights, config, tokenizer and structured.json (the size report, `extra_report` and
    `"streamed": True`). Returns the report."""
    model, reader = build_skeleton(Path(folder), load_head=False)  # an untied lm_head is only copied
    cfg = model.config
    layers = list(decoder_layers(model))  # all of them: the dropped ones too feed the next layer
    before = model_sizes(model)
    captured = capture_layer0_inputs(model, calib_ids) if calib_ids is not None else None
    reading = StreamedLayers(model, reader, None)
    reading.after_capture(model)
    influences, dropped = None, []
    if settings.drop_layers:
        influences = dense_block_influences(layers, reading, _runner(captured))
        dropped = layers_to_drop(influences, settings.drop_layers)
    with atomic_output_dir(Path(out)) as tmp:
        store = StreamedLayers(model, reader, tmp)
        plan, rows = structure_layers(layers, cfg, store, captured, settings, dropped, show_progress)
        shrink_config(cfg, plan)
        if dropped:
            drop_layers(model, dropped)
        report = {**size_report(model, before, plan), "layers_dropped": dropped, "block_influence": influences,
                  **_reconstruction_report(rows), **extra_report, "streamed": True}
        store.finish(model)
        cfg.save_pretrained(tmp)
        copy_generation_config(reader.folder, tmp)
        tokenizer.save_pretrained(tmp)
        return write_report(tmp, report)
