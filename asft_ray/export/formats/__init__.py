"""Export formats, one module each; see `registry` for the declaration.

Adding a format is one new module here that calls `register(ExportFormat(...))` (plus its
tests): `asft export --format`, its help, the run config's `export:` check and the pipeline's
export step all follow from the declaration."""

from asft_ray.export.formats.registry import (
    ExportFormat,
    ExportOptions,
    format_names,
    formats,
    get_format,
    register,
    run_format_names,
    unregister,
)

__all__ = ["ExportFormat", "ExportOptions", "format_names", "formats", "get_format", "register",
           "run_format_names", "unregister"]
