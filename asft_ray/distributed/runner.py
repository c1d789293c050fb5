"""Ray at the edge: the driver starts (or joins) a Ray cluster and runs the recipe in an actor.

The actor owns the model while it is pruned; the driver holds only the config and the result.
"""

from __future__ import annotations

import os
import signal
import threading

import ray

from asft_ray.config import PruneConfig
from asft_ray.errors import AsftError


CONNECT_TIMEOUT_ENV = "ASFT_CONNECT_TIMEOUT_S"
DEFAULT_CONNECT_TIMEOUT_S = 30.0


def init_ray(address: str | None = None) -> bool:
    """The one place asft-ray starts or joins Ray.

    With `address` (or $RAY_ADDRESS): join that cluster, after checking within
    $ASFT_CONNECT_TIMEOUT_S (default 30 s) that its GCS port answers. Without: start a private
    embedded cluster (`address="local"`), never one that `ray start` left recorded in Ray's temp
    dir (on a shared host anyone could have put it there). Dashboard off.

    Returns True when this call connected (so the caller should shut it down again)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    store_gb = os.environ.get("ASFT_OBJECT_STORE_GB")  # an embedded cluster's shared-memory object store (Ray spills beyond it)
    options = {}
    if address is None:
        address = "local"
        if store_gb:
            options["object_store_memory"] = _object_store_bytes(store_gb)
    elif store_gb:
        raise AsftError(f"ASFT_OBJECT_STORE_GB sizes the embedded cluster's object store, but --address/RAY_ADDRESS "
                        f"{address} names an existing cluster (its store was sized when it started): unset one of them")
    else:
        check_cluster_reachable(address)
    in_main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level="ERROR", **options)
    except ConnectionError as err:
        raise AsftError(f"could not reach the Ray cluster at {address}: {err}") from err
    finally:
        if in_main_thread and sigterm is not None:  # ray.init installs sys.exit(15); keep the CLI's own handling
            signal.signal(signal.SIGTERM, sigterm)
    return True


def _object_store_bytes(text: str) -> int:
    try:
        gb = float(text)
    except ValueError:
        gb = 0.0
    if not gb > 0:
        raise AsftError(f"ASFT_OBJECT_STORE_GB must be a positive number of GiB, got {text!r}")
    return int(gb * 2**30)


def connect_timeout_s() -> float:
    text = os.environ.get(CONNECT_TIMEOUT_ENV)
    if text is None:
        return DEFAULT_CONNECT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise AsftError(f"{CONNECT_TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return seconds


def gcs_host_port(address: str) -> tuple[str, int]:
    """`host:port` or `ray://host:port` (Ray Client) -> (host, port); anything else is one clear line."""
    text = address.strip()
    if text.startswith("ray://"):
        text = text[len("ray://"):]
    elif "://" in text:
        raise AsftError(f"--address {address!r} is a URL; a Ray cluster address is the GCS host:port (e.g. "
                        "127.0.0.1:6379) or ray://host:10001 for Ray Client (http:// job-server addresses are for `asft submit`)")
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    if not host or any(c.isspace() or c in "/[]" for c in host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise AsftError(f"--address {address!r} is not host:port (e.g. 127.0.0.1:6379)")
    return host, int(port)


def check_cluster_reachable(address: str) -> None:
    """Ray retries an unreachable GCS for many minutes without a word: try its port first, with a timeout."""
    import socket

    if address == "auto":  # Ray's own lookup of the cluster recorded on this host: asked for by name
        return
    host, port = gcs_host_port(address)
    timeout = connect_timeout_s()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except TimeoutError:
        raise AsftError(f"could not reach the Ray cluster at {address}: no answer within {timeout:g} s "
                        f"(${CONNECT_TIMEOUT_ENV} sets the limit)") from None
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise AsftError(f"could not reach the Ray cluster at {address}: {reason}") from None


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

    def run(self, cfg: dict, show_progress: bool) -> dict:
        from asft_ray.prune import run_prune

        cfg = PruneConfig(**cfg)
        return _with_scoring_workers(cfg, lambda *where: run_prune(cfg, show_progress, *where))

    def staged(self, values: dict, show_progress: bool) -> dict:
        from asft_ray.staged import StagedConfig, run_staged

        cfg = StagedConfig.from_dict(values)
        return _with_scoring_workers(cfg.prune, lambda *where: run_staged(cfg, show_progress, *where))


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
    owned = init_ray(address)
    cpus = num_cpus or max(1, int(ray.available_resources().get("CPU", 1)))
    # with scoring actors, the coordinator reserves no CPU so that they can be placed
    reserved = 0 if cfg.uses_scoring_workers else cpus
    worker = PruneWorker.options(num_cpus=reserved).remote(cpus)
    try:
        return ray.get(getattr(worker, method).remote(payload, show_progress))
    except ray.exceptions.RayTaskError as err:
        raise _unwrap(err) from None
    except ray.exceptions.ActorDiedError as err:
        hint = "; the node ran low on memory" if "memory" in str(err).lower() else ""
        raise AsftError(f"the pruning worker died ({str(err).strip().splitlines()[0]}{hint})") from None
    finally:
        ray.kill(worker)  # on an interrupt too: it cannot clean up after itself then
        if owned:  # also flushes the worker's last log lines before our caller prints anything
            ray.shutdown()
        from asft_ray.artifacts import remove_stale_temp_dirs

        remove_stale_temp_dirs(cfg.out)  # the killed worker's unfinished output folder
