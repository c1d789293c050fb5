"""The one-shot pruning recipe: load -> calibrate -> prune -> save. A plain function over a PruneConfig."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

import asft_ray
from asft_ray.artifacts import RUN_FILE, atomic_output_dir, check_output_dir, read_run, write_json_atomic
from asft_ray.config import PruneConfig
from asft_ray.data import c4_documents, resolve_data_dir, sample_calibration
from asft_ray.errors import AsftError
from asft_ray.eval.sparsity import (
    linear_zero_fractions,
    linear_zero_fractions_in,
    model_sparsity,
    sparsity_from_report,
)
from asft_ray.models import check_seqlen, load_model, model_config, model_skeleton, resolve_model, save_model
from asft_ray.pruning.checkpoint import LayerCheckpoint
from asft_ray.pruning.engine import (
    LocalRunner,
    capture_layer0_inputs,
    check_pattern_fits,
    chunked_gradient_sums,
    prune_model,
)
from asft_ray.pruning.hooks import EngineHooks
from asft_ray.pruning.streaming import StreamedLayers, build_skeleton, copy_generation_config
from asft_ray.schedules import achieved_sparsity, build_schedule, linear_sizes
from asft_ray.schedules.owl import layer_outlier_ratios


def run_prune(
    cfg: PruneConfig, show_progress: bool = True, make_runner=LocalRunner, sum_gradients=chunked_gradient_sums,
    *, keep_zeros: bool = False, outliers: dict | None = None,
) -> dict:
    """Prune `cfg.model` and write it to `cfg.out` (atomically) with `asft_run.json`. Returns that record.

    If `cfg.out` already holds this exact run, nothing is recomputed. `make_runner` says where
    calibration activations are pushed through the layers (see pruning.engine.LocalRunner),
    `sum_gradients` where Taylor/Fisher gradients are computed. With `keep_zeros` (a staged
    run's later stages) no linear's planned sparsity goes below the zeros it already has;
    `outliers` are OWL's dense-model outlier ratios when already measured.
    """
    if check_output_dir(cfg.out, cfg.identity(), cfg.overwrite):
        return {**read_run(cfg.out), "reused": True}
    timings = {}
    start = time.perf_counter()
    calibrated = cfg.needs_calibration
    data_dir = resolve_data_dir(cfg.data_dir) if calibrated else None
    stream = cfg.streams()

    if stream:
        # the gradient methods need lm_head for the loss
        needs_head = cfg.prune_lm_head or cfg.recipe.gradients
        model, tokenizer, reader = _load_skeleton(cfg.model, load_head=needs_head)
    else:
        model, tokenizer = load_model(cfg.model, cfg.device, show_progress=show_progress)
        saved_dtype = source_dtype(cfg.model)
    check_pattern_fits(model, cfg.parsed_pattern, cfg.prune_lm_head)
    timings["load_s"] = time.perf_counter() - start

    calib_ids = None
    if calibrated:
        t = time.perf_counter()
        calib_ids = sample_calibration(c4_documents(data_dir), tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
        timings["calibration_data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    floor = None
    if keep_zeros:  # read from the weights as they are on disk (streamed) or in memory
        floor = linear_zero_fractions_in(reader.folder) if stream else linear_zero_fractions(model)
    sparsity, schedule = plan_sparsity(cfg, model, calib_ids, make_runner, show_progress, outliers, floor,
                                       StreamedLayers(model, reader, None) if stream else None)
    timings["schedule_s"] = time.perf_counter() - t

    checkpoint, resumed = None, 0
    if cfg.recipe.layerwise:
        checkpoint = LayerCheckpoint(partial_dir(cfg.out), cfg.identity(), cfg.resume)
        resumed = len(checkpoint.completed())
    # A streamed model is written layer by layer while it is pruned, so all of it happens
    # inside the atomic output folder.
    with atomic_output_dir(cfg.out) as tmp:
        t = time.perf_counter()
        layer_store = StreamedLayers(model, reader, tmp) if stream else None
        hooks = EngineHooks(make_runner=make_runner, layer_store=layer_store, checkpoint=checkpoint,
                            sum_gradients=sum_gradients)
        layers = prune_model(model, cfg.method, cfg.parsed_pattern, sparsity, calib_ids, show_progress,
                             cfg.prune_lm_head, true_sequential=cfg.true_sequential,
                             channel_permutation=cfg.channel_permutation, reconstruction=cfg.reconstruction,
                             hooks=hooks)
        timings["prune_s"] = time.perf_counter() - t
        record = {
            "inputs": cfg.identity(),
            "data_dir": data_dir,
            "calibration_tokens": 0 if calib_ids is None else int(calib_ids.numel()),
            "sparsity": sparsity_from_report(layers) if stream else model_sparsity(model),
            "streamed": stream,
            "layers": layers,
            "schedule": schedule,
            "resumed_layers": resumed,
            "timings": timings,
            "device": str(next(model.parameters()).device),
            "torch_threads": torch.get_num_threads(),
            "versions": {"asft_ray": asft_ray.__version__, "torch": torch.__version__, "python": platform.python_version()},
        }
        t = time.perf_counter()
        if stream:
            layer_store.finish(model)
            model.config.save_pretrained(tmp)
            copy_generation_config(reader.folder, tmp)
            tokenizer.save_pretrained(tmp)
        else:
            save_model(model.to(saved_dtype), tokenizer, tmp)  # in the checkpoint's dtype, as it came
        timings["save_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - start
        write_json_atomic(tmp / RUN_FILE, record)
    if checkpoint:
        checkpoint.remove()
    return record


def plan_sparsity(cfg: PruneConfig, model, calib_ids, make_runner=LocalRunner, show_progress: bool = True,
                  outliers: dict | None = None, floor: dict | None = None, layer_store=None):
    """(what the engine prunes to: cfg.sparsity or a per-layer plan, the schedule's record for asft_run.json).

    The owl schedule first measures the dense model's outlier ratios (one calibration pass,
    reading the layers through `layer_store` when streaming) unless `outliers` are given."""
    spec = cfg.schedule_spec
    if cfg.is_uniform and floor is None:
        return cfg.sparsity, {"spec": spec.to_dict(), "target": cfg.sparsity}
    if spec.name == "owl" and outliers is None:
        outliers = layer_outlier_ratios(model, make_runner(*capture_layer0_inputs(model, calib_ids)),
                                        show_progress=show_progress, layer_store=layer_store)
    plan = build_schedule(spec, model, cfg.sparsity, outliers, floor)
    record = {"spec": spec.to_dict(), "target": cfg.sparsity, "achieved": achieved_sparsity(
        {(i, n): s for i, row in plan.items() for n, s in row.items()}, linear_sizes(model)),
        "layers": [plan[i] for i in sorted(plan)], "outliers": outliers}
    plan["lm_head"] = {"lm_head": cfg.sparsity}
    return plan, record


def check_against_model_config(cfg: PruneConfig, targets: tuple[float, ...] = (), seqlen_used: bool | None = None) -> None:
    """What the model's config alone decides, checked before Ray starts or a weight is read: the
    window fits the model's context, an N:M group fits every pruned linear's input width, a
    schedule's lists match the layers and linears (non-owl schedules: owl needs data)."""
    config = model_config(cfg.model)
    if cfg.needs_calibration if seqlen_used is None else seqlen_used:
        check_seqlen(cfg.seqlen, config)
    skeleton = model_skeleton(config)
    check_pattern_fits(skeleton, cfg.parsed_pattern, cfg.prune_lm_head)
    if not cfg.is_uniform and cfg.schedule_spec.name != "owl":
        for target in targets or (cfg.sparsity,):
            build_schedule(cfg.schedule_spec, skeleton, target)


def _load_skeleton(spec: str, load_head: bool = True):
    """(meta-device model with its non-layer parts loaded, tokenizer, shard reader) for streaming."""
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    if source.gguf_file or source.is_hub:
        raise AsftError(f"layer streaming needs a local model directory with safetensors, not {spec!r}")
    model, reader = build_skeleton(Path(source.location), load_head)
    return model, AutoTokenizer.from_pretrained(source.location, trust_remote_code=False), reader


def source_dtype(spec: str) -> torch.dtype:
    """The dtype a model directory's safetensors weights are stored in (float32 for GGUF and hub sources,
    which are loaded as float32)."""
    from asft_ray.pruning.streaming import SafetensorsReader, checkpoint_dtype

    source = resolve_model(spec)
    if source.gguf_file or source.is_hub:
        return torch.float32
    try:
        return checkpoint_dtype(SafetensorsReader(Path(source.location)))
    except AsftError:  # no safetensors (e.g. a .bin checkpoint): as loaded
        return torch.float32


def partial_dir(out: str) -> Path:
    """Where a run's per-layer checkpoints live until its output is complete."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")
