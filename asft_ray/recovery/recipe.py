"""The recovery recipe: check inputs -> tokenize data -> Ray Train TorchTrainer -> export + record.

The driver holds the config, the token streams and the result; the workers own the model.
Everything that can be wrong with the input is checked here, before Ray starts and before
anything is written, so a bad run leaves `--out` untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

import asft_ray
from asft_ray.artifacts import RUN_FILE, atomic_output_dir, check_output_dir, read_run, write_json_atomic
from asft_ray.data import c4_documents, resolve_data_dir, wikitext2_ids
from asft_ray.errors import AsftError
from asft_ray.models import load_model, resolve_model
from asft_ray.recovery.batches import step_starts, token_stream
from asft_ray.recovery.checkpoints import STATE, SUMMARY, identity_digest, prepare_state, state_dir, verify_resume
from asft_ray.recovery.config import RecoverConfig
from asft_ray.recovery.deepspeed_config import TrainingPlan, build_plan, load_user_config
from asft_ray.recovery.masks import check_mask_entry, check_mask_names, linear_weight_names, require_zeros, student_masks
from asft_ray.recovery.shards import Checkpoint


def model_config(spec: str):
    """The HF config of a model spec, without loading weights."""
    from transformers import AutoConfig

    source = resolve_model(spec)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(source.location, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as err:
        raise AsftError(f"could not read the config of {spec!r}: {str(err).strip().splitlines()[0]}") from err


def check_teacher(cfg: RecoverConfig, student_config) -> None:
    """Distillation compares logits (and hidden states) position by position: shapes must agree."""
    if not cfg.teacher:
        return
    teacher = model_config(cfg.teacher)
    if teacher.vocab_size != student_config.vocab_size:
        raise AsftError(
            f"teacher {cfg.teacher!r} has vocabulary size {teacher.vocab_size}, the student {student_config.vocab_size}: "
            "distillation needs the same tokenizer"
        )
    if cfg.hidden_weight > 0:
        for key in ("hidden_size", "num_hidden_layers"):
            if getattr(teacher, key) != getattr(student_config, key):
                raise AsftError(f"hidden-state distillation needs the same {key}: teacher {getattr(teacher, key)}, "
                                f"student {getattr(student_config, key)}")


def check_student(cfg: RecoverConfig):
    """Prove the student's masks exist (zeros, or a matching mask file) without holding the model:
    weights and masks are read one tensor at a time from the safetensors and checked against a
    skeleton on the `meta` device. Returns (tokenizer, mask summary); the workers rebuild the
    same masks. (A GGUF or hub model has no safetensors to stream: it is loaded whole here.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(cfg.model)
    config = model_config(cfg.model)
    check_teacher(cfg, config)
    if source.gguf_file or source.is_hub:
        model, tokenizer = load_model(cfg.model, "cpu", show_progress=False)
        masks = student_masks(model, cfg.mask_file, cfg.dense)
        return tokenizer, _mask_summary([(m.numel(), int(m.sum())) for m in masks.values()])
    tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=False)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    params = dict(skeleton.named_parameters())
    if cfg.dense:
        return tokenizer, _mask_summary([(params[n].numel(), params[n].numel()) for n in linear_weight_names(skeleton)])
    if cfg.mask_file:
        masks = Checkpoint.from_file(cfg.mask_file)
        check_mask_names(cfg.mask_file, masks.names(), params)
        counts = []
        for name in masks.names():
            check_mask_entry(cfg.mask_file, name, masks.dtype(name), masks.shape(name), params[name].shape)
            counts.append((params[name].numel(), int(masks.read(name).sum())))
        return tokenizer, _mask_summary(counts)
    weights = Checkpoint.from_folder(source.location)
    counts = []
    for name in linear_weight_names(skeleton):
        counts.append((params[name].numel(), int((weights.read(name) != 0).sum())))
        weights.close()  # unmapped after each tensor, so the driver never holds the model's pages
    require_zeros(any(kept < total for total, kept in counts))
    return tokenizer, _mask_summary(counts)


def _mask_summary(counts: list[tuple[int, int]]) -> dict:
    """From (weights, kept) per masked tensor."""
    total, kept = sum(t for t, _ in counts), sum(k for _, k in counts)
    return {"masked_params": len(counts), "weights": total, "sparsity": 1 - kept / total}


def training_tokens(cfg: RecoverConfig, tokenizer, data_dir: str):
    """(C4 token stream for training, WikiText-2 *valid* ids for the recovery curve or None)."""
    stream = token_stream(c4_documents(data_dir), tokenizer)
    step_starts(cfg.seed, 0, 1, len(stream), cfg.seqlen)  # fails early if the text is too short
    eval_ids = None
    if cfg.eval_every:
        seqlen = cfg.eval_seqlen or cfg.seqlen
        eval_ids = wikitext2_ids(tokenizer, "valid", data_dir).reshape(-1)[: cfg.eval_windows * seqlen]
        if eval_ids.numel() < seqlen:
            raise AsftError(f"WikiText-2 valid has fewer than {seqlen} tokens")
    return stream, eval_ids


class _Stopped(Exception):
    """The stop_after_steps test hook ended the run early: no output, state kept for --resume."""


def _use_gpu(cfg: RecoverConfig, ray) -> bool:
    if cfg.device != "auto":
        return cfg.device == "cuda"
    return ray.cluster_resources().get("GPU", 0) >= cfg.workers


def worker_env(use_gpu: bool) -> dict[str, str]:
    """The Ray Train workers' environment. `MALLOC_MMAP_THRESHOLD_`: ZeRO-3 gathers every weight
    for each forward and backward and frees it after; glibc's malloc serves blocks below its
    dynamic mmap threshold (which grows up to 32 MiB) from the heap, where freed ones stay in
    RSS, fragmented. Fixed at 1 MiB, a gathered weight is its own mapping, returned on free
    (a 2-layer hidden-256 Llama, ZeRO-3, 2 workers: peak RSS 1073 -> 860 MiB). A value in the
    driver's environment is kept."""
    env = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(2**20))}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def trainer_class():
    """Ray Train's TorchTrainer less two parts of its controller (Ray Train V2) that do not suit a command-line
    driver on asft-ray's dashboard-less cluster:

    * The PlacementGroupCleaner, a detached actor that polls the controller's liveness through the state API,
      which needs the dashboard's HTTP server (off here) and finds its cluster by auto-detection. Seen in this
      host's Ray logs: on a lone cluster it prints "Failed to query Ray Train Controller actor state ..." at every
      check; with several Ray clusters on the host its thread dies with a "Found multiple active Ray instances"
      traceback; Ray forwards both to the terminal. From Ray 2.60's code: with a cluster that `ray start`
      recorded in Ray's temp dir it would ask *that* cluster about our controller (unknown there, so "dead") and
      remove our placement group; a controller abort waits up to 12 s to stop it and logs an exception if it
      cannot. The placement group is the driver's job's anyway: Ray removes it when the driver ends.
    * Its SIGINT handler, which replaces Python's KeyboardInterrupt with an abort of the controller and then
      `sys.exit(0)`, and stays installed after fit() returns (a later Ctrl-C in the same process would exit 0).
      The CLI's own handling applies instead (remove temporary outputs, "asft: interrupted", 130), and `fit`
      kills the controller on the way out (`controller`: its handle, recorded here instead)."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # a Ray without it (older, or Ray Train V1): nothing to leave out
        PlacementGroupCleanerCallback = ()

    class AsftTrainer(TorchTrainer):
        controller = None

        def _create_default_callbacks(self):
            return [cb for cb in super()._create_default_callbacks()
                    if not isinstance(cb, PlacementGroupCleanerCallback)]

        def _register_sigint_handler(self, controller):
            self.controller = controller

    return AsftTrainer


def stop_controller(trainer) -> None:
    """On an interrupt, before ray.shutdown: kill the Train controller (its worker actors go with it), so that
    it does not run on into the shutdown and report the workers' and the driver's disappearance."""
    import ray

    controller = getattr(trainer, "controller", None)
    if controller is None:
        return
    try:
        ray.kill(controller, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone, or Ray is going down: nothing left to stop
        pass


def fit(cfg: RecoverConfig, plan: TrainingPlan, stream, eval_ids, folder: Path, export_dir: Path, identity: dict,
        resume_from: dict | None) -> None:
    """Run train_loop on `cfg.workers` Ray Train workers (gloo on CPU, NCCL on GPU), from the checkpoint
    `resume_from` (verified by prepare_state) or from step 0."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from asft_ray.recovery.train_loop import train_loop

    use_gpu = _use_gpu(cfg, ray)
    have = ray.cluster_resources().get("CPU", 0)
    if have < cfg.workers * cfg.worker_cpus:
        raise AsftError(f"{cfg.workers} workers x {cfg.worker_cpus} CPUs need {cfg.workers * cfg.worker_cpus:g} CPUs, "
                        f"the Ray cluster has {have:g}")
    env = worker_env(use_gpu)
    trainer = trainer_class()(
        train_loop,
        train_loop_config={"cfg": cfg, "plan": plan, "stream": stream, "eval_ids": eval_ids, "use_gpu": use_gpu,
                           "state_dir": str(folder), "export_dir": str(export_dir),
                           "identity": identity_digest(identity), "resume_from": resume_from},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.worker_cpus, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=f"recover-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(folder / "ray"),
                             failure_config=FailureConfig(max_failures=0), worker_runtime_env={"env_vars": env}),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise _worker_error(err) from None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (cli.Terminated)
        stop_controller(trainer)
        raise


def _worker_error(err: Exception) -> AsftError:
    """An AsftError raised in a worker, as is; anything else as one line naming the worker."""
    failures = getattr(err, "worker_failures", None) or {}
    for failure in failures.values():
        seen = failure
        while seen is not None:
            if isinstance(seen, AsftError):
                return AsftError(str(seen))
            seen = getattr(seen, "cause", None) or seen.__cause__
    text = str(next(iter(failures.values()))) if failures else str(err)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return AsftError(f"recovery training failed on a worker: {lines[-1] if lines else type(err).__name__}")


def run_recover(cfg: RecoverConfig, address: str | None = None) -> dict:
    """Recover `cfg.model` into `cfg.out` (atomically) with `asft_run.json`. Returns that record.

    With cfg.stop_after_steps (a test hook standing in for a kill) it returns {"stopped": True, ...}
    and writes no output; a later run with resume=True continues from the last checkpoint."""
    from asft_ray.distributed.runner import init_ray

    start = time.perf_counter()
    cfg = _absolute_paths(cfg)  # Ray Train workers do not run in this directory
    user_ds = load_user_config(cfg.deepspeed)
    identity = {**cfg.identity(), "deepspeed_config": user_ds}
    if check_output_dir(cfg.out, identity, cfg.overwrite):
        return {**read_run(cfg.out), "reused": True}
    folder = state_dir(cfg.out)
    verified = verify_resume(folder, identity) if cfg.resume and (folder / STATE).is_file() else None  # reads only
    resolve_model(cfg.model)
    plan = build_plan(cfg, user_ds, cfg.workers, source=cfg.deepspeed or "deepspeed config",
                      largest_linear=largest_linear(cfg.model))
    if cfg.teacher:
        resolve_model(cfg.teacher)
    data_dir = resolve_data_dir(cfg.data_dir)
    tokenizer, mask_info = check_student(cfg)
    stream, eval_ids = training_tokens(cfg, tokenizer, data_dir)
    resume_from = prepare_state(folder, identity, cfg.resume, verified)  # the checkpoint verified before Ray starts
    prepared_s = time.perf_counter() - start

    owned = init_ray(address)
    try:
        with atomic_output_dir(cfg.out) as tmp:
            fit(cfg, plan, stream, eval_ids, folder, tmp, identity, resume_from)
            summary = json.loads((folder / SUMMARY).read_text())
            if summary["stopped"]:
                raise _Stopped(summary)
            record = _record(cfg, identity, plan, summary, mask_info, data_dir, len(stream), prepared_s,
                             time.perf_counter() - start)
            _check_masks_held(summary)
            write_json_atomic(tmp / RUN_FILE, record)
    except _Stopped as stop:
        summary = stop.args[0]
        return {"stopped": True, "steps_done": summary["steps_done"], "state_dir": str(folder)}
    finally:
        if owned:
            import ray

            ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)
    return record


def _absolute_paths(cfg: RecoverConfig) -> RecoverConfig:
    """Local paths made absolute (aliases and hub ids stay as they are)."""
    def absolute(value):
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    return dataclasses.replace(cfg, model=absolute(cfg.model), teacher=absolute(cfg.teacher),
                               mask_file=absolute(cfg.mask_file), deepspeed=absolute(cfg.deepspeed),
                               data_dir=absolute(cfg.data_dir), out=str(Path(cfg.out).resolve()))


def _check_masks_held(summary: dict) -> None:
    for key in ("mask_check", "mask_check_after_resume"):
        check = summary.get(key)
        if check and any(check[k] for k in ("module", "master", "exp_avg", "exp_avg_sq")):
            raise AsftError(f"pruned weights did not stay zero ({key}: {check}); nothing was written")


def largest_linear(model_spec: str) -> int | None:
    """Weights in the model's largest decoder linear (hidden x max(MLP width, hidden)), from its config."""
    from asft_ray.models import model_config

    config = model_config(model_spec)
    hidden = getattr(config, "hidden_size", None)
    return hidden * max(getattr(config, "intermediate_size", None) or hidden, hidden) if hidden else None


def _record(cfg, identity, plan, summary, mask_info, data_dir, stream_tokens, prepared_s, total_s) -> dict:
    history = summary["history"]
    train_s = sum(row["seconds"] for row in history)
    return {
        "inputs": identity,
        "config": cfg.to_dict(),
        "deepspeed_config": plan.ds_config,
        "data_dir": data_dir,
        "train_stream_tokens": stream_tokens,
        "masks": mask_info,
        "losses": [row["loss"] for row in history],
        "history": history,
        "evals": summary["evals"],
        "tokens_per_step": summary["tokens_per_step"],
        "tokens_per_s": summary["tokens_per_step"] * len(history) / train_s if train_s else None,
        "memory": summary["memory"],
        "world_size": summary["world_size"],
        "mask_check": summary["mask_check"],
        "mask_check_after_resume": summary["mask_check_after_resume"],
        "resumed_from_step": summary["resumed_from_step"],
        "trainable_params": summary["trainable_params"],
        "timings": {"prepare_s": prepared_s, "train_s": train_s, "total_s": total_s},
        "versions": {"asft_ray": asft_ray.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
