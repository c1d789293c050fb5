"""The recovery recipe: check inputs -> read model and data in a Ray task -> Ray Train TorchTrainer -> export + record.

The driver holds the config, object refs to the token streams, and the result; the workers own the
model. What can be wrong with the input without reading a model or the data (settings, the DeepSpeed
file, paths, the output and resume folders) is checked here before Ray starts; what needs the
weights, a tokenizer or the text (masks, the teacher's shape, enough tokens) is checked by the one
Ray task that reads them (inputs.py), so that the driver never imports transformers or `datasets`.
Both come before anything is written, so a bad run leaves `--out` untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path

import asft_ray
from asft_ray.artifacts import RUN_FILE, atomic_output_dir, check_output_dir, read_run, write_json_atomic
from asft_ray.data import resolve_data_dir
from asft_ray.errors import AsftError
from asft_ray.models import resolve_model
from asft_ray.recovery.checkpoints import STATE, SUMMARY, identity_digest, prepare_state, state_dir, verify_resume
from asft_ray.recovery.config import RecoverConfig
from asft_ray.recovery.deepspeed_config import TrainingPlan, build_plan, load_user_config
from asft_ray.recovery.inputs import RunInputs, read_inputs_on_ray


class _Stopped(Exception):
    """The stop_after_steps test hook ended the run early: no output, state kept for --resume."""


def _use_gpu(cfg: RecoverConfig, ray) -> bool:
    if cfg.device != "auto":
        return cfg.device == "cuda"
    return ray.cluster_resources().get("GPU", 0) >= cfg.workers


def check_placeable(cfg: RecoverConfig) -> None:
    """Fail before any work if no set of the cluster's nodes can ever hold the training workers."""
    import ray

    from asft_ray.distributed.placement import require_placeable, resource_ask

    require_placeable(f"{cfg.workers} recovery workers", resource_ask(cfg.worker_cpus, int(_use_gpu(cfg, ray))),
                      cfg.workers)


def worker_env(use_gpu: bool) -> dict[str, str]:
    """The Ray Train workers' environment, with glibc's mmap threshold fixed
    (distributed.runner.WORKER_MMAP_THRESHOLD: ZeRO-3 gathers every weight for each forward and
    backward and frees it after)."""
    from asft_ray.distributed.runner import worker_malloc_env

    env = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", **worker_malloc_env()}
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
    if cfg.teacher:
        resolve_model(cfg.teacher)
    ds_source = cfg.deepspeed or "deepspeed config"
    build_plan(cfg, user_ds, cfg.workers, source=ds_source)  # its conflicts, before Ray; ZeRO-3 sizes need the model
    data_dir = resolve_data_dir(cfg.data_dir)

    owned = init_ray(address)
    try:
        check_placeable(cfg)
        inputs = read_inputs_on_ray(cfg, data_dir)
        plan = build_plan(cfg, user_ds, cfg.workers, source=ds_source, largest_linear=inputs.largest_linear)
        resume_from = prepare_state(folder, identity, cfg.resume, verified)  # the checkpoint verified before Ray started
        prepared_s = time.perf_counter() - start
        with atomic_output_dir(cfg.out) as tmp:
            fit(cfg, plan, inputs.stream, inputs.eval_ids, folder, tmp, identity, resume_from)
            summary = json.loads((folder / SUMMARY).read_text())
            if summary["stopped"]:
                raise _Stopped(summary)
            record = _record(cfg, identity, plan, summary, inputs, data_dir, prepared_s, time.perf_counter() - start)
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


def _record(cfg, identity, plan, summary, inputs: RunInputs, data_dir, prepared_s, total_s) -> dict:
    import torch  # already there: Ray Train's TorchTrainer imports it

    history = summary["history"]
    train_s = sum(row["seconds"] for row in history)
    return {
        "inputs": identity,
        "config": cfg.to_dict(),
        "deepspeed_config": plan.ds_config,
        "data_dir": data_dir,
        "train_stream_tokens": inputs.stream_tokens,
        "masks": inputs.masks,
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
        "teacher_mib_after_training": summary.get("teacher_mib_after_training"),  # 0: freed before the export
        "timings": {"prepare_s": prepared_s, "train_s": train_s, "total_s": total_s},
        "versions": {"asft_ray": asft_ray.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
