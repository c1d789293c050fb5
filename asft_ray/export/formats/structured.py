"""structured: remove MLP channels and KV groups (and, optionally, whole decoder layers) for a
smaller dense model (asft_ray/export/structured.py, plans from asft_ray/pruning/structured.py)."""

from __future__ import annotations

from pathlib import Path

from asft_ray.errors import AsftError
from asft_ray.export.formats.registry import ExportFormat, ExportOptions, register


def check(model_spec: str, options: ExportOptions) -> None:
    if (options.drop_layers or options.refit) and options.nsamples < 1:
        raise AsftError("--drop-layers and --refit measure on calibration data: pass --nsamples (e.g. 32)")
    if options.drop_layers:
        from asft_ray.models import model_config

        layers = model_config(model_spec).num_hidden_layers
        if not 0 < options.drop_layers < layers:
            raise AsftError(f"--drop-layers must be between 1 and {layers - 1} for a {layers}-layer model, "
                            f"got {options.drop_layers}")


def write(model_spec: str, out: Path, options: ExportOptions) -> dict:
    """Scores: |W|·‖X‖ over `nsamples` C4 windows, else weight magnitude. `drop_layers` whole decoder
    layers of lowest block influence go, and `refit` refits down_proj / o_proj by least squares on
    the kept channels and heads (both need calibration)."""
    from asft_ray.export.run import parse_ratio
    from asft_ray.export.structured import drop_layers, parameter_count, refit_consumers, save_structured, shrink
    from asft_ray.models import load_model
    from asft_ray.pruning.structured import block_influences, collect_input_norms, layers_to_drop, plan_structured

    model, tokenizer = load_model(model_spec, options.device, show_progress=options.show_progress)
    mlp_ratio, head_ratio = parse_ratio(options.mlp_ratio), parse_ratio(options.head_ratio)
    nsamples, drop, refit = options.nsamples, options.drop_layers, options.refit
    stats, influences = None, None
    if nsamples > 0:
        from asft_ray.data import c4_documents, sample_calibration

        calib = sample_calibration(c4_documents(options.data_dir), tokenizer, nsamples, options.seqlen, options.seed)
        stats = collect_input_norms(model, calib, hessian=refit)
        if drop:
            influences = block_influences(model, calib)  # the dense model's, as ShortGPT measures them
    plan = plan_structured(model, mlp_ratio, head_ratio, stats)
    if refit:
        refit_consumers(model, plan, stats)
    del stats
    report = shrink(model, plan)
    dropped = layers_to_drop(influences, drop) if drop else []
    if dropped:
        before = report["after"]["parameters"]
        drop_layers(model, dropped)
        report["after"] = {**report["after"], "parameters": parameter_count(model),
                           "num_hidden_layers": model.config.num_hidden_layers}
        report["parameter_ratio"] *= report["after"]["parameters"] / before
    report.update({"mlp_ratio": mlp_ratio, "head_ratio": head_ratio, "nsamples": nsamples, "refit": refit,
                   "layers_dropped": dropped, "block_influence": influences,
                   "scores": "wanda-style |W|*||X||" if nsamples > 0 else "magnitude |W|"})
    return save_structured(model, tokenizer, out, report)


def describe(model_spec: str, out: Path, report: dict) -> str:
    return (f"{model_spec} -> {out}: {report['after']['parameters']:,} parameters "
            f"({report['parameter_ratio']:.1%} of {report['before']['parameters']:,})")


register(ExportFormat("structured", summary="remove MLP channels and KV groups", write=write, describe=describe,
                      check=check, options={"mlp_ratio", "head_ratio", "drop_layers", "refit"}))
