"""`asft export`: load a model, write one deployment form of it, return the report."""

from __future__ import annotations

import time
from pathlib import Path

from asft_ray.artifacts import atomic_output_dir, check_out_location, refuse_foreign_folder, write_json_atomic
from asft_ray.errors import AsftError
from asft_ray.models import load_model, save_model

FORMATS = ("compressed", "structured", "semistructured", "int8")


def parse_ratio(text: str | float) -> float | list[float]:
    """`0.25` -> 0.25; `0.1,0.2,...` -> one value per layer."""
    if isinstance(text, (int, float)):
        return float(text)
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError as err:
        raise AsftError(f"ratio {text!r} is not a number or a comma list of numbers") from err
    if not values:
        raise AsftError(f"empty ratio {text!r}")
    return values[0] if len(values) == 1 else values


def check_out(out: Path, overwrite: bool) -> None:
    """A new or empty --out, or (with overwrite) one that asft-ray wrote; never a folder of other files."""
    out = Path(out)
    check_out_location(out)
    if out.exists() and any(out.iterdir()):
        refuse_foreign_folder(out)
        if not overwrite:
            raise AsftError(f"--out {out} already holds an asft-ray output; pass --overwrite to replace it")


def export_model(model_spec: str, fmt: str, out: Path, *, mlp_ratio="0", head_ratio="0", nsamples: int = 0,
                 seqlen: int = 2048, seed: int = 0, data_dir: str | None = None, dtype: str = "float16",
                 device: str = "cpu", overwrite: bool = False, show_progress: bool = True,
                 drop_layers: int = 0, refit: bool = False) -> dict:
    """Write `model_spec` as `fmt` into `out`; returns the format's report plus timings.

    `device` is where the model is loaded (structured calibration runs there); the 2:4 format
    always loads on the CPU first and moves to the GPU itself. Structured only: `drop_layers`
    whole decoder layers of lowest block influence go, and `refit` refits down_proj / o_proj by
    least squares on the kept channels and heads (both need calibration: nsamples > 0)."""
    if fmt not in FORMATS:
        raise AsftError(f"unknown export format {fmt!r}: use {', '.join(FORMATS)}")
    if (drop_layers or refit) and fmt != "structured":
        raise AsftError("--drop-layers and --refit belong to --format structured")
    if (drop_layers or refit) and nsamples < 1:
        raise AsftError("--drop-layers and --refit measure on calibration data: pass --nsamples (e.g. 32)")
    if drop_layers:
        from asft_ray.models import model_config

        layers = model_config(model_spec).num_hidden_layers
        if not 0 < drop_layers < layers:
            raise AsftError(f"--drop-layers must be between 1 and {layers - 1} for a {layers}-layer model, got {drop_layers}")
    check_out(out, overwrite)
    start = time.perf_counter()
    if fmt == "int8":  # any model folder, a structured export too (pruned + int8); streamed when safetensors
        from asft_ray.export.int8 import export_int8

        report = export_int8(model_spec, Path(out), show_progress=show_progress)
        return {"format": fmt, "model": model_spec, "out": str(out), **report, "seconds": time.perf_counter() - start}
    if fmt == "semistructured":
        from asft_ray.export.semistructured import require_cuda

        require_cuda()  # before loading anything
    from asft_ray.models import is_safetensors_dir, resolve_model

    source = resolve_model(model_spec)
    if fmt == "compressed" and is_safetensors_dir(source):  # one decoder layer in memory at a time
        from transformers import AutoTokenizer

        from asft_ray.export.compressed import save_compressed_streamed

        tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=False)
        report = save_compressed_streamed(Path(source.location), out, tokenizer)
        return {"format": fmt, "model": model_spec, "out": str(out), **report, "seconds": time.perf_counter() - start}
    model, tokenizer = load_model(model_spec, "cpu" if fmt == "semistructured" else device, show_progress=show_progress)
    if fmt == "compressed":
        from asft_ray.export.compressed import save_compressed

        report = save_compressed(model, out, tokenizer)
    elif fmt == "structured":
        report = _structured(model, tokenizer, out, parse_ratio(mlp_ratio), parse_ratio(head_ratio), nsamples,
                             seqlen, seed, data_dir, drop_layers, refit)
    else:
        report = _semistructured(model, tokenizer, out, dtype)
    return {"format": fmt, "model": model_spec, "out": str(out), **report, "seconds": time.perf_counter() - start}


def _structured(model, tokenizer, out, mlp_ratio, head_ratio, nsamples, seqlen, seed, data_dir,
                drop=0, refit=False) -> dict:
    from asft_ray.export.structured import drop_layers, refit_consumers, save_structured, shrink
    from asft_ray.pruning.structured import block_influences, collect_input_norms, layers_to_drop, plan_structured

    stats, influences = None, None
    if nsamples > 0:
        from asft_ray.data import c4_documents, sample_calibration

        calib = sample_calibration(c4_documents(data_dir), tokenizer, nsamples, seqlen, seed)
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
        from asft_ray.export.structured import parameter_count

        report["after"] = {**report["after"], "parameters": parameter_count(model),
                           "num_hidden_layers": model.config.num_hidden_layers}
        report["parameter_ratio"] *= report["after"]["parameters"] / before
    report.update({"mlp_ratio": mlp_ratio, "head_ratio": head_ratio, "nsamples": nsamples, "refit": refit,
                   "layers_dropped": dropped, "block_influence": influences,
                   "scores": "wanda-style |W|*||X||" if nsamples > 0 else "magnitude |W|"})
    return save_structured(model, tokenizer, out, report)


def _semistructured(model, tokenizer, out, dtype) -> dict:
    """Save the dense fp16/bf16 checkpoint, then convert on the GPU so that every kernel is known to
    accept its weight. To serve it: `load_model(out)` and `to_semistructured(model)`."""
    from asft_ray.export.semistructured import DTYPES, to_semistructured

    if dtype not in DTYPES:
        raise AsftError(f"2:4 kernels run in {' or '.join(DTYPES)}, not {dtype}")
    with atomic_output_dir(Path(out)) as tmp:
        save_model(model.to(DTYPES[dtype]), tokenizer, tmp)
        report = to_semistructured(model, dtype)
        write_json_atomic(tmp / "semistructured.json", report)
    return report
