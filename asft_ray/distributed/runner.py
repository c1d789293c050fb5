"""Ray at the edge: the driver starts (or joins) a Ray cluster and runs the recipe in an actor.

The actor owns the model while it is pruned; the driver holds only the config and the result.
"""

from __future__ import annotations

import dataclasses
import os

import ray

from asft_ray.config import PruneConfig
from asft_ray.errors import AsftError


def init_ray(address: str | None = None, object_store_bytes: int | None = None) -> bool:
    """Join `address` (or $RAY_ADDRESS); otherwise start an embedded local cluster, dashboard off.

    An embedded cluster's shared-memory object store (Ray spills beyond it) is $ASFT_OBJECT_STORE_GB,
    else `object_store_bytes` (see `streaming_object_store_bytes`), else Ray's default.
    Returns True when this call connected (so the caller should shut it down again)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options = {}
    store_gb = os.environ.get("ASFT_OBJECT_STORE_GB")
    if store_gb:
        object_store_bytes = int(float(store_gb) * 2**30)
    if object_store_bytes and not (address or os.environ.get("RAY_ADDRESS")):
        options["object_store_memory"] = object_store_bytes
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level="ERROR", **options)
    except ConnectionError as err:
        raise AsftError(f"could not reach the Ray cluster at {address or os.environ.get('RAY_ADDRESS')}: {err}") from err
    return True


def streaming_object_store_bytes(model_spec: str) -> int | None:
    """An embedded object store sized for streaming a model directory: 10 % of its weight bytes
    (at least 0.3 GiB). Its pages count in the resident memory of every process that touches
    them, so Ray's default (30 % of the machine's memory) would let them grow past one layer's
    worth; what does not fit is spilled to disk. None for models that are not streamed."""
    from asft_ray.models import is_safetensors_dir, resolve_model

    source = resolve_model(model_spec)
    if not is_safetensors_dir(source):
        return None
    from pathlib import Path

    weight_bytes = sum(f.stat().st_size for f in Path(source.location).glob("*.safetensors"))
    return max(int(0.3 * 2**30), weight_bytes // 10)


@ray.remote
class PruneWorker:
    """Runs one pruning recipe with `threads` torch threads; with cfg.workers > 0 it starts
    that many scoring actors and only orchestrates them (and applies the masks)."""

    def __init__(self, threads: int):
        import sys

        import torch

        torch.set_num_threads(threads)
        # Ray forwards an actor's stdout to the driver's stdout; libraries that log to stdout
        # (DeepSpeed's accelerator notice) would mix into `asft ... --json`. Keep stdout for the CLI.
        sys.stdout = sys.stderr

    def ready(self) -> bool:
        return True

    def run(self, cfg: dict, show_progress: bool) -> dict:
        from asft_ray.prune import run_prune

        cfg = _device_reserved(PruneConfig(**cfg))
        return _with_scoring_workers(cfg, lambda *where: run_prune(cfg, show_progress, *where))

    def staged(self, values: dict, show_progress: bool) -> dict:
        from asft_ray.staged import StagedConfig, run_staged

        cfg = StagedConfig.from_dict(values)
        cfg = dataclasses.replace(cfg, prune=_device_reserved(cfg.prune))
        return _with_scoring_workers(cfg.prune, lambda *where: run_staged(cfg, show_progress, *where))


def _device_reserved(cfg: PruneConfig) -> PruneConfig:
    """`device: auto` means a GPU only if this actor reserved one (Ray 2.60 shows every GPU to every actor)."""
    if cfg.device != "auto":
        return cfg
    return dataclasses.replace(cfg, device="cuda" if ray.get_gpu_ids() else "cpu")


def _alive_nodes() -> list[dict]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def coordinator_options(cfg: PruneConfig, nodes: list[dict], embedded: bool = False) -> dict:
    """What the pruning coordinator reserves on one node: explicit CPUs (never 0, so never a CPU-less
    head), a GPU when it computes on one, memory when asked; never more than one node has.

    The one exception is asft's own embedded cluster (one local node, which has the CPUs): there a
    coordinator that only orchestrates scoring actors reserves no CPU, so that `--workers` can use
    every core of the machine."""
    largest = max((n.get("CPU", 0) for n in nodes), default=1)
    cluster_gpus = sum(n.get("GPU", 0) for n in nodes)
    cpus = cfg.coordinator_cpus or (1 if cfg.uses_scoring_workers else max(1, largest))
    if embedded and cfg.uses_scoring_workers and cfg.coordinator_cpus is None:
        cpus = 0
    gpus = cfg.coordinator_gpus
    if gpus is None:
        on_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and cluster_gpus and not cfg.uses_scoring_workers)
        gpus = 1 if on_gpu else 0
    options = {"num_cpus": cpus, "num_gpus": gpus}
    if cfg.coordinator_memory_gb:
        options["memory"] = int(cfg.coordinator_memory_gb * 2**30)
    return options


def place_coordinator(cfg: PruneConfig, timeout_s: float | None = None, embedded: bool = False):
    """Start the pruning coordinator and wait until it is placed, or fail naming what no node has."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("ASFT_PLACEMENT_TIMEOUT_S", 60))
    nodes = _alive_nodes()
    options = coordinator_options(cfg, nodes, embedded)
    worker = PruneWorker.options(**options).remote(max(1, int(options["num_cpus"])))
    ready, _ = ray.wait([worker.ready.remote()], timeout=timeout_s)
    if not ready:
        ray.kill(worker)
        asked = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], "memory": options.get("memory", 0)}
        short = [f"{v:g} {k} (the largest node has {max((n.get(k, 0) for n in nodes), default=0):g})"
                 for k, v in asked.items() if v and not any(n.get(k, 0) >= v for n in nodes)]
        raise AsftError(f"the pruning coordinator could not be placed within {timeout_s:g}s: "
                        + (f"no node has {', '.join(short)}" if short else "no node has those resources free now"))
    return worker


def _with_scoring_workers(cfg: PruneConfig, recipe):
    """recipe() in this process, or recipe(make_runner, sum_gradients) on cfg.workers scoring actors."""
    from asft_ray.distributed.sharded import (
        WorkerResources,
        sharded_gradient_sums,
        sharded_runner_factory,
        start_workers,
    )

    if not cfg.uses_scoring_workers:
        return recipe()
    memory = int(cfg.worker_memory_gb * 2**30) if cfg.worker_memory_gb else None
    workers = start_workers(cfg.workers, WorkerResources(cfg.worker_cpus, cfg.worker_gpus, memory))
    try:
        return recipe(sharded_runner_factory(workers), sharded_gradient_sums(workers))
    finally:
        for worker in workers:
            ray.kill(worker)


def _unwrap(err: Exception) -> Exception:
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, AsftError) else err


def prune_on_ray(
    cfg: PruneConfig, address: str | None = None, num_cpus: int | None = None, show_progress: bool = True
) -> dict:
    return _on_ray(cfg, "run", cfg.to_dict(), address, num_cpus, show_progress)


def staged_on_ray(values: dict, address: str | None = None, show_progress: bool = True) -> dict:
    """A staged run (asft_ray.staged) inside the pruning actor; `values` as in the YAML config."""
    from asft_ray.staged import StagedConfig

    return _on_ray(StagedConfig.from_dict(values).prune, "staged", values, address, None, show_progress)


def _on_ray(cfg: PruneConfig, method: str, payload: dict, address, num_cpus, show_progress: bool) -> dict:
    owned = init_ray(address, streaming_object_store_bytes(cfg.model) if cfg.streams() else None)
    if num_cpus:
        cfg = dataclasses.replace(cfg, coordinator_cpus=cfg.coordinator_cpus or num_cpus)
    embedded = owned and not (address or os.environ.get("RAY_ADDRESS"))
    try:
        worker = place_coordinator(cfg, embedded=embedded)
    except AsftError:
        if owned:
            ray.shutdown()
        raise
    try:
        return ray.get(getattr(worker, method).remote(payload, show_progress))
    except ray.exceptions.RayTaskError as err:
        raise _unwrap(err) from None
    except ray.exceptions.ActorDiedError as err:
        hint = "; the node ran low on memory" if "memory" in str(err).lower() else ""
        raise AsftError(f"the pruning worker died ({str(err).strip().splitlines()[0]}{hint})") from None
    finally:
        ray.kill(worker)
        if owned:  # also flushes the worker's last log lines before our caller prints anything
            ray.shutdown()
