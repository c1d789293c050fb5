"""`asft export`: load a model, write one deployment form of it, return the report."""

from __future__ import annotations

import time
from pathlib import Path

from asft_ray.artifacts import check_out_location, refuse_foreign_folder
from asft_ray.errors import AsftError
from asft_ray.export.formats import ExportOptions, formats, get_format


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


def export_model(model_spec: str, fmt: str, out: Path, overwrite: bool = False, **options) -> dict:
    """Write `model_spec` as `fmt` (asft_ray/export/formats/) into `out`; returns the format's report
    plus timings. `options`: ExportOptions' fields (`device` is where the model is loaded)."""
    spec = get_format(fmt)
    options = ExportOptions(**options)
    calibrated = {"drop_layers", "refit", "reconstruct_epochs"}  # what only a calibrated structured export does
    if any(getattr(options, name) for name in calibrated) and not calibrated <= spec.options:
        owners = [f.name for f in formats().values() if calibrated <= f.options]
        raise AsftError(f"--drop-layers, --refit and --reconstruct-epochs belong to --format {' or '.join(owners)}")
    if spec.check is not None:
        spec.check(model_spec, options)
    check_out(out, overwrite)
    start = time.perf_counter()
    report = spec.write(model_spec, Path(out), options)
    return {"format": fmt, "model": model_spec, "out": str(out), **report, "seconds": time.perf_counter() - start}
