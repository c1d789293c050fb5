"""What each Ray Train worker runs: build the masked student, wrap it in DeepSpeed, train, export.

Two ways to hold the student, by ZeRO stage:
  ZeRO-2  every worker loads the whole model (ZeRO-2 keeps whole parameters anyway), moves it to
          its device, and masks the full gradient with a hook (masks.py), masks on that device.
  ZeRO-3  every worker builds the model partitioned from the start and loads only its own slice
          of each weight from disk; masks are per partition and mask the reduced gradient
          partition before each optimizer step (zero3.py). The teacher is partitioned the same
          way, in a second DeepSpeed engine used for forward only.
Every function taking `engine` is collective under ZeRO (all workers call it, in the same order).
Every reduction runs on the engine's device (NCCL: CUDA tensors; gloo: CPU).
Rank 0 alone writes files: the exported model into the driver's temporary output folder and
`summary.json` into the state folder.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from pathlib import Path

from dataclasses import dataclass
from typing import Callable

import torch

from asft_ray.artifacts import write_json_atomic
from asft_ray.models import load_model, resolve_model
from asft_ray.recovery.batches import micro_batch
from asft_ray.recovery.checkpoints import SUMMARY, load_checkpoint, save_checkpoint
from asft_ray.recovery.config import RecoverConfig
from asft_ray.recovery.deepspeed_config import TrainingPlan, warmup_cosine
from asft_ray.recovery.export import export_sharded
from asft_ray.recovery.losses import Objective, recovery_loss
from asft_ray.recovery.masks import (
    apply_masks,
    copies_mask_report,
    pack_masks,
    register_mask_hooks,
    select_trainable,
    student_masks,
)
from asft_ray.recovery.phase_memory import PhasePeaks
from asft_ray.recovery.shards import Checkpoint
from asft_ray.recovery import zero3


def _import_deepspeed(use_gpu: bool):
    """DeepSpeed on CPU without compiling anything: cpu accelerator, no shared-memory comm op."""
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed()  # adopts Ray Train's process group; zero.Init needs the world size before initialize
    return deepspeed


@dataclass
class Student:
    """The student as this worker holds it. `masks`: bit-packed whole masks (ZeRO-2) or this worker's
    packed partition masks (ZeRO-3, `partitioned`). `source_dtypes`: each parameter's dtype on disk (the
    export writes it back in it). `checkpoint`: the source safetensors (None for GGUF / hub).
    `keep_alive`: transformers' HfDeepSpeedConfig, referenced while the model lives."""

    model: torch.nn.Module
    masks: dict
    trainable: list
    source_dtypes: dict
    checkpoint: Checkpoint | None
    partitioned: bool
    keep_alive: object = None


def _source_checkpoint(spec: str) -> Checkpoint | None:
    source = resolve_model(spec)
    return None if source.gguf_file or source.is_hub else Checkpoint.from_folder(source.location)


def train_dtype(plan: TrainingPlan) -> torch.dtype:
    """bf16 weights and activations with an fp32 master (DeepSpeed `bf16.enabled`), else fp32."""
    return torch.bfloat16 if plan.ds_config["bf16"]["enabled"] else torch.float32


def build_student(cfg: RecoverConfig, plan: TrainingPlan, device: torch.device) -> Student:
    """The masked student, frozen except its trainable weights (see the module docstring)."""
    if plan.zero_stage == 3:
        model, keep_alive, checkpoint = zero3.build_partitioned(cfg.model, plan.ds_config, train_dtype(plan))
        dtypes = zero3.load_partitions(model, cfg.model, checkpoint)
        masks = zero3.partition_masks(model, cfg.model, checkpoint, cfg.mask_file, cfg.dense)
        if checkpoint is not None:
            checkpoint.close()  # the mapped pages read would stay in RSS; the export reopens
        trainable = select_trainable(model, masks, cfg.train_norms, cfg.train_biases)
        model.train()
        return Student(model, masks, trainable, dtypes, checkpoint, True, keep_alive)
    model, _ = load_model(cfg.model, "cpu", show_progress=False)
    checkpoint = _source_checkpoint(cfg.model)
    dtypes = {n: checkpoint.dtype(n) if checkpoint is not None and n in checkpoint else p.dtype
              for n, p in model.named_parameters()}
    model.to(device)  # masks are made from the weights, so they live where the gradients will
    masks = student_masks(model, cfg.mask_file, cfg.dense)
    apply_masks(model, masks)
    masks = pack_masks(masks)
    trainable = select_trainable(model, masks, cfg.train_norms, cfg.train_biases)
    register_mask_hooks(model, masks)
    model.train()
    return Student(model, masks, trainable, dtypes, checkpoint, False)


def build_teacher(cfg: RecoverConfig, plan: TrainingPlan, deepspeed, device: torch.device):
    """(teacher, keep_alive) for forward only, in the student's dtype. Under ZeRO-3 it is partitioned
    like the student and wrapped in its own DeepSpeed engine (no optimizer), which gathers one
    layer at a time for the forward; under ZeRO-2 each worker holds it whole, as it holds the student."""
    if plan.zero_stage != 3:
        teacher, _ = load_model(cfg.teacher, str(device), dtype=train_dtype(plan), show_progress=False)
        return teacher, None
    ds_config = {k: v for k, v in plan.ds_config.items() if k not in ("optimizer", "scheduler")}
    model, keep_alive, checkpoint = zero3.build_partitioned(cfg.teacher, ds_config, train_dtype(plan))
    zero3.load_partitions(model, cfg.teacher, checkpoint)
    if checkpoint is not None:
        checkpoint.close()
    model.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine, keep_alive


def build_optimizer(model, plan: TrainingPlan, max_steps: int):
    """Plain torch AdamW over the trainable parameters and a warm-up + cosine LambdaLR factory,
    unless the DeepSpeed file brings its own (then None for that part)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay) if plan.build_optimizer else None

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, plan.warmup_steps, max_steps, plan.min_lr_ratio)
        )

    return optimizer, (scheduler if plan.build_scheduler else None)


def train_step(engine, teacher, objective: Objective, stream, cfg: RecoverConfig, plan: TrainingPlan, step: int,
               rank: int, world: int, before_update: Callable[[], None] | None = None,
               mark: Callable[[str], None] = lambda part: None) -> dict:
    """One optimizer step over `grad_accum` micro-batches; returns the mean loss terms over all workers.
    `before_update` runs after the last micro-step's backward, before the optimizer update; `mark`
    is told which part of the step starts (phase_memory.PhasePeaks.enter)."""
    import torch.distributed as dist

    sums: dict[str, float] = {}
    for micro in range(plan.grad_accum):
        ids = micro_batch(stream, cfg.seed, step, micro, rank, world, plan.micro_batch, plan.grad_accum, cfg.seqlen)
        ids = ids.to(engine.device)
        hidden = objective.hidden_weight > 0
        teacher_out = None
        if objective.needs_teacher:  # first: its gathered weights come and go before the student's are held
            mark("train/teacher forward")
            with torch.no_grad():
                teacher_out = teacher(input_ids=ids, output_hidden_states=hidden, use_cache=False)
        mark("train/student forward")
        out = engine(input_ids=ids, output_hidden_states=hidden, use_cache=False)
        mark("train/loss and backward")
        loss, parts = recovery_loss(objective, ids, out, teacher_out)
        engine.backward(loss)
        mark("train/optimizer step")
        if before_update is not None and engine.is_gradient_accumulation_boundary():
            before_update()
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        for key, value in {"loss": float(loss.detach()), **parts}.items():
            sums[key] = sums.get(key, 0.0) + value
    keys = sorted(sums)
    total = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=engine.device)
    dist.all_reduce(total)
    return {k: float(v) / (plan.grad_accum * world) for k, v in zip(keys, total)}


@torch.no_grad()
def evaluate(engine, ids: torch.Tensor, seqlen: int, rank: int, world: int) -> float:
    """Perplexity over the windows of `ids` (paper protocol: exp of the mean per-window NLL).
    Windows are dealt round-robin; every worker runs the same number of forwards (ZeRO-3 gathers
    weights collectively), padding with window 0 whose result it discards."""
    import torch.distributed as dist

    from asft_ray.recovery.losses import lm_loss

    n = ids.numel() // seqlen
    engine.eval()
    local = torch.zeros(2, dtype=torch.float64, device=engine.device)
    for k in range(math.ceil(n / world)):
        w = k * world + rank
        x = ids[(w if w < n else 0) * seqlen :][:seqlen].unsqueeze(0).long().to(engine.device)
        nll = float(lm_loss(engine(input_ids=x, use_cache=False).logits, x))
        if w < n:
            local += torch.tensor([nll, 1.0], dtype=torch.float64, device=engine.device)
    engine.train()
    dist.all_reduce(local)
    return math.exp(float(local[0] / local[1]))


def mask_report(model, masks: dict, trainable: list[str], optimizer_state: bool = True) -> dict:
    """(ZeRO-2's full masks; zero3.partition_mask_report checks partition masks.) Count masked-out
    entries that are not exactly zero: in the module weights (gathered under ZeRO-3), in DeepSpeed's
    fp32 master copy and (if `optimizer_state`) in the Adam moments. Collective. Right after loading
    a ZeRO-2 checkpoint the moments are not linked to their parameters until the next step, so a
    check there must pass optimizer_state=False."""
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = dict(model.named_parameters())
    report = {"params": len(masks), "module": 0, "master": 0, "master_checked": 0, "exp_avg": 0, "exp_avg_sq": 0,
              "state_checked": 0}
    for name, mask in masks.items():
        p = params[name]
        with GatheredParameters([p], modifier_rank=None):
            one = copies_mask_report(p.data, p, mask.unpack(), name in trainable, safe_get_full_fp32_param,
                                     safe_get_full_optimizer_state, optimizer_state)
        for key, value in one.items():
            report[key] += value
    return report


def _load_stats(student: Student) -> dict:
    """What loading the student cost this worker: bytes read from the safetensors, the largest
    tensor read at once (elements), and the bytes of parameters it holds at full size right after
    loading (0 under ZeRO-3: every parameter is only a partition then)."""
    full = sum(p.data.numel() * p.data.element_size() for p in student.model.parameters()
               if p.data.numel() == getattr(p, "ds_numel", p.data.numel()))
    ckpt = student.checkpoint
    return {"load_read_bytes": ckpt.bytes_read if ckpt else None, "load_largest_read": ckpt.largest_read if ckpt else None,
            "load_full_param_bytes": full}


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_memory_mib(device: torch.device, train_rss_max: float, phase_peaks: dict[str, float]) -> dict:
    """This worker's memory, MiB. `peak_rss_mib` is the process's high-water mark over its whole
    life (model loading and rank 0's export included); `train_rss_max_mib` the largest RSS seen
    at the end of a training step; `rss_peak_by_phase_mib` the largest sampled in each phase
    (phase_memory.PhasePeaks); on a GPU, `peak_cuda_mib` the peak allocation while training
    (its counter is reset after setup)."""
    # the kernel updates ru_maxrss lazily, so it can lag the RSS read now: take the larger
    lifetime = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_mib(), train_rss_max,
                   *phase_peaks.values())
    row = {"peak_rss_mib": lifetime, "train_rss_max_mib": train_rss_max, "rss_peak_by_phase_mib": phase_peaks}
    if device.type == "cuda":
        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def _storage_bytes(tensors, seen: set[int]) -> int:
    """Bytes of the storages behind `tensors` (None and empty ones skipped), each storage once
    across calls that share `seen`: views into one flat buffer count as that buffer."""
    total = 0
    for tensor in tensors:
        if torch.is_tensor(tensor) and tensor.numel():
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def model_state_mib(engine) -> dict:
    """MiB this worker holds for the model state, split in two: `params_mib`, the module's
    parameters (under ZeRO-3 only this worker's partitions exist), and `optimizer_mib`, the
    optimizer's fp32 partitions and Adam moments. Gradients (gradient_mib) and activations are
    not counted. Each storage counts once, so views into DeepSpeed's flat buffers, and a ZeRO-3
    fp32 master that *is* the parameter partition (fp32 training), are not double-counted.
    ZeRO-3 empties the inner optimizer's param groups between steps, so the state is read from
    `state` and from the ZeRO optimizer's own lists."""
    seen: set[int] = set()
    params = _storage_bytes((t for p in engine.module.parameters() for t in (p.data, getattr(p, "ds_tensor", None))),
                            seen)
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)
    masters = [*getattr(zero, "single_partition_of_fp32_groups", []), *getattr(zero, "fp32_partitioned_groups_flat", []),
               *(p for g in inner.param_groups for p in g["params"])]
    states = [v for key, state in inner.state.items() for v in (key, *state.values())]
    optimizer = _storage_bytes(masters, seen) + _storage_bytes(states, seen)
    return {"params_mib": params / 2**20, "optimizer_mib": optimizer / 2**20,
            "model_state_mib": (params + optimizer) / 2**20}


def gradient_mib(engine) -> float:
    """MiB of gradients this worker holds at an optimizer update (call it after the last backward
    of an accumulation, before `engine.step()`): the module parameters' `.grad` and the ZeRO
    optimizer's gradient partitions (ZeRO-3's flat partition buffer; ZeRO-2's contiguous
    partition buffer and averaged partitions; the fp32 masters' `.grad`). Each storage once.
    Reduce buckets are not counted: they are buffers of a fixed size, not one gradient each."""
    zero = engine.optimizer
    tensors = [p.grad for p in engine.module.parameters()]
    tensors += [getattr(zero, name, None) for name in ("grad_partitions_flat_buffer", "grads_in_partition")]
    averaged = getattr(zero, "averaged_gradients", None) or {}
    for group in (averaged.values() if isinstance(averaged, dict) else averaged):
        tensors += list(group) if isinstance(group, (list, tuple)) else [group]
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        tensors += [getattr(master, "grad", None) for master in getattr(zero, name, [])]
    return _storage_bytes(tensors, set()) / 2**20


def release_teacher(teacher) -> float | None:
    """Free the teacher's weights once training is over, so that the export has that memory: every
    parameter's storage (under ZeRO-3, its partition `ds_tensor`) is swapped for an empty tensor.
    Dropping the engine is not enough: DeepSpeed 0.19 keeps a ZeRO-3 engine's module alive for the
    rest of the process (the autograd Function classes it defines per module close over it).
    Returns the MiB the teacher still holds (0 when freed), None without a teacher."""
    from asft_ray.memory import return_free_memory

    if teacher is None:
        return None
    if hasattr(teacher, "destroy"):  # a DeepSpeed engine: its hooks off first
        teacher.destroy()
    for p in getattr(teacher, "module", teacher).parameters():
        for tensor in (p, getattr(p, "ds_tensor", None)):
            if tensor is not None:
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return_free_memory()
    return teacher_mib(teacher)


def teacher_mib(teacher) -> float:
    """MiB of the teacher's weights this worker holds: the whole model under ZeRO-2, this worker's
    partitions (plus DeepSpeed's small persistent whole parameters) under ZeRO-3. 0 without a teacher."""
    if teacher is None:
        return 0.0
    module = getattr(teacher, "module", teacher)  # a DeepSpeed engine wraps the model
    tensors = (t for p in module.parameters() for t in (p.data, getattr(p, "ds_tensor", None)))
    return _storage_bytes(tensors, set()) / 2**20


def train_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker. `config` comes from recipe.run_recover."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg: RecoverConfig = config["cfg"]
    plan: TrainingPlan = config["plan"]
    state = Path(config["state_dir"])
    phases = PhasePeaks("load")
    deepspeed = _import_deepspeed(config["use_gpu"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not config["use_gpu"]:
        torch.set_num_threads(max(1, int(cfg.worker_cpus)))
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()

    student = build_student(cfg, plan, device)
    model, masks, trainable = student.model, student.masks, student.trainable
    load_stats = _load_stats(student)
    if cfg.activation_checkpointing:  # the same numbers: the recomputed forward gives the same bits
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer, scheduler = build_optimizer(model, plan, cfg.max_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=plan.ds_config,
        model_parameters=None if optimizer is not None else [p for p in model.parameters() if p.requires_grad],
    )
    enforce = zero3.enforce_masks_on_partitions(model, masks) if student.partitioned else None
    grads_held: list[float] = []

    def before_update() -> None:
        if enforce is not None:
            enforce()
        grads_held.append(gradient_mib(engine))

    def check_masks(optimizer_state: bool = True) -> dict:
        if student.partitioned:
            return zero3.partition_mask_report(model, masks, trainable, engine.device, optimizer_state)
        return mask_report(model, masks, trainable, optimizer_state)

    objective = Objective(cfg.lm_weight, cfg.effective_kd_weight, cfg.hidden_weight, cfg.temperature)
    teacher = teacher_keep_alive = None
    if objective.needs_teacher:
        teacher, teacher_keep_alive = build_teacher(cfg, plan, deepspeed, engine.device)
    stream, eval_ids = ray.get([config["stream"], config["eval_ids"]])  # object refs: read by inputs.py's Ray task
    eval_seqlen = cfg.eval_seqlen or cfg.seqlen

    history, evals, start, resumed_check = [], [], 0, None
    if config["resume_from"] is not None:  # verified by the driver before Ray started (checkpoints.verify_resume)
        client = load_checkpoint(engine, state, config["resume_from"])
        start, history, evals = client["step"], client["history"], client["evals"]
        resumed_check = check_masks(optimizer_state=False)
    if cfg.eval_every and start == 0:
        phases.enter("eval")
        evals.append({"step": 0, "ppl": evaluate(engine, eval_ids, eval_seqlen, rank, world)})

    tokens_per_step = plan.micro_batch * plan.grad_accum * world * cfg.seqlen
    stopped, train_rss_max = False, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(start, cfg.max_steps):
        phases.enter("train")
        t, lr = time.perf_counter(), engine.get_lr()[0]
        row = train_step(engine, teacher, objective, stream, cfg, plan, step, rank, world, before_update, phases.enter)
        row.update(step=step + 1, seconds=time.perf_counter() - t, lr=lr)
        history.append(row)
        train_rss_max = max(train_rss_max, rss_mib())
        done = step + 1
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            phases.enter("eval")
            evals.append({"step": done, "ppl": evaluate(engine, eval_ids, eval_seqlen, rank, world)})
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
            phases.enter("checkpoint")
            save_checkpoint(engine, state, done, {"step": done, "history": history, "evals": evals}, rank,
                            config["identity"])
        ray.train.report({"step": done, "loss": row["loss"]})
        if cfg.stop_after_steps == done:
            stopped = True
            break

    try:  # after a step, so Adam's moments exist; a statistic must not cost the run
        held = {**model_state_mib(engine), "grads_mib": max(grads_held, default=None),
                "teacher_mib": teacher_mib(teacher)}
    except Exception as err:  # noqa: BLE001 - DeepSpeed internals differ across versions
        print(f"warning: could not measure model-state memory: {err}", file=sys.stderr)
        held = {}
    summary = {"stopped": stopped, "steps_done": len(history), "resumed_from_step": start, "history": history,
               "evals": evals, "tokens_per_step": tokens_per_step, "world_size": world}
    summary["teacher_mib_after_training"] = release_teacher(teacher)  # its memory goes to the export
    teacher = teacher_keep_alive = None
    if not stopped:
        summary["mask_check"] = check_masks()
        summary["mask_check_after_resume"] = resumed_check
        phases.enter("export")
        export_sharded(model, trainable, student.source_dtypes, cfg.model, Path(config["export_dir"]), rank,
                       student.checkpoint)
        summary["trainable_params"] = len(trainable)
    memory = [None] * world
    dist.all_gather_object(memory, {**peak_memory_mib(device, train_rss_max, phases.stop()), **held, **load_stats,
                                    "mask_bytes": sum(m.nbytes for m in masks.values())})
    summary["memory"] = memory
    if rank == 0:
        write_json_atomic(state / SUMMARY, summary)
    dist.barrier()
