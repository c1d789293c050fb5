"""The structured export of a safetensors model folder, one decoder layer in memory at a time.

The same result as `structure_in_memory` (asft_ray/export/structured.py), with the model never
whole in this process. The model is a skeleton on `meta` (pruning.streaming.build_skeleton);
the calibration inputs of layer 0 are captured, the embeddings freed, and the activations are
carried from layer to layer as the pruning engine carries them. The in-memory export measures
everything on the dense model, so the activations go through each *dense* layer, before it
is shrunk. For each layer:

    read it from the shards -> input statistics -> its plan -> refit -> shrink -> write it -> back to meta

(a layer to be dropped is only read, run for the next layer's inputs and freed).

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
from asft_ray.pruning.engine import LocalRunner, capture_layer0_inputs
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
def structure_streamed(folder: Path, tokenizer, out: Path, calib_ids: torch.Tensor | None,
                       settings: StructureSettings, extra_report: dict, show_progress: bool = True) -> dict:
    """Write the structured model of the safetensors folder `folder` into `out` (atomically): the
    weights, config, tokenizer and structured.json (the size report, `extra_report` and
    `"streamed": True`). Returns the report."""
    model, reader = build_skeleton(Path(folder), load_head=False)  # an untied lm_head is only copied
    cfg = model.config
    layers = list(decoder_layers(model))  # all of them: the dropped ones too feed the next layer
    mlp_counts, group_counts = unit_counts(cfg, len(layers), settings.mlp_ratio, settings.head_ratio)
    hd, rep = head_geometry(cfg)
    before = model_sizes(model)
    captured = capture_layer0_inputs(model, calib_ids) if calib_ids is not None else None
    reading = StreamedLayers(model, reader, None)
    reading.after_capture(model)
    influences, dropped = None, []
    if settings.drop_layers:
        influences = dense_block_influences(layers, reading, _runner(captured))
        dropped = layers_to_drop(influences, settings.drop_layers)
    runner = _runner(captured) if captured is not None else None
    plan = []
    with atomic_output_dir(Path(out)) as tmp:
        store = StreamedLayers(model, reader, tmp)
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
            # numbered as in the model that is written: without the dropped layers before it
            store.release(index - sum(d < index for d in dropped), layer)
        shrink_config(cfg, plan)
        if dropped:
            drop_layers(model, dropped)
        report = {**size_report(model, before, plan), "layers_dropped": dropped, "block_influence": influences,
                  **extra_report, "streamed": True}
        store.finish(model)
        cfg.save_pretrained(tmp)
        copy_generation_config(reader.folder, tmp)
        tokenizer.save_pretrained(tmp)
        return write_report(tmp, report)
