"""The DeepSpeed config of a recovery run: the user's file (if any) merged with the run's settings.

Rule: each run setting has one DeepSpeed key (FIELDS). A setting that was asked for (not None)
and a file that gives the same key another value is a one-line error; otherwise the asked-for
value, else the file's, else DEFAULTS fills the key. Keys the run does not own (ZeRO bucket
sizes, optimizer betas, ...) pass through untouched. Without an `optimizer` block the run
builds torch AdamW (no C++ op to compile); without a `scheduler` block, linear warm-up then
cosine decay to lr * min_lr_ratio.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from asft_ray.errors import AsftError
from asft_ray.recovery.config import RecoverConfig

DEFAULTS = {
    "zero_stage": 2, "micro_batch": 1, "grad_accum": 1, "clip": 1.0, "bf16": False,
    "offload_optimizer": False, "offload_params": False, "lr": 5e-5, "weight_decay": 0.0, "min_lr_ratio": 0.1,
}

# run setting -> (DeepSpeed key path, flag name for messages)
FIELDS = {
    "zero_stage": ("zero_optimization.stage", "--zero-stage"),
    "micro_batch": ("train_micro_batch_size_per_gpu", "--micro-batch"),
    "grad_accum": ("gradient_accumulation_steps", "--grad-accum"),
    "clip": ("gradient_clipping", "--clip"),
    "bf16": ("bf16.enabled", "--bf16"),
    "offload_optimizer": ("zero_optimization.offload_optimizer.device", "--offload-optimizer"),
    "offload_params": ("zero_optimization.offload_param.device", "--offload-params"),
    "lr": ("optimizer.params.lr", "--lr"),
    "weight_decay": ("optimizer.params.weight_decay", "--weight-decay"),
    "warmup_steps": ("scheduler.params.warmup_num_steps", "--warmup-steps"),
}
_OFFLOAD = ("offload_optimizer", "offload_params")
_MISSING = object()


@dataclass(frozen=True)
class TrainingPlan:
    """What the worker loop needs besides the DeepSpeed dict itself."""

    ds_config: dict
    lr: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float
    build_optimizer: bool  # False: the DeepSpeed file's optimizer block is used
    build_scheduler: bool

    @property
    def micro_batch(self) -> int:
        return self.ds_config["train_micro_batch_size_per_gpu"]

    @property
    def grad_accum(self) -> int:
        return self.ds_config["gradient_accumulation_steps"]

    @property
    def zero_stage(self) -> int:
        return self.ds_config["zero_optimization"]["stage"]


def load_user_config(path: str | None) -> dict:
    """A DeepSpeed config file (JSON, or YAML by extension); {} for none."""
    if not path:
        return {}
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise AsftError(f"cannot read deepspeed config {path}: {err.strerror}") from err
    try:
        if Path(path).suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except ValueError as err:  # json.JSONDecodeError and yaml.YAMLError are ValueErrors
        raise AsftError(f"deepspeed config {path} is not valid {'YAML' if path.endswith(('yaml', 'yml')) else 'JSON'}") from err
    if not isinstance(values, dict):
        raise AsftError(f"deepspeed config {path}: expected a mapping, got {type(values).__name__}")
    return values


def _get(d: dict, path: str):
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return _MISSING
        d = d[key]
    return _MISSING if d == "auto" else d


def _set(d: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for key in parents:
        d = d.setdefault(key, {})
    d[last] = value


def _from_file(name: str, value):
    """A file value in the run setting's terms (offload device -> bool)."""
    return value not in (None, "none") if name in _OFFLOAD else value


def _to_file(name: str, value):
    return ("cpu" if value else "none") if name in _OFFLOAD else value


def zero3_unit(largest_linear: int) -> int:
    """The size ZeRO-3's buffers and the vocabulary parts are measured in: the model's largest
    decoder linear (elements), at least 1e6 (below that, Python's per-call overhead dominates)."""
    return max(10**6, int(largest_linear))


def zero3_buffer_sizes(largest_linear: int) -> dict:
    """ZeRO-3 bucket and buffer sizes (elements) from the model's largest decoder linear, `unit` =
    max(1e6, its numel). DeepSpeed's defaults (a 5e8-element reduce bucket, 1e9 live parameters,
    1e9-element optimizer sub-groups) are sized for big multi-GPU jobs; on a worker holding one
    partition of a small model they kept ZeRO-3's peak above ZeRO-2's (SmolLM2, 2 workers: 4051 vs
    3379 MiB; with these: 3076 MiB, the same losses). A user's DeepSpeed file overrides each one.

    The optimizer steps one sub-group of a worker's fp32 partition at a time, and torch's Adam makes
    temporaries the size of what it steps (on the CPU `exp_avg_sq.sqrt() / c`: two at once), so the
    sub-group is one unit (a 0.5 B model on 4 workers: the optimizer step's peak went from 4557 to
    3920 MiB per worker with 10 units -> 1, the same losses). At most 3 units are kept gathered,
    and a gathered one is kept for reuse only within 1 unit of other gathers: the vocabulary parts
    of the head, used by the forward and again by the backward, would otherwise stay gathered
    through the loss."""
    unit = zero3_unit(largest_linear)
    return {"reduce_bucket_size": 2 * unit, "stage3_prefetch_bucket_size": 2 * unit,
            "stage3_max_live_parameters": 3 * unit, "stage3_max_reuse_distance": unit,
            "sub_group_size": unit, "stage3_param_persistence_threshold": 10**4}


def build_plan(cfg: RecoverConfig, user: dict, world: int, source: str = "deepspeed config",
               largest_linear: int | None = None) -> TrainingPlan:
    """Merge the run's settings into the user's DeepSpeed dict; conflicts and unsupported modes are errors.
    With ZeRO-3 and `largest_linear` known, buffer sizes the file leaves out come from zero3_buffer_sizes."""
    ds = copy.deepcopy(user)
    if _get(ds, "fp16.enabled") is True:
        raise AsftError(f"{source}: fp16 is not supported for recovery (no loss scaling); use bf16")
    has_optimizer, has_scheduler = "optimizer" in ds, "scheduler" in ds
    if has_scheduler and cfg.min_lr_ratio is not None:
        raise AsftError(f"{source}: has a scheduler block, so --min-lr-ratio has no effect; set the schedule in one place")
    resolved = {}
    for name, (path, flag) in FIELDS.items():
        asked, in_file = getattr(cfg, name), _get(ds, path)
        in_file = in_file if in_file is _MISSING else _from_file(name, in_file)
        if asked is not None and in_file is not _MISSING and asked != in_file:
            raise AsftError(f"{source}: {path} = {in_file!r} conflicts with {flag} {asked!r}; remove one or make them agree")
        value = asked if asked is not None else in_file if in_file is not _MISSING else DEFAULTS.get(name)
        if name == "warmup_steps" and value is None:
            value = cfg.max_steps // 10
        resolved[name] = value
        block = path.split(".")[0]
        if block not in ("optimizer", "scheduler") or block in ds:
            _set(ds, path, _to_file(name, value))
    total = resolved["micro_batch"] * resolved["grad_accum"] * world
    if _get(ds, "train_batch_size") not in (_MISSING, total):
        raise AsftError(
            f"{source}: train_batch_size = {ds['train_batch_size']} conflicts with micro batch {resolved['micro_batch']} "
            f"x grad accum {resolved['grad_accum']} x {world} workers = {total}"
        )
    ds["train_batch_size"] = total
    if resolved["zero_stage"] not in (2, 3):
        raise AsftError(f"{source}: zero_optimization.stage must be 2 or 3 for recovery, got {resolved['zero_stage']}")
    if resolved["offload_params"] and resolved["zero_stage"] != 3:
        raise AsftError(f"{source}: parameter offload needs zero stage 3, the run uses stage {resolved['zero_stage']}")
    if resolved["zero_stage"] == 3 and largest_linear:
        for key, value in zero3_buffer_sizes(largest_linear).items():
            ds["zero_optimization"].setdefault(key, value)
    if not has_optimizer:
        ds.setdefault("zero_force_ds_cpu_optimizer", False)  # offload with a plain torch optimizer
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return TrainingPlan(
        ds_config=ds, lr=resolved["lr"], weight_decay=resolved["weight_decay"], warmup_steps=resolved["warmup_steps"],
        min_lr_ratio=cfg.min_lr_ratio if cfg.min_lr_ratio is not None else DEFAULTS["min_lr_ratio"],
        build_optimizer=not has_optimizer, build_scheduler=not has_scheduler,
    )


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from 1/(warmup+1) to 1, then cosine to `min_ratio` at max_steps."""
    import math

    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
