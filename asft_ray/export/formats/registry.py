"""The export-format registry: each deployment form of a model, declared once.

A format is declared in its own module in this package (found on first use) as an
`ExportFormat`: its name, a one-line summary, and the function that writes it. `asft export
--format`'s choices and help, the check of `asft run`'s `export:` list and the pipeline's
export step are all derived from the declarations.

This module imports neither torch nor transformers: config validation and the CLI stay fast
(format modules import their heavy code inside their functions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from asft_ray.catalog import Catalog
from asft_ray.config import RECONSTRUCT_LR, setting
from asft_ray.errors import AsftError


@dataclass(frozen=True)
class ExportOptions:
    """Everything `asft export` may pass to a format (its flags: config.add_config_flags); each
    format reads the fields it documents."""

    mlp_ratio: str | float = setting("0", "structured: fraction of MLP channels to remove, or a comma list per layer")
    head_ratio: str | float = setting("0", "structured: fraction of KV groups (a KV head with its query heads) to "
                                           "remove, or a comma list")
    nsamples: int = setting(0, "structured: C4 calibration windows for |W|*||X|| scores; 0: weight magnitude")
    drop_layers: int = setting(0, "structured: remove this many whole decoder layers, those of lowest block "
                                  "influence (needs --nsamples)")
    refit: bool = setting(False, "structured: refit down_proj / o_proj by least squares on the kept channels and "
                                 "heads (needs --nsamples)")
    reconstruct_epochs: int = setting(0, "structured: block reconstruction: after each layer is shrunk (and refit), "
                                         "this many passes of Adam over the calibration samples fit its weights so "
                                         "that, fed the structured model's own inputs, it gives the dense model's "
                                         "hidden states (needs --nsamples; 0: off)")
    reconstruct_lr: float = setting(RECONSTRUCT_LR, "structured: block reconstruction's Adam learning rate")
    cost_target: float | None = setting(None, "structured: instead of --mlp-ratio, --head-ratio and --drop-layers, "
                                              "the least aggressive plan predicted to cost at most this share of the "
                                              "dense model per generated token (e.g. 0.7)", default_text="off")
    cost_knobs: str = setting("mlp", "structured, with --cost-target: what the plan may remove, a comma list of "
                                     "mlp, heads, layers (layers needs --nsamples)")
    cost_context: int = setting(512, "structured, with --cost-target: tokens in the KV cache the cost is predicted at")
    cost_model: str | None = setting(None, "structured, with --cost-target: a fitted decode-cost model (JSON); "
                                           "when the file does not exist, this machine's calibration (cached, or measured "
                                           "now) is saved there",
                                     default_text="this machine's, for the model's shape: calibrated once into "
                                                  "~/.cache/asft-ray/cost-models/ ($ASFT_CACHE_DIR) and reused")
    cost_search: int = setting(0, "structured, with --cost-target: export every plan that meets the target (one per "
                                  "choice of KV groups and layers dropped) in Ray Tune trials, measure each on this "
                                  "many WikiText-2 valid windows of --seqlen tokens, keep the best; 0: the least "
                                  "aggressive plan, unmeasured")
    search_cpus: float = setting(1.0, "structured, with --cost-search: CPUs per trial (trials run side by side on the "
                                      "cluster's CPUs)")
    seqlen: int = setting(2048, "structured: calibration window length")
    seed: int = setting(0, "structured: calibration sampling seed")
    dtype: str = setting("float16", "semistructured: kernel dtype", choices=["float16", "bfloat16"])
    data_dir: str | None = None
    device: str = "cpu"  # where the model is loaded (structured calibration runs there)
    show_progress: bool = True


@dataclass(frozen=True)
class ExportFormat:
    """One deployment form.

    * `write(model_spec, out, options) -> report`: writes the model into the folder `out` (new or
      emptied; the format writes it atomically) and returns what it measured;
    * `describe(model_spec, out, report) -> str`: the line `asft export` prints;
    * `check(model_spec, options)`, optional: refuses bad options before `out` is touched;
    * `options`: the `ExportOptions` fields only this format reads (others must leave them unset);
    * `read_report(out) -> report | None` and `run_summary(report, out) -> str`, optional
      together: the report of a folder already written (None: not written), and the line `asft
      run`'s report shows. A format without them is not offered in a run config's `export:`
      list (it needs options or hardware a run does not give)."""

    name: str
    summary: str
    write: Callable[[str, Path, ExportOptions], dict]
    describe: Callable[[str, Path, dict], str]
    check: Callable[[str, ExportOptions], None] | None = None
    options: frozenset[str] = frozenset()
    read_report: Callable[[Path], dict | None] | None = None
    run_summary: Callable[[dict, Path], str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", frozenset(self.options))
        if (self.read_report is None) != (self.run_summary is None):
            raise ValueError(f"export format {self.name}: give both read_report and run_summary, or neither")
        fields = set(ExportOptions.__dataclass_fields__)
        if not self.options <= fields:
            raise ValueError(f"export format {self.name}: unknown options {sorted(self.options - fields)}")


_FORMATS = Catalog("export format", "asft_ray.export.formats")


def register(fmt: ExportFormat, replace: bool = False) -> ExportFormat:
    """Add a format (a module in this package does this on import; tests may register their own)."""
    return _FORMATS.add(fmt, replace)


def unregister(name: str) -> None:
    _FORMATS.remove(name)


def formats() -> dict[str, ExportFormat]:
    """Every format, the built-in ones first in their historical order, then the others by name."""
    known = _FORMATS.items()
    order = ("compressed", "structured", "semistructured")
    names = [n for n in order if n in known] + sorted(n for n in known if n not in order)
    return {n: known[n] for n in names}


def format_names() -> tuple[str, ...]:
    return tuple(formats())


def run_format_names() -> tuple[str, ...]:
    """The formats a run config's `export:` list may name."""
    return tuple(name for name, fmt in formats().items() if fmt.run_summary is not None)


def get_format(name: str) -> ExportFormat:
    known = formats()
    if name not in known:
        raise AsftError(f"unknown export format {name!r}: use {', '.join(known)}")
    return known[name]
