"""int8: decoder linears and head as int8 weights + per-row scales (asft_ray/export/int8.py).

A safetensors folder is exported one decoder layer at a time;
anything else is loaded whole. It needs no options and no GPU, so `asft run` may offer it."""

from __future__ import annotations

from pathlib import Path

from asft_ray.export.formats.registry import ExportFormat, ExportOptions, register


def write(model_spec: str, out: Path, options: ExportOptions) -> dict:
    from asft_ray.export.int8 import export_int8

    return export_int8(model_spec, Path(out), show_progress=options.show_progress)


def describe(model_spec: str, out: Path, report: dict) -> str:
    return (f"{model_spec} -> {out}: {len(report['quantized'])} linears as int8, weights "
            f"{report['weights_file_bytes'] / 2**20:.1f} MiB ({report['file_ratio']:.1%} of "
            f"{report['dense_bytes'] / 2**20:.1f} MiB)")


def read_report(out: Path) -> dict | None:
    from asft_ray.artifacts import read_json
    from asft_ray.export.int8 import MANIFEST

    return read_json(Path(out) / MANIFEST)


def run_summary(report: dict, out: Path) -> str:
    return (f"{len(report['quantized'])} linears as int8 (weight-only): {report['weights_file_bytes'] / 2**20:.1f} MB "
            f"of weights vs {report['dense_bytes'] / 2**20:.1f} MB float ({100 * report['file_ratio']:.1f} %)")


register(ExportFormat("int8", summary="decoder linears and head as int8 weights (CPU kernels; a structured "
                                      "export as --model gives pruned + int8)",
                      write=write, describe=describe, read_report=read_report, run_summary=run_summary))
