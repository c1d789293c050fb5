"""Typed run configuration, validated when it is built.

Every check that can be done without loading the model happens here, so bad
input fails in well under a second with one clear line.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from asft_ray import methods as _methods
from asft_ray.errors import AsftError

# Derived from the method registry (asft_ray.methods), the one place a method is declared.
# A method string may add refinements (`wanda+dsnot`): use `PruneConfig.recipe` for those.
METHODS = _methods.method_names()
CALIBRATED_METHODS = tuple(n for n in METHODS if _methods.resolve(n).calibrated)
LAYERWISE_METHODS = tuple(n for n in METHODS if _methods.resolve(n).layerwise)  # true-sequential, per-layer resume
# block reconstruction's Adam learning rate, chosen on WikiText-2 valid (BENCHMARKS.md, issue #15):
# the default of `asft prune` and of the structured export
RECONSTRUCT_LR = 1e-3


def check_reconstruction(epochs: int, lr: float, where: str = "", flags: bool = False) -> None:
    """Block reconstruction's two settings, as `asft prune`, the structured export and a run's
    `structure:` take them: `where` prefixes the message, `flags` names them as command-line flags."""
    names = ("--reconstruct-epochs", "--reconstruct-lr") if flags else ("reconstruct_epochs", "reconstruct_lr")
    if epochs < 0 or not lr > 0:
        raise AsftError(f"{where}{names[0]} must be >= 0 and {names[1]} > 0, got {epochs} and {lr}")


@dataclass(frozen=True)
class Pattern:
    """Where zeros may go: anywhere (`unstructured`) or N non-zeros in every M inputs (`N:M`)."""

    kind: str  # "unstructured" or "nm"
    n: int = 0  # kept weights per group (N:M only)
    m: int = 0  # group size (N:M only)

    @staticmethod
    def parse(text: str) -> "Pattern":
        if text == "unstructured":
            return Pattern("unstructured")
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise AsftError(f"unknown pattern {text!r}: use 'unstructured' or N:M such as '2:4'")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise AsftError(f"pattern {text!r}: need 0 < N < M")
        return Pattern("nm", n, m)

    @property
    def implied_sparsity(self) -> float | None:
        return 1 - self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        return "unstructured" if self.kind == "unstructured" else f"{self.n}:{self.m}"


def check_device(device: str) -> str:
    """`auto`, `cpu`, `cuda` or `cuda:N`; anything else is one line before any work."""
    if device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device):
        return device
    raise AsftError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


def path_identity(value: str | None) -> str | None:
    """A local path as it goes into a run identity: its absolute real path when it exists (relative,
    `~`, a symbolic link or a trailing slash all name the same file), else the text as given."""
    if not value:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def model_identity(spec: str) -> str:
    """The one rule for a model in a run identity (prune, staged, sweep, recover, the pipeline): the
    same model by another path is the same run. An alias (`smollm2-135m`, which resolve_model also
    takes first) and a hub id stay as they are; a local directory or file becomes its real path."""
    from asft_ray.models import ALIASES

    return spec if spec in ALIASES else path_identity(spec)


def setting(default=dataclasses.MISSING, help: str | None = None, *, identity: bool = True, choices=None,
            default_text: str | None = None):
    """A config field with the help of its command-line flag (`add_config_flags` makes `--the-name` from it;
    a field without help has no flag). The flag's help shows the field's default, or `default_text`
    where the default (None) stands for something worked out later; never restate it in `help`.
    `identity=False`: see `how_it_runs`."""
    metadata = {"identity": identity}
    if help is not None:
        metadata.update(help=help, choices=choices, default_text=default_text)
    return dataclasses.field(default=default, metadata=metadata)


def how_it_runs(default, help: str | None = None, **flag):
    """A config field that says where or how a run executes (or what it reports), not what it computes: left out of the
    run identity (see `identity_values`), so changing it never makes "a different run"."""
    return setting(default, help, identity=False, **flag)


def add_config_flags(parser, cls, skip: tuple[str, ...] = (), defaults: dict | None = None) -> None:
    """One `--flag` per field of the config dataclass `cls` that has help (see `setting`), in field order.
    Flags default to None ("not given"), so that a YAML config's value or the field's default applies
    (`flag_values`); a bool field is a switch that sets True. `defaults`: what a field whose own
    default is None falls back to later (shown in its help)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        hint = hints[f.name]
        shown = f.default if f.default is not None else (defaults or {}).get(f.name)
        options = {"default": None, "help": f.metadata["help"] + _default_note(shown, f.metadata["default_text"])}
        if _fits(True, hint) and not _fits(1.5, hint):  # a bool field (or bool | None)
            options["action"] = "store_true"
        else:
            if _fits("text", hint):  # kept as given: the config parses it (a comma list, a file, ...)
                pass
            elif _fits(1.5, hint):
                options["type"] = float
            elif _fits(1, hint):
                options["type"] = int
            if f.metadata["choices"]:
                options["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name.replace("_", "-"), **options)


def _default_note(default, text: str | None) -> str:
    if text:
        return f" (default: {text})"
    if default is dataclasses.MISSING or default is None or default is False:  # 0 is a default to show
        return ""
    return f" (default {default:g})" if isinstance(default, float) else f" (default {default})"


def flag_values(args, cls, values: dict, skip: tuple[str, ...] = ()) -> dict:
    """`values` (a YAML config's, or empty) with every flag of `cls` that was given on top."""
    values = dict(values)
    for f in dataclasses.fields(cls):
        if f.name not in skip and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return values


def config_from_args(args, cls):
    """A subcommand's typed config: its `--config` YAML with the flags given on top; `--device auto`
    (the flag's default) leaves a device the YAML names."""
    values = flag_values(args, cls, load_yaml(args.config) if args.config else {}, skip=("device",))
    if args.device != "auto" or "device" not in values:
        values["device"] = args.device
    return cls.from_dict(values, source=args.config or "flags")


def identity_values(config) -> dict:
    """A config dataclass's fields, without those marked `how_it_runs`."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.metadata.get("identity", True)}


@dataclass(frozen=True)
class PruneConfig:
    """One one-shot pruning run: `asft prune` builds this from its flags."""

    model: str = setting(help="alias (smollm2-135m), HF model dir, .gguf file or hub id")
    method: str = setting(help=f"one of: {', '.join(METHODS)}; refinements may follow: wanda+dsnot, ria+dsnot:20 "
                               "(at most 20 swaps per row), wanda+lsq (least-squares kept weights, last)")
    sparsity: float = setting(help="fraction of decoder-linear weights to remove (implied by N:M)")
    out: str = setting(help="output model directory")
    pattern: str = setting("unstructured", "unstructured, 2:4, 4:8 or any N:M")
    nsamples: int = setting(32, "calibration windows; the papers use 128")
    seqlen: int = setting(2048, "calibration window length")
    seed: int = setting(0, "calibration sampling seed")
    # embeddings, norms and lm_head are kept dense unless asked
    prune_lm_head: bool = setting(False, "also prune lm_head (untied from the input embeddings, which stay dense)")
    true_sequential: bool = setting(False, "wanda/sparsegpt: prune a layer's linears group by group (q/k/v, o, gate/up, "
                                           "down), each scored on inputs through the groups already pruned")
    channel_permutation: bool = setting(False, "N:M: reorder each MLP's channels and each KV head's value dimensions "
                                               "(the same function) so down_proj's and o_proj's groups keep more")
    reconstruct_epochs: int = setting(0, "block reconstruction: after each layer is pruned, this many passes of Adam "
                                         "over the calibration samples fit its kept weights to the dense model's "
                                         "hidden states (0: off)")
    reconstruct_lr: float = setting(RECONSTRUCT_LR, "block reconstruction's Adam learning rate")
    data_dir: str | None = None  # None: ASFT_DATA_DIR, then ../shared/data, then the hub (flag: cli._add_common)
    device: str = how_it_runs("auto")  # "auto", "cpu", "cuda", "cuda:1", ... (flag: cli._add_common)
    overwrite: bool = how_it_runs(False, "replace an --out that holds a different run")
    resume: bool = how_it_runs(False, "continue a killed wanda/sparsegpt run after its last finished layer")
    # None: whenever the model and method allow
    stream: bool | None = how_it_runs(None, "never hold the whole model: stream decoder layers from safetensors "
                                            "(wanda, sparsegpt)")
    workers: int = how_it_runs(0, "Ray scoring actors (statistics or gradients); 0: score inside the one pruning actor")
    worker_cpus: float = how_it_runs(1, "CPUs per scoring actor")
    worker_gpus: float = how_it_runs(0, "GPUs per scoring actor")
    worker_memory_gb: float | None = how_it_runs(None, "memory Ray reserves per scoring actor")
    coordinator_cpus: float | None = how_it_runs(None, "CPUs the pruning coordinator reserves",
                                                 default_text="1 with --workers, else all of the largest node's")
    coordinator_gpus: float | None = how_it_runs(
        None, "GPUs the pruning coordinator reserves",
        default_text="1 for --device cuda, or auto on a cluster with GPUs and no --workers")
    coordinator_memory_gb: float | None = how_it_runs(None, "memory Ray reserves for the pruning coordinator")
    # per-layer sparsity: uniform, owl, ramp, a mapping or a YAML file (asft_ray.schedules)
    schedule: str | dict = setting("uniform", "per-layer sparsity: uniform, owl, ramp, or a schedule YAML "
                                              "(e.g. from asft sweep)")

    def __post_init__(self) -> None:
        recipe = self.recipe  # an unknown method or refinement is one line here
        check_device(self.device)
        pattern = Pattern.parse(self.pattern)
        if not 0.0 <= self.sparsity < 1.0:
            raise AsftError(f"sparsity {self.sparsity} is outside [0, 1)")
        implied = pattern.implied_sparsity
        if implied is not None and abs(self.sparsity - implied) > 1e-9:
            raise AsftError(f"pattern {pattern} implies sparsity {implied:g}, but sparsity {self.sparsity:g} was asked")
        if self.nsamples < 1:
            raise AsftError(f"nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise AsftError(f"seqlen must be at least 2, got {self.seqlen}")
        if not self.out:
            raise AsftError("--out is required")
        if self.true_sequential and not recipe.layerwise:
            raise AsftError(f"true_sequential works with {' and '.join(LAYERWISE_METHODS)} (the layer-wise methods, "
                            f"also with refinements), not {self.method}")
        if self.channel_permutation and (pattern.kind != "nm" or not recipe.layerwise):
            raise AsftError(f"channel_permutation reorders channels for N:M groups: it needs an N:M pattern and a "
                            f"layer-wise method ({', '.join(LAYERWISE_METHODS)}), not {self.method} {pattern}")
        check_reconstruction(self.reconstruct_epochs, self.reconstruct_lr)
        if self.reconstruct_epochs and not recipe.layerwise:
            raise AsftError(f"block reconstruction (reconstruct_epochs) follows a layer-wise method "
                            f"({', '.join(LAYERWISE_METHODS)}), not {self.method}")
        if self.resume and not recipe.layerwise:
            raise AsftError(f"resume continues a layer-wise run ({', '.join(LAYERWISE_METHODS)}) after its last "
                            f"finished layer; {self.method} prunes in one step and has nothing to resume")
        if self.workers < 0 or self.worker_cpus <= 0 or self.worker_gpus < 0:
            raise AsftError("workers must be >= 0, worker_cpus > 0 and worker_gpus >= 0")
        if (self.coordinator_cpus is not None and self.coordinator_cpus <= 0) or (self.coordinator_gpus or 0) < 0:
            raise AsftError("coordinator_cpus must be > 0 and coordinator_gpus >= 0")
        spec = self.schedule_spec  # parses (and reads a schedule file) now, so errors come before any work
        if not spec.is_uniform:
            if pattern.kind == "nm":
                raise AsftError(f"a per-layer schedule needs unstructured pruning; pattern {pattern} fixes every layer's sparsity")
        from asft_ray.schedules import check_reachable

        check_reachable(spec, self.sparsity)

    @staticmethod
    def from_dict(values: dict, source: str = "config") -> "PruneConfig":
        """Build from a mapping (a YAML file, job arguments); unknown keys and mistyped values are an error."""
        check_keys(values, PruneConfig, source)
        check_field_types(values, PruneConfig, source)
        values = dict(values)
        if values.get("sparsity") is None:
            implied = Pattern.parse(values.get("pattern", "unstructured")).implied_sparsity
            if implied is None:
                raise AsftError(f"{source}: sparsity is required for unstructured pruning")
            values["sparsity"] = implied
        missing = sorted(k for k in ("model", "method", "out") if not values.get(k))
        if missing:
            raise AsftError(f"{source}: missing required key(s) {', '.join(missing)}")
        try:
            return PruneConfig(**values)
        except TypeError as err:
            raise AsftError(f"{source}: {err}") from err

    @property
    def recipe(self) -> "_methods.Recipe":
        """The method string resolved in the registry: what it needs, which engine path runs it."""
        return _methods.resolve(self.method)

    @property
    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern)

    @cached_property
    def schedule_spec(self):
        """The parsed schedule; a schedule file is read once, when the config is built."""
        from asft_ray.schedules import ScheduleSpec

        return ScheduleSpec.parse(self.schedule)

    @property
    def needs_calibration(self) -> bool:
        """Calibration data is needed by every method but magnitude, and by the owl schedule."""
        return self.recipe.calibrated or self.schedule_spec.name == "owl"

    def streams(self) -> bool:
        """Prune one decoder layer at a time from the safetensors shards: as asked, or (stream: None)
        whenever the method and schedule allow it and the model is a local safetensors directory."""
        if self.stream is not None:
            return self.stream
        from asft_ray.models import is_safetensors_dir, resolve_model

        return is_safetensors_dir(resolve_model(self.model))

    @property
    def uses_scoring_workers(self) -> bool:
        """Scoring actors are started when asked for and the method has statistics to shard. (Not yet
        for taylor/fisher streamed: their layer-streamed backward runs in the pruning coordinator.)"""
        if not self.workers or not self.recipe.calibrated:
            return False
        return self.recipe.layerwise or not self.streams()

    @property
    def is_uniform(self) -> bool:
        return self.schedule_spec.is_uniform

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """The inputs that decide the result: two runs with equal identity give equal models."""
        d = identity_values(self)  # where and how it runs is not part of it
        d["out"] = str(Path(self.out).resolve())
        d["model"] = model_identity(self.model)  # the same model by another path is the same run
        d["data_dir"] = path_identity(self.data_dir)
        d["schedule"] = self.schedule_spec.to_dict()  # the content, not the file name
        if self.is_uniform:
            d.pop("schedule")  # one ratio for every layer, as before schedules existed
        for flag in ("true_sequential", "channel_permutation"):
            if not d[flag]:
                d.pop(flag)  # the default, as before the option existed
        if not self.reconstruct_epochs:
            for key in ("reconstruct_epochs", "reconstruct_lr"):
                d.pop(key)  # off, as before the option existed
        return d

    @property
    def reconstruction(self):
        """The engine's block-reconstruction step (pruning.reconstruct.Reconstruction), or None."""
        if not self.reconstruct_epochs:
            return None
        from asft_ray.pruning.reconstruct import Reconstruction

        return Reconstruction(self.reconstruct_epochs, self.reconstruct_lr)


def check_keys(values, known, source: str, what: str = "key") -> None:
    """`values` must be a mapping whose keys are all in `known` (names, or a dataclass's fields)."""
    if not isinstance(values, dict):
        raise AsftError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
    if dataclasses.is_dataclass(known):
        known = {f.name for f in dataclasses.fields(known)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise AsftError(f"{source}: unknown {what}(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def check_field_types(values: dict, cls, source: str, skip: tuple[str, ...] = ()) -> None:
    """Every value in `values` must fit the annotation of `cls`'s field of that name.

    YAML and JSON give strings, numbers, booleans, lists and mappings; a quoted `"false"` or
    `"2"` is a string and is refused here, before it can mean something else later. A bool is
    not an int, an int is a float, a list fits a `tuple[...]` field. Keys in `skip` are left to
    the caller (values it converts itself); keys that are not fields are check_keys' business.
    """
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in skip or key not in hints:
            continue
        if not _fits(value, hints[key]):
            raise AsftError(f"{source}: key {key!r} must be {_describe(hints[key])}, got {value!r}")


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(_fits(v, a) for v, a in zip(value, args)))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this checker does not know: accept, the dataclass checks the value


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
          type(None): "null"}


def _describe(hint) -> str:
    """The annotation in words: `float | None` -> 'a number or null'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if hint is tuple or origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return "a list"
    if origin is dict:
        return "a mapping"
    if hint in _NAMES:
        return _NAMES[hint]
    return f"a {getattr(hint, '__name__', hint)}"


def _plural(hint) -> str:
    words = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    return words.get(hint, f"({_describe(hint)})")


def load_yaml(path: str) -> dict:
    """Read a YAML run config (a mapping of settings), with a one-line error for a missing or malformed file."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f)
    except OSError as err:
        raise AsftError(f"cannot read config {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise AsftError(f"config {path} is not valid YAML{where}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise AsftError(f"config {path}: expected a mapping of settings, got a {type(values).__name__}")
    return values
