"""Sharded calibration scoring on Ray actors.

The calibration samples are cut into fixed chunks (CHUNK_SIZE samples each, independent of
the number of workers). Chunk k goes to worker k mod N. For each decoder layer:

  1. the driver puts the layer in the object store once;
  2. each worker computes the input statistics of its chunks (one partial per chunk, float64);
  3. the driver adds the partials in chunk order (so the sums, and hence the masks, do not
     depend on N), prunes the layer and puts the pruned layer;
  4. each worker pushes its chunks through the pruned layer; the outputs stay in the object
     store as the next layer's inputs, never in the driver's heap.

Workers hold no state beyond their torch thread count: a worker killed mid-layer is
restarted by Ray (max_restarts) and the interrupted call retried (max_task_retries) on the
same object-store inputs, giving the same result.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass

import ray
import torch

from asft_ray.errors import AsftError
from asft_ray.pruning.engine import (
    CHUNK_SIZE,
    add_gradient_sums,
    chunk_forward,
    chunk_stats,
    gradient_sums,
    split_chunks,
    untie_lm_head,
)
from asft_ray.pruning.stats import InputStats, sum_in_order


@dataclass(frozen=True)
class WorkerResources:
    """What each scoring actor asks Ray for."""

    cpus: float = 1
    gpus: float = 0
    memory_bytes: int | None = None

    def options(self) -> dict:
        opts = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory_bytes:
            opts["memory"] = self.memory_bytes
        return opts


class SharedLayer:
    """A layer as it goes into the object store: its structure on the `meta` device plus its
    tensors as numpy arrays. Ray writes numpy buffers straight into shared memory and workers
    map them without a copy, so neither side holds a second private copy of the layer."""

    def __init__(self, layer: torch.nn.Module):
        tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
        # deepcopy with every tensor pre-mapped to an empty meta twin: structure only, no data copied
        memo = {id(t): (torch.nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad)
                        if isinstance(t, torch.nn.Parameter) else torch.empty_like(t, device="meta"))
                for t in tensors.values()}
        self.skeleton = copy.deepcopy(layer, memo)
        self.arrays = {name: _as_array(t.detach()) for name, t in layer.state_dict().items()}

    def materialize(self) -> torch.nn.Module:
        with warnings.catch_warnings():  # object-store buffers are read-only; the layer is only read
            warnings.simplefilter("ignore", UserWarning)
            state = {k: torch.from_numpy(a) if not isinstance(a, torch.Tensor) else a for k, a in self.arrays.items()}
        self.skeleton.load_state_dict(state, assign=True)
        return self.skeleton


def _as_array(t: torch.Tensor):
    try:
        return t.cpu().numpy()
    except TypeError:  # bfloat16 and other dtypes numpy lacks travel as tensors (copied)
        return t.cpu()


def _unwrap(layer):
    return layer.materialize() if isinstance(layer, SharedLayer) else layer


@ray.remote(max_restarts=3, max_task_retries=3)
class ScoringWorker:
    """Computes statistics and layer outputs for the chunks it is given (pure calls)."""

    def __init__(self, threads: int):
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")

    def ready(self) -> int:
        return os.getpid()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def stats(self, layer, chunk, context, hessian: bool, only: list[str] | None = None) -> InputStats:
        args, kwargs = context
        return chunk_stats(_unwrap(layer).to(self.device), [x.to(self.device) for x in chunk], args, kwargs, hessian, only)

    def gradients(self, model, ids: torch.Tensor, lm_head: bool) -> dict:
        sums = gradient_sums(model.to(self.device), ids.to(self.device), show_progress=False, lm_head=lm_head)
        return {key: (g.cpu(), g2.cpu()) for key, (g, g2) in sums.items()}

    def forward(self, layer, chunk, context) -> list[torch.Tensor]:
        args, kwargs = context
        outs = chunk_forward(_unwrap(layer).to(self.device), [x.to(self.device) for x in chunk], args, kwargs)
        return [x.cpu() for x in outs]


def start_workers(n: int, resources: WorkerResources, timeout_s: float | None = None) -> list:
    """Start n scoring actors and wait until all are placed, or fail naming what is missing.

    The wait is `timeout_s`, else $ASFT_PLACEMENT_TIMEOUT_S, else 60 s."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("ASFT_PLACEMENT_TIMEOUT_S", 60))
    if n < 1:
        raise AsftError(f"workers must be at least 1, got {n}")
    workers = [
        ScoringWorker.options(**resources.options()).remote(max(1, int(resources.cpus))) for _ in range(n)
    ]
    pending = [w.ready.remote() for w in workers]
    ready, not_ready = ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
    if not_ready:
        for w in workers:
            ray.kill(w)
        total = ray.cluster_resources()
        asked = {"CPU": resources.cpus, "GPU": resources.gpus}
        missing = ", ".join(
            f"{n * v:g} {key} (cluster has {total.get(key, 0):g})"
            for key, v in asked.items()
            if v and n * v > total.get(key, 0)
        )
        raise AsftError(
            f"only {len(ready)} of {n} scoring workers could be placed within {timeout_s:g}s"
            + (f": the cluster lacks resources, asked {missing}" if missing else ": the cluster lacks free resources")
        )
    return workers


class ShardedRunner:
    """Same interface as engine.LocalRunner; the chunks live in Ray's object store."""

    def __init__(self, workers: list, inputs: list[torch.Tensor], args: tuple, kwargs: dict, chunk_size: int = CHUNK_SIZE):
        self.workers = workers
        self.chunks = [ray.put([x.cpu() for x in chunk]) for chunk in split_chunks(inputs, chunk_size)]
        self.context = ray.put((args, kwargs))

    def _worker(self, k: int):
        return self.workers[k % len(self.workers)]

    def collect(self, layer, hessian: bool, only: list[str] | None = None) -> InputStats:
        layer_ref = ray.put(SharedLayer(layer))
        parts = [self._worker(k).stats.remote(layer_ref, c, self.context, hessian, only) for k, c in enumerate(self.chunks)]
        return sum_in_order(ray.get(parts))

    def advance(self, layer) -> None:
        layer_ref = ray.put(SharedLayer(layer))
        self.chunks = [self._worker(k).forward.remote(layer_ref, c, self.context) for k, c in enumerate(self.chunks)]

    def outputs(self) -> list[torch.Tensor]:
        return [x for chunk in ray.get(self.chunks) for x in chunk]


def sharded_runner_factory(workers: list, chunk_size: int = CHUNK_SIZE):
    """A `make_runner` for engine.prune_model that uses these workers."""

    def make(inputs, args, kwargs):
        return ShardedRunner(workers, inputs, args, kwargs, chunk_size)

    return make


def sharded_gradient_sums(workers: list, chunk_size: int = CHUNK_SIZE):
    """A `sum_gradients` for engine.prune_model: each worker holds a copy of the model and
    returns the float64 gradient sums of its chunks; the driver adds them in chunk order."""

    def compute(model, calib_ids: torch.Tensor, show_progress: bool = True, lm_head: bool = False) -> dict:
        if lm_head:
            untie_lm_head(model)  # before the copy is shipped, so the workers see the same parameters
        model_ref = ray.put(model)
        parts = [
            workers[k % len(workers)].gradients.remote(model_ref, chunk, lm_head)
            for k, chunk in enumerate(calib_ids.split(chunk_size))
        ]
        total = None
        for part in parts:  # fetched one at a time, in chunk order
            total = add_gradient_sums(total, ray.get(part))
        return total

    return compute
