"""Ray at the edge: the driver starts (or joins) a Ray cluster and runs the recipe in an actor.

The actor owns the model while it is pruned; the driver holds only the config and the result.
"""

from __future__ import annotations

import os

import ray

from asft_ray.config import PruneConfig
from asft_ray.errors import AsftError


def init_ray(address: str | None = None) -> bool:
    """Join `address` (or $RAY_ADDRESS); otherwise start an embedded local cluster, dashboard off.

    Returns True when this call connected (so the caller should shut it down again)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level="ERROR")
    except ConnectionError as err:
        raise AsftError(f"could not reach the Ray cluster at {address or os.environ.get('RAY_ADDRESS')}: {err}") from err
    return True


@ray.remote
class PruneWorker:
    """Runs one pruning recipe with `threads` torch threads."""

    def __init__(self, threads: int):
        import torch

        torch.set_num_threads(threads)

    def run(self, cfg: dict, show_progress: bool) -> dict:
        from asft_ray.prune import run_prune

        return run_prune(PruneConfig(**cfg), show_progress)


def _unwrap(err: Exception) -> Exception:
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, AsftError) else err


def prune_on_ray(
    cfg: PruneConfig, address: str | None = None, num_cpus: int | None = None, show_progress: bool = True
) -> dict:
    owned = init_ray(address)
    cpus = num_cpus or max(1, int(ray.available_resources().get("CPU", 1)))
    worker = PruneWorker.options(num_cpus=cpus).remote(cpus)
    try:
        return ray.get(worker.run.remote(cfg.to_dict(), show_progress))
    except ray.exceptions.RayTaskError as err:
        raise _unwrap(err) from None
    except ray.exceptions.ActorDiedError as err:
        raise AsftError(f"the pruning worker died ({str(err).strip().splitlines()[0]})") from None
    finally:
        ray.kill(worker)
        if owned:  # also flushes the worker's last log lines before our caller prints anything
            ray.shutdown()
