"""semistructured: 2:4-pruned linears on PyTorch's sparse GPU kernels (asft_ray/export/semistructured.py).

The folder holds the dense fp16/bf16 checkpoint; the conversion runs on the GPU at export time
so that every kernel is known to accept its weight. To serve it: `load_model(out)` and
`to_semistructured(model)`. A safetensors folder is exported one decoder layer at a time;
a GGUF or hub model is loaded whole."""

from __future__ import annotations

from pathlib import Path

from asft_ray.export.formats.registry import ExportFormat, ExportOptions, register


def write(model_spec: str, out: Path, options: ExportOptions) -> dict:
    from asft_ray.artifacts import atomic_output_dir, write_json_atomic
    from asft_ray.export.semistructured import (
        DTYPES,
        check_dtype,
        require_cuda,
        save_semistructured_streamed,
        to_semistructured,
    )
    from asft_ray.models import is_safetensors_dir, load_model, load_tokenizer, resolve_model, save_model

    require_cuda()  # before loading anything
    check_dtype(options.dtype)
    source = resolve_model(model_spec)
    if is_safetensors_dir(source):
        return save_semistructured_streamed(Path(source.location), out, options.dtype, load_tokenizer(model_spec))
    model, tokenizer = load_model(model_spec, "cpu", show_progress=options.show_progress)  # moved to the GPU below
    with atomic_output_dir(Path(out)) as tmp:
        save_model(model.to(DTYPES[options.dtype]), tokenizer, tmp)
        report = to_semistructured(model, options.dtype)
        write_json_atomic(tmp / "semistructured.json", report)
    return report


def describe(model_spec: str, out: Path, report: dict) -> str:
    return f"{model_spec} -> {out}: {report['converted']} linears on 2:4 {report['backend']} kernels"


register(ExportFormat("semistructured", summary="2:4 sparse kernels (CUDA)", write=write, describe=describe,
                      options={"dtype"}))
