"""RecoverConfig: one recovery fine-tuning run, validated when it is built.

Settings that DeepSpeed also knows (zero stage, micro batch, accumulation, clipping, bf16,
offload, optimizer and scheduler) default to None, meaning "not asked for": a user DeepSpeed
file may then set them, and where neither does, `deepspeed_config.DEFAULTS` fills them in.
A flag that was given and a file that says something else is an error (see deepspeed_config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from asft_ray.config import (
    check_field_types,
    check_keys,
    how_it_runs,
    identity_values,
    model_identity,
    path_identity,
    setting,
)
from asft_ray.errors import AsftError

DATASETS = ("c4",)


@dataclass(frozen=True)
class RecoverConfig:
    model: str = setting(help="the pruned model: its zeros are kept (HF dir, alias, .gguf, hub id)")
    out: str = setting(help="output model directory")  # HF dir with safetensors + asft_run.json
    teacher: str | None = setting(None, "dense model to distill from (same vocabulary)")
    data: str = setting("c4", "training text")
    data_dir: str | None = None  # flag: cli._add_common
    mask_file: str | None = setting(None, "safetensors of bool masks by parameter name, instead of the model's zeros")
    dense: bool = setting(False, "no masks: train every decoder weight (for a structured export, smaller rather "
                                 "than sparse)")
    workers: int = setting(2, "Ray Train workers")
    max_steps: int = setting(100, "optimizer steps")
    seqlen: int = setting(512, "training window length")
    seed: int = setting(0, "data order seed")  # with the step, decides every training window
    # objective
    lm_weight: float = setting(1.0, "weight of the next-token loss")
    kd_weight: float | None = setting(None, "weight of the logit KL to the teacher", default_text="1 with --teacher, else 0")
    temperature: float = setting(2.0, "distillation temperature")
    hidden_weight: float = setting(0.0, "weight of the hidden-state MSE to the teacher (same width and depth)")
    train_norms: bool = setting(False, "also train norm weights")
    train_biases: bool = setting(False, "also train linear biases")
    # training; None = take from the DeepSpeed file, else deepspeed_config.DEFAULTS (shown in the help)
    zero_stage: int | None = setting(None, "DeepSpeed ZeRO stage", choices=[2, 3])
    micro_batch: int | None = setting(None, "windows per worker per micro-step")
    grad_accum: int | None = setting(None, "micro-steps per optimizer step")
    clip: float | None = setting(None, "gradient norm clipping")
    bf16: bool | None = setting(None, "bf16 weights and activations, fp32 master")
    offload_optimizer: bool | None = setting(None, "optimizer state on the CPU")
    offload_params: bool | None = setting(None, "parameters on the CPU (ZeRO-3)")
    lr: float | None = setting(None, "peak learning rate of AdamW")
    weight_decay: float | None = setting(None, "AdamW decoupled weight decay")
    warmup_steps: int | None = setting(None, "linear warm-up steps, then cosine", default_text="max_steps // 10")
    min_lr_ratio: float | None = setting(None, "cosine ends at lr * this")
    deepspeed: str | None = setting(None, "DeepSpeed JSON/YAML merged with these flags (a conflicting key is an error)")
    activation_checkpointing: bool = setting(False, "recompute each decoder layer's activations in the backward "
                                                    "instead of keeping them: less memory, about a third more compute")
    # checkpoints, evaluation, where it runs
    checkpoint_every: int = how_it_runs(0, "steps between DeepSpeed checkpoints; 0: none")
    eval_every: int = how_it_runs(0, "steps between WikiText-2 valid ppl checks; 0: none")
    eval_windows: int = how_it_runs(4, "windows per ppl check")
    eval_seqlen: int | None = how_it_runs(None, "ppl window length", default_text="--seqlen")
    resume: bool = how_it_runs(False, "continue from the last checkpoint")
    overwrite: bool = how_it_runs(False, "replace an --out that holds a different run")
    device: str = how_it_runs("auto")  # auto (GPUs if the cluster has them), cpu, cuda (flag: cli._add_common)
    worker_cpus: float = how_it_runs(1, "CPUs per worker")
    stop_after_steps: int | None = how_it_runs(None)  # test hook: stop (like a kill) after this step's checkpoint

    def __post_init__(self) -> None:
        if not self.model:
            raise AsftError("--model is required")
        if not self.out:
            raise AsftError("--out is required")
        if self.data not in DATASETS:
            raise AsftError(f"unknown training data {self.data!r}: choose one of {', '.join(DATASETS)}")
        if self.dense and self.mask_file:
            raise AsftError("--dense trains every weight, so it takes no --mask-file")
        if self.workers < 1:
            raise AsftError(f"workers must be at least 1, got {self.workers}")
        if self.max_steps < 1:
            raise AsftError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.seqlen < 2 or (self.eval_seqlen is not None and self.eval_seqlen < 2):
            raise AsftError("seqlen and eval_seqlen must be at least 2")
        if self.zero_stage is not None and self.zero_stage not in (2, 3):
            raise AsftError(f"zero stage must be 2 or 3, got {self.zero_stage}")
        for name in ("micro_batch", "grad_accum"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AsftError(f"{name} must be at least 1, got {value}")
        if min(self.lm_weight, self.kd_weight or 0.0, self.hidden_weight) < 0:
            raise AsftError("loss weights must be >= 0")
        if self.temperature <= 0:
            raise AsftError(f"temperature must be > 0, got {self.temperature}")
        if self.teacher is None and ((self.kd_weight or 0) > 0 or self.hidden_weight > 0):
            raise AsftError("distillation weights need --teacher")
        if self.lm_weight == 0 and self.effective_kd_weight == 0 and self.hidden_weight == 0:
            raise AsftError("all loss weights are zero: nothing to train")
        if self.lr is not None and self.lr <= 0:
            raise AsftError(f"lr must be > 0, got {self.lr}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.max_steps:
            raise AsftError(f"warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}")
        if self.min_lr_ratio is not None and not 0 <= self.min_lr_ratio <= 1:
            raise AsftError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.checkpoint_every < 0 or self.eval_every < 0 or self.eval_windows < 1:
            raise AsftError("checkpoint_every and eval_every must be >= 0, eval_windows >= 1")
        if self.stop_after_steps is not None and not 1 <= self.stop_after_steps < self.max_steps:
            raise AsftError(f"stop_after_steps must be in [1, max_steps), got {self.stop_after_steps}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise AsftError(f"device must be auto, cpu or cuda for recovery, got {self.device!r}")
        if self.worker_cpus <= 0:
            raise AsftError(f"worker_cpus must be > 0, got {self.worker_cpus}")

    @property
    def effective_kd_weight(self) -> float:
        if self.kd_weight is not None:
            return self.kd_weight
        return 1.0 if self.teacher else 0.0

    @staticmethod
    def from_dict(values: dict, source: str = "config") -> "RecoverConfig":
        """Build from a mapping (a YAML file, job arguments); unknown keys are an error."""
        check_keys(values, RecoverConfig, source)
        check_field_types(values, RecoverConfig, source)
        missing = sorted(k for k in ("model", "out") if not values.get(k))
        if missing:
            raise AsftError(f"{source}: missing required key(s) {', '.join(missing)}")
        try:
            return RecoverConfig(**values)
        except TypeError as err:
            raise AsftError(f"{source}: {err}") from err

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """What decides the recovered weights; a resumed run must match the saved identity."""
        d = identity_values(self)  # how and where it runs, what it reports, is not part of it
        d["out"] = str(Path(self.out).resolve())
        d["model"] = model_identity(self.model)  # the same model (or file) by another path is the same run
        d["teacher"] = model_identity(self.teacher) if self.teacher else None
        for key in ("mask_file", "deepspeed", "data_dir"):
            d[key] = path_identity(d[key])
        return d
