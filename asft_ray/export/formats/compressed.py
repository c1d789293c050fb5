"""compressed: each pruned linear as a bitmask plus its non-zeros (asft_ray/export/compressed.py).

A safetensors folder is exported one decoder layer at a time; anything else is loaded whole.
The only format `asft run` offers: it needs no options and no GPU."""

from __future__ import annotations

from pathlib import Path

from asft_ray.export.formats.registry import ExportFormat, ExportOptions, register


def write(model_spec: str, out: Path, options: ExportOptions) -> dict:
    from asft_ray.export.compressed import save_compressed, save_compressed_streamed
    from asft_ray.models import is_safetensors_dir, load_model, resolve_model

    source = resolve_model(model_spec)
    if is_safetensors_dir(source):  # one decoder layer in memory at a time
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=False)
        return save_compressed_streamed(Path(source.location), out, tokenizer)
    model, tokenizer = load_model(model_spec, options.device, show_progress=options.show_progress)
    return save_compressed(model, out, tokenizer)


def describe(model_spec: str, out: Path, report: dict) -> str:
    return (f"{model_spec} -> {out}: pruned layers {report['pruned_ratio']:.1%} of dense bytes, "
            f"weights file {report['weights_file_bytes'] / 2**20:.1f} MiB ({report['file_ratio']:.1%} of dense)")


def read_report(out: Path) -> dict | None:
    from asft_ray.artifacts import read_json
    from asft_ray.export.compressed import MANIFEST

    return read_json(Path(out) / MANIFEST)


def run_summary(report: dict, out: Path) -> str:
    total = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    return (f"{report['weights_file_bytes'] / 2**20:.1f} MB of weights vs {report['dense_bytes'] / 2**20:.1f} MB "
            f"dense ({100 * report['file_ratio']:.1f} %), {total / 2**20:.1f} MB in all")


register(ExportFormat("compressed", summary="bitmask + non-zeros on disk", write=write, describe=describe,
                      read_report=read_report, run_summary=run_summary))
