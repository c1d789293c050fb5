"""structured: remove MLP channels and KV groups (and, optionally, whole decoder layers) for a
smaller dense model (asft_ray/export/structured.py, plans from asft_ray/pruning/structured.py).

A safetensors model folder is exported one decoder layer at a time
(asft_ray/export/structured_streamed.py), a GGUF file or hub model loaded whole: the rule
`asft prune` streams by (models.is_safetensors_dir). Both give the same model."""

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
    from asft_ray.models import is_safetensors_dir, resolve_model

    if is_safetensors_dir(resolve_model(model_spec)):  # the rule `asft prune` streams by
        return write_streamed(model_spec, out, options)
    return write_in_memory(model_spec, out, options)


def write_in_memory(model_spec: str, out: Path, options: ExportOptions) -> dict:
    from asft_ray.export.structured import save_structured, structure_in_memory
    from asft_ray.models import load_model

    model, tokenizer = load_model(model_spec, options.device, show_progress=options.show_progress)
    settings = _settings(options)
    report = structure_in_memory(model, _calibration(tokenizer, options), settings)
    return save_structured(model, tokenizer, out, {**report, **_settings_report(settings, options), "streamed": False})


def write_streamed(model_spec: str, out: Path, options: ExportOptions) -> dict:
    from asft_ray.export.structured_streamed import structure_streamed
    from asft_ray.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(model_spec)
    settings = _settings(options)
    return structure_streamed(Path(resolve_model(model_spec).location), tokenizer, out, _calibration(tokenizer, options),
                              settings, _settings_report(settings, options), options.show_progress)


def _settings(options: ExportOptions):
    from asft_ray.export.run import parse_ratio
    from asft_ray.export.structured import StructureSettings

    return StructureSettings(parse_ratio(options.mlp_ratio), parse_ratio(options.head_ratio), options.refit,
                             options.drop_layers)


def _calibration(tokenizer, options: ExportOptions):
    """The C4 calibration windows, or None (magnitude scores) without `nsamples`."""
    if options.nsamples < 1:
        return None
    from asft_ray.data import c4_documents, sample_calibration

    return sample_calibration(c4_documents(options.data_dir), tokenizer, options.nsamples, options.seqlen, options.seed)


def _settings_report(settings, options: ExportOptions) -> dict:
    return {"mlp_ratio": settings.mlp_ratio, "head_ratio": settings.head_ratio, "nsamples": options.nsamples,
            "refit": settings.refit, "scores": "wanda-style |W|*||X||" if options.nsamples > 0 else "magnitude |W|"}


def describe(model_spec: str, out: Path, report: dict) -> str:
    return (f"{model_spec} -> {out}: {report['after']['parameters']:,} parameters "
            f"({report['parameter_ratio']:.1%} of {report['before']['parameters']:,})")


register(ExportFormat("structured", summary="remove MLP channels and KV groups", write=write, describe=describe,
                      check=check, options={"mlp_ratio", "head_ratio", "drop_layers", "refit"}))
