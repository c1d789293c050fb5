"""Sharded calibration scoring on Ray actors.

The calibration samples are cut into fixed chunks (CHUNK_SIZE samples each, independent of
the number of workers). Chunk k goes to worker k mod N. For each decoder layer:

  1. the coordinator puts the layer in the object store once;
  2. each worker computes the input statistics of its chunks (one partial per chunk, float64;
     Hessians in stats.hessian_dtype: float32 for a 16-bit layer);
  3. the partials are added in chunk order (so the sums, and hence the masks, do not depend
     on N). Wanda's squared norms are small and are added by the coordinator. SparseGPT's
     Hessians (one per distinct linear input, up to 8·i² bytes each) never reach the
     coordinator: each input's Hessian has an *owner* actor that adds the chunk partials in
     chunk order as they arrive (a chain of pure `add` calls), with at most `max_pending`
     chunks whose partials are not yet added, then solves the linears that read that input
     (weight-parallel: the owners' solves run at the same time, each next to its Hessian).
     When an input's chunk inputs are smaller than its Hessian (wide inputs, short chunks: a
     5632-wide MLP input over 1024 tokens is 23 MB against a 254 MB Hessian), the workers send
     the inputs instead and the owner computes the partials itself (`add_inputs`, same bits);
     the last chunks are summed in the solve call, so that Hessian never enters the object
     store and the solve factors it in place;
  4. the coordinator applies the pruned weights, puts the pruned layer, and each worker pushes
     its chunks through it; the outputs stay in the object store as the next layer's inputs.

Every call is pure (its result depends only on its arguments): a worker killed mid-layer is
restarted by Ray (max_restarts) and the interrupted call retried (max_task_retries) on the
same object-store inputs, giving the same result. Everything a worker receives is moved to
its device (a GPU when it reserved one) and everything it returns is on the CPU.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator

import ray
import torch

from asft_ray.config import Pattern
from asft_ray.distributed.placement import require_placeable, resource_ask
from asft_ray.errors import AsftError
from asft_ray.memory import release_store_pages, return_free_memory
from asft_ray.methods import resolve
from asft_ray.models import prunable_linears
from asft_ray.pruning.engine import (
    CHUNK_SIZE,
    LinearJob,
    add_gradient_sums,
    chunk_forward,
    chunk_stats,
    chunk_stats_and_inputs,
    computing_view,
    gradient_sums,
    prune_jobs,
    prune_weight,
    split_chunks,
    untie_lm_head,
)
from asft_ray.pruning.stats import (
    InputStats,
    add_hessian_of,
    hessian_dtype,
    hessian_of,
    inputs_are_smaller,
    sum_in_order,
)


@dataclass(frozen=True)
class WorkerResources:
    """What each scoring actor asks Ray for."""

    cpus: float = 1
    gpus: float = 0
    memory_bytes: int | None = None

    def ask(self) -> dict:
        return resource_ask(self.cpus, self.gpus, self.memory_bytes)

    def options(self) -> dict:
        opts = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory_bytes:
            opts["memory"] = self.memory_bytes
        return opts


class SharedLayer:
    """A layer as it goes into the object store: its structure on the `meta` device plus its
    tensors as numpy arrays (a bf16 one as the int16 of its bits). Ray writes numpy buffers straight
    into shared memory and workers map them without a copy, so neither side holds a second private
    copy of the layer."""

    def __init__(self, layer: torch.nn.Module):
        tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
        # deepcopy with every tensor pre-mapped to an empty meta twin: structure only, no data copied
        memo = {id(t): (torch.nn.Parameter(torch.empty_like(t, device="meta"), t.requires_grad)
                        if isinstance(t, torch.nn.Parameter) else torch.empty_like(t, device="meta"))
                for t in tensors.values()}
        self.skeleton = copy.deepcopy(layer, memo)
        self.arrays = {name: _as_array(t.detach()) for name, t in layer.state_dict().items()}

    def materialize(self) -> torch.nn.Module:
        state = {k: _tensor(a) for k, a in self.arrays.items()}  # object-store buffers; the layer is only read
        self.skeleton.load_state_dict(state, assign=True)
        return self.skeleton


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class _Bits:
    """A tensor of a dtype numpy lacks (bfloat16, float8), shipped as the integers of its bits:
    still a numpy buffer, so still written into the store and mapped back without a copy."""

    dtype: torch.dtype
    array: object  # numpy.ndarray


def _as_array(t: torch.Tensor):
    t = t.cpu()
    try:
        return t.numpy()
    except TypeError:
        return _Bits(t.dtype, t.view(_INT_OF_SIZE[t.element_size()]).numpy())


def _tensor(value) -> torch.Tensor:
    """A tensor over an object-store buffer (read-only numpy: no copy; callers never write to it)."""
    if isinstance(value, torch.Tensor):
        return value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if isinstance(value, _Bits):
            return torch.from_numpy(value.array).view(value.dtype)
        return torch.from_numpy(value)


def _materialize(layer):
    return layer.materialize() if isinstance(layer, SharedLayer) else layer


def to_device(value, device):
    """`value` with every tensor inside it (tuples, lists, dicts: rotary tables, masks) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def stats_to_cpu(stats: InputStats) -> InputStats:
    def cpu(table):
        return {k: v.cpu() for k, v in table.items()}

    return InputStats(dict(stats.source), cpu(stats.sq_norms), cpu(stats.hessians), cpu(stats.sums), cpu(stats.tokens))


# What the first layer a worker unpickles makes it import (transformers' model and mask utilities,
# which import torch._dynamo and sympy): 2.2 s of one core here. Each worker imports them as soon as
# it is placed, while the driver builds the skeleton and reads the first layer, instead of inside
# the first layer's call, where the whole pass waits for it.
WARM_IMPORTS = ("transformers.modeling_utils", "transformers.masking_utils")


@ray.remote(max_restarts=3, max_task_retries=3)
class ScoringWorker:
    """Computes statistics, layer outputs and per-linear solves for what it is given (pure calls).
    Each call first drops the object-store pages that earlier calls left mapped in this process
    (memory.release_store_pages: its resident set then counts only the objects of the call at hand)."""

    def __init__(self, threads: int):
        torch.set_num_threads(max(1, threads))
        # Ray 2.60 leaves every GPU visible to an actor that reserved none: use one only if reserved
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")

    def ready(self) -> int:
        return os.getpid()

    def warm_up(self) -> None:
        """Import what unpickling a transformers decoder layer imports first (WARM_IMPORTS)."""
        import importlib

        for module in WARM_IMPORTS:
            try:
                importlib.import_module(module)
            except ImportError:
                pass

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def device_name(self) -> str:
        return str(self.device)

    def _on_device(self, layer, chunk, context, trainable: bool = False):
        """The layer, the chunk and the captured args on this worker's device. The layer computes in
        float32, as in-process: 16-bit layers travel as 16-bit and are upcast a linear at a time
        (engine.computing_view), or, `trainable`, whole into float32 weights of their own."""
        release_store_pages()
        args, kwargs = to_device(context, self.device)
        layer = _materialize(layer)
        layer = layer.to(device=self.device, dtype=torch.float32) if trainable else computing_view(layer.to(self.device))
        return layer, [x.to(self.device) for x in chunk], args, kwargs

    def stats(self, layer, chunk, context, hessian: bool, only: list[str] | None = None) -> InputStats:
        return stats_to_cpu(chunk_stats(*self._on_device(layer, chunk, context), hessian, only))

    def stats_split(self, layer, chunk, context, sources: list[str], only: list[str] | None = None,
                    inputs_of: list[str] = ()):
        """Statistics with Hessians, as 1 + len(sources) separate results: the squared norms and
        source map (small), then each input's Hessian (numpy, so Ray stores it without a copy),
        or, for the sources in `inputs_of`, the inputs themselves (float32 numpy, one per sample) for
        the owner to sum (`add_inputs`): fewer bytes when the input is wide and the chunk short."""
        stats, inputs = chunk_stats_and_inputs(*self._on_device(layer, chunk, context), only, inputs_of)
        if list(stats.sq_norms) != list(sources):
            raise AsftError(f"layer inputs {list(stats.sq_norms)} differ from the expected {list(sources)}")
        small = stats_to_cpu(InputStats(stats.source, stats.sq_norms, {}, stats.sums, stats.tokens))
        return_free_memory()
        return (small, *([x.cpu().numpy() for x in inputs[s]] if s in inputs else stats.hessians[s].cpu().numpy()
                         for s in sources))

    def add(self, total, part):
        """One step of an in-order sum: the total so far plus the next chunk's partial."""
        release_store_pages()
        total = total + part
        return_free_memory()
        return total

    def _summed(self, total, chunks, dtype: torch.dtype) -> torch.Tensor:
        """The total so far (read-only in the object store: one private copy) plus each chunk's
        partial, computed here from the chunk's inputs (stats.hessian_of in `dtype`: the very sum
        the worker that ran the chunk would have returned) and added a block of rows at a time
        (stats.add_hessian_of, the same bits), so only the total exists whole."""
        if total is not None:
            total = _tensor(total).to(self.device, copy=True)  # one private copy, on this worker's device
        for samples in chunks:
            xs = [_tensor(x).to(self.device) for x in samples]
            total = hessian_of(xs, dtype) if total is None else add_hessian_of(total, xs)
            del xs
        return total

    def add_inputs(self, dtype: torch.dtype, total, *chunks):
        """Steps of an in-order sum (in `dtype`) whose partials are computed here from the chunks' inputs."""
        release_store_pages()
        total = self._summed(total, chunks, dtype).cpu().numpy()
        return_free_memory()
        return total

    def solve(self, method: str, pattern: Pattern, jobs: list, layer, dtype: torch.dtype, hessian, *chunks):
        """The linears that read one input, pruned on this worker's device (SparseGPT: with the
        weight update), one result per job. `jobs`: (weight, sparsity, others) per linear, `others`
        the statistics besides the Hessian that the method needs; a weight given by its linear's
        name is read from `layer` (the SharedLayer already in the object store: no second copy).

        `hessian` is the input's summed Hessian (read-only in the object store); or, with `chunks`,
        the sum so far that those chunks' inputs complete: then this call does the sum's last step
        (as `add_inputs`, in `dtype`), so the finished Hessian never enters the object store, and the
        last solve factors it in place instead of copying it (prune_weight's `consume_hessian`)."""
        release_store_pages()
        owned = bool(chunks)
        hessian = self._summed(hessian, chunks, dtype) if owned else _tensor(hessian).to(self.device)
        pruned = []
        for k, (weight, sparsity, others) in enumerate(jobs):
            if isinstance(weight, str):
                weight = layer.arrays[f"{weight}.weight"]
            stats = {key: v.to(self.device) for key, v in (others or {}).items()}
            pruned.append(prune_weight(method, _tensor(weight).to(self.device), pattern, sparsity, hessian=hessian,
                                       consume_hessian=owned and k == len(jobs) - 1, **stats).cpu())
            del stats
        del hessian
        return_free_memory()
        return pruned if len(pruned) > 1 else pruned[0]  # num_returns=len(jobs)

    def reconstruct(self, layer, chunks: list, targets: list, chunk_size: int, n_samples: int, context,
                    reconstruction, index: int) -> tuple[dict, dict]:
        """Block reconstruction of one layer, all of it here (pruning.reconstruct): each step fetches
        its sample and target from the object store (`chunks`, `targets`: the runners' chunk refs).
        Returns the fitted weights of the layer's linears (float32, on the CPU, as numpy arrays: Ray
        writes those into the store and the coordinator reads them from there, copying one linear at
        a time, instead of deserialising them all into private copies) and the report row."""
        source = _materialize(layer)
        in_store = {t.data_ptr() for t in source.parameters()}
        layer, _, args, kwargs = self._on_device(source, [], context, trainable=True)
        for lin in prunable_linears(layer).values():  # the fit moves these in place: never the store's buffers
            if lin.weight.data_ptr() in in_store:  # a float32 layer on the CPU: still the object store's memory
                lin.weight.data = lin.weight.data.clone()

        def fetch(refs: list):
            return lambda k: ray.get(refs[k // chunk_size])[k % chunk_size].to(self.device)

        row = reconstruction.fit(layer, fetch(chunks), fetch(targets), n_samples, args, kwargs, index)
        weights = {name: _as_array(lin.weight.detach()) for name, lin in prunable_linears(layer).items()}
        return_free_memory()
        return weights, row

    def score_rows(self, final, chunk, score, targets) -> list:
        """engine.Runner.score_rows for one chunk: `score` of each sample's activations and target."""
        release_store_pages()
        final = computing_view(_materialize(final).to(self.device))
        return [to_device(score(final, x.to(self.device), to_device(target, self.device)), "cpu")
                for x, target in zip(chunk, targets, strict=True)]

    def gradients(self, model, ids: torch.Tensor, lm_head: bool) -> dict:
        release_store_pages()
        sums = gradient_sums(model.to(self.device), ids.to(self.device), show_progress=False, lm_head=lm_head)
        return {key: (g.cpu(), g2.cpu()) for key, (g, g2) in sums.items()}

    # Not retried, unlike the actor's other calls. Ray keeps a retriable task's arguments for as long
    # as its outputs live, to rebuild them if lost; each layer's outputs feed the next layer's forward,
    # so that chain would keep every layer ever sent in the object store (spilled to disk: the whole
    # model written out once per pass). A worker that dies in a forward fails the run, which resumes
    # from its last finished layer; the statistics, sums and solves of a layer are retried.
    @ray.method(max_task_retries=0)
    def forward(self, layer, chunk, context) -> list[torch.Tensor]:
        outs = chunk_forward(*self._on_device(layer, chunk, context))
        return [x.cpu() for x in outs]


def start_workers(n: int, resources: WorkerResources, timeout_s: float | None = None) -> list:
    """Start n scoring actors and wait until all are placed. A request the cluster's nodes can
    never hold fails at once, naming the resource; one they hold but not free now fails after
    `timeout_s`, else $ASFT_PLACEMENT_TIMEOUT_S, else 60 s."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("ASFT_PLACEMENT_TIMEOUT_S", 60))
    if n < 1:
        raise AsftError(f"workers must be at least 1, got {n}")
    require_placeable(f"{n} scoring workers", resources.ask(), n)
    workers = [
        ScoringWorker.options(**resources.options()).remote(max(1, int(resources.cpus))) for _ in range(n)
    ]
    pending = [w.ready.remote() for w in workers]
    ready, not_ready = ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
    if not_ready:
        for w in workers:
            ray.kill(w)
        raise AsftError(f"only {len(ready)} of {n} scoring workers could be placed within {timeout_s:g}s: "
                        "the cluster has the resources, but not free now")
    for w in workers:  # not waited for: runs while the caller reads the model; calls after it queue behind it
        w.warm_up.remote()
    return workers


@dataclass(frozen=True)
class RemoteHessian:
    """An input's Hessian on the actor that reduces it (and solves with it): `ref`, the sum so far
    in the object store (None: nothing summed yet), and `chunks`, the chunks' inputs that the
    solve call adds to it first (empty: `ref` is the whole sum), in `dtype`."""

    ref: ray.ObjectRef | None
    owner: object
    dtype: torch.dtype
    chunks: tuple = ()


def assign_owners(costs: dict[str, float], n_workers: int) -> dict[str, int]:
    """Each input (source) to a worker, largest cost first to the least-loaded worker (ties: lowest index)."""
    load = [0.0] * n_workers
    owners = {}
    for source in sorted(costs, key=lambda s: (-costs[s], list(costs).index(s))):
        k = min(range(n_workers), key=lambda i: (load[i], i))
        owners[source] = k
        load[k] += costs[source]
    return owners


def solve_cost(layer, stats: InputStats, source: str) -> float:
    """SparseGPT's floating-point operations for the linears that read `source`, each solved on its
    own: the inverse-Hessian factor (two Cholesky factorisations and an inverse: about 4/3 cols^3,
    counted at half for a float32 Hessian, which factors about twice as fast as a float64 one: 0.29
    against 0.66 s at width 2048 and 4.2 against 9.4 s at 5632 on one thread, BENCHMARKS.md) and
    the column-by-column update (about 2 rows cols^2, in float32 either way). The factor dominates
    a wide input (down_proj), so leaving it out would give that input's owner more than its share."""
    linears = prunable_linears(_materialize(layer))
    speed = hessian_dtype(linears[source].weight.dtype).itemsize / 8
    return float(sum(4 / 3 * speed * linears[n].in_features ** 3
                     + 2 * linears[n].out_features * linears[n].in_features ** 2
                     for n, s in stats.source.items() if s == source))


def plan_reduction(layer, probe: InputStats, chunk_tokens: int, total_tokens: int, max_pending: int,
                   ship_inputs: bool | None = None) -> tuple[dict[str, float], list[str], int, dict[str, torch.dtype]]:
    """How a layer's Hessians are reduced: each input's work on its owner (flops), the inputs whose
    owners get the chunks' inputs rather than Hessian partials, how many chunks' inputs an owner
    sums in one call, and the dtype each input's Hessian is summed in (stats.hessian_dtype).

    Shipping an input pays when its inputs take fewer bytes than its Hessian (short chunks, wide
    inputs) and the owner's extra work, the grams of every chunk, is no more than the solve it does
    anyway (with many calibration tokens the grams dominate: they stay spread over the workers).
    `ship_inputs` True/False forces it. An owner sums as many chunks per call as fit in the bytes
    of one Hessian (so the store holds no more than the partials would), at most max_pending."""
    widths = {s: probe.sq_norms[s].numel() for s in probe.sq_norms}
    linears = prunable_linears(_materialize(layer))
    dtypes = {s: hessian_dtype(linears[s].weight.dtype) for s in widths}  # a source is named after its first linear
    work, ship = {}, []
    for s, w in widths.items():
        solve, grams = solve_cost(layer, probe, s), 2.0 * total_tokens * w * w
        pays = inputs_are_smaller(chunk_tokens, w, dtypes[s]) and grams <= solve
        if pays if ship_inputs is None else ship_inputs:
            ship.append(s)
        work[s] = solve + grams * (s in ship)
    # float32 inputs of chunk_tokens x width against a width x width Hessian of dtypes[s]
    per_call = min([max_pending] + [max(1, dtypes[s].itemsize * widths[s] // (4 * chunk_tokens)) for s in ship])
    return work, ship, per_call, dtypes


class ShardedRunner:
    """The engine's Runner on Ray actors; the chunks live in Ray's object store.

    `max_pending`: at most this many chunks whose Hessian partials are not yet added into the
    owners' totals (default: one per worker). `ship_inputs`: whether workers send an input's
    Hessian partials (False) or the inputs themselves (True) to its owner; default (None): per
    input, when that pays (`plan_reduction`). The sums are the same bits either way."""

    def __init__(self, workers: list, inputs: list[torch.Tensor], args: tuple, kwargs: dict,
                 chunk_size: int = CHUNK_SIZE, max_pending: int | None = None, ship_inputs: bool | None = None):
        self.workers, self.chunk_size = workers, chunk_size
        chunks = split_chunks(inputs, chunk_size)
        self.n_samples = len(inputs)
        tokens = [sum(x.numel() // x.shape[-1] for x in chunk) for chunk in chunks]
        self.chunk_tokens, self.total_tokens = max(tokens), sum(tokens)
        self.chunks = [_put([x.cpu() for x in chunk]) for chunk in chunks]
        self.context = _put((to_device(args, "cpu"), to_device(kwargs, "cpu")))
        self.max_pending = max_pending or len(workers)
        self.ship_inputs = ship_inputs
        self.peak_pending = 0  # the most chunks seen with partials not yet added (checked by the tests)
        self.peak_layers_ahead = 0  # layers submitted to the workers and not yet computed, at most (tests)
        self.shipped: set[str] = set()  # inputs whose owner summed their Hessian from the inputs (tests)
        self._submitted: list[list] = []
        self._sources: dict[tuple | None, list[str]] = {}
        self._collected = None  # (the layer in the store, {linear: (data_ptr, shape)}) of the last collect
        self.weights_sent = 0  # weights that were not the collected layer's, so were copied to the store (tests)

    def _worker(self, k: int):
        return self.workers[k % len(self.workers)]

    def collect(self, layer, hessian: bool, only: list[str] | None = None) -> InputStats:
        layer_ref = _put(SharedLayer(layer))
        if not hessian:  # small partials: fetched one at a time, in chunk order
            parts = [self._worker(k).stats.remote(layer_ref, c, self.context, False, only) for k, c in enumerate(self.chunks)]
            return sum_in_order(ray.get(part) for part in parts)
        from asft_ray.models import prunable_linears

        # the solves read the weights from this very copy, if the jobs are this layer's weights
        self._collected = (layer_ref, {name: (linear.weight.data_ptr(), tuple(linear.weight.shape))
                                       for name, linear in prunable_linears(layer).items()})
        return self._collect_hessians(layer, layer_ref, only)

    def _input_sources(self, layer_ref, only) -> InputStats:
        """Which linears share an input (the same for every layer): one small pass over chunk 0, once per `only`."""
        key = tuple(only) if only is not None else None
        if key not in self._sources:
            self._sources[key] = ray.get(self.workers[0].stats.remote(layer_ref, self.chunks[0], self.context, False, only))
        return self._sources[key]

    def _collect_hessians(self, layer, layer_ref, only) -> InputStats:
        probe = self._input_sources(layer_ref, only)
        sources = list(probe.sq_norms)
        work, ship, per_call, dtypes = plan_reduction(layer, probe, self.chunk_tokens, self.total_tokens,
                                                      self.max_pending, self.ship_inputs)
        self.shipped.update(ship)
        owners = assign_owners(work, len(self.workers))
        totals = {s: None for s in sources}
        waiting = {s: [] for s in ship}  # shipped inputs of chunks not yet handed to their owner
        small_parts = []
        pending, unsubmitted = [], []  # per chunk: the sums that include it (filled in when they are submitted)
        for k, chunk in enumerate(self.chunks):
            while len(pending) >= self.max_pending:  # wait for the oldest chunk's partials to be added
                oldest = pending.pop(0)  # submitted: per_call <= max_pending
                ray.wait(oldest, num_returns=len(oldest))
            refs = self._worker(k).stats_split.options(num_returns=1 + len(sources)).remote(
                layer_ref, chunk, self.context, sources, only, ship)
            small_parts.append(refs[0])
            for source, part in zip(sources, refs[1:]):
                if source in waiting:
                    waiting[source].append(part)
                else:  # the first chunk's partial is the total so far
                    totals[source] = part if k == 0 else self.workers[owners[source]].add.remote(totals[source], part)
            entry = [totals[s] for s in sources if s not in waiting]
            pending.append(entry)
            unsubmitted.append(entry)
            # The last chunks' inputs are summed by the solve call itself (`solve`), so a shipped
            # input's finished Hessian never enters the object store.
            if not ship or len(unsubmitted) == per_call and k < len(self.chunks) - 1:
                for s in ship:
                    totals[s] = self.workers[owners[s]].add_inputs.remote(dtypes[s], totals[s], *waiting[s])
                    waiting[s] = []
                for e in unsubmitted:
                    e.extend(totals[s] for s in ship)
                unsubmitted = []
            unreduced = sum(any(e is u for u in unsubmitted) or
                            len(ray.wait(e, num_returns=len(e), timeout=0)[0]) < len(e) for e in pending)
            self.peak_pending = max(self.peak_pending, unreduced)
            del refs, part
        small = sum_in_order(ray.get(part) for part in small_parts)
        hessians = {s: RemoteHessian(totals[s], self.workers[owners[s]], dtypes[s], tuple(waiting.get(s, ())))
                    for s in sources}
        return InputStats(small.source, small.sq_norms, hessians)

    def prune(self, method: str, pattern: Pattern, jobs: Iterable[LinearJob], stats: InputStats) -> Iterator[tuple[str, torch.Tensor]]:
        """Methods that need the Hessian (SparseGPT): the linears that read one input are solved in
        one call on that input's owner (in parallel across owners); the others: here (a sort per
        row, cheap next to moving the weight). Every solve is submitted before the first result is
        fetched (the collected layer's weights are read from its copy in the object store; other
        weights are copied there), and results come back one at a time, so this process holds at
        most one pruned weight beside the layer."""
        recipe = resolve(method)
        if not recipe.hessian:
            yield from prune_jobs(method, pattern, jobs, stats)
            return
        by_input: dict[str, list[LinearJob]] = {}
        names = []  # the order the jobs came in, which results are yielded in
        for job in jobs:
            by_input.setdefault(stats.source[job.name], []).append(job)
            names.append(job.name)
        job = None  # no dense weight is kept here once its solve is submitted
        layer_ref, collected = self._collected or (None, {})
        self._collected = None  # the solves keep the layer in the store while they need it
        refs = {}
        while by_input:  # submitted, then dropped: no dense weight is kept here
            group = by_input.pop(next(iter(by_input)))
            in_layer = [collected.get(job.name) == (job.weight.data_ptr(), tuple(job.weight.shape)) for job in group]
            self.weights_sent += in_layer.count(False)
            submitted = _submit_solves(method, pattern, group, in_layer, layer_ref, stats)
            refs.update(zip([job.name for job in group], submitted if len(group) > 1 else [submitted]))
            del group
        for name in names:
            yield name, ray.get(refs.pop(name))

    def advance(self, layer) -> None:
        """Push the activations through `layer` on the workers. Returns once the *previous* layer's
        outputs are computed: the caller reads the next layer from disk while this one runs, but
        never gets further ahead, so the object store holds at most two layers (not the whole model)."""
        layer_ref = _put(SharedLayer(layer))
        inputs = self.chunks
        self.chunks = [self._worker(k).forward.remote(layer_ref, c, self.context) for k, c in enumerate(inputs)]
        self._submitted = [refs for refs in self._submitted + [self.chunks] if not _all_ready(refs)]
        self.peak_layers_ahead = max(self.peak_layers_ahead, len(self._submitted))
        ray.wait(inputs, num_returns=len(inputs), fetch_local=False)

    def reconstruct(self, layer, targets: "ShardedRunner", reconstruction, index: int) -> dict:
        """The whole fit of layer `index` on one worker (round robin over the layers), which holds
        the layer's Adam state; this process only swaps the fitted weights in, one linear at a
        time from the returned object in the store, so its private memory never holds the layer
        twice (a returned torch tensor would be deserialised whole into private copies first)."""
        weights, row = ray.get(self._worker(index).reconstruct.remote(
            _put(SharedLayer(layer)), self.chunks, targets.chunks, self.chunk_size, self.n_samples, self.context,
            reconstruction, index))
        for name, lin in prunable_linears(layer).items():
            lin.weight.data = _tensor(weights.pop(name)).to(lin.weight.dtype, copy=True)  # a private copy: writable
        return row

    def outputs(self) -> list[torch.Tensor]:
        return [x for chunk in ray.get(self.chunks) for x in chunk]

    def score_rows(self, final, score, targets: list) -> list:
        # The last layer's forwards first: that layer then leaves the store before the final head
        # (as large as several layers) goes in, instead of both at once spilling to disk.
        ray.wait(self.chunks, num_returns=len(self.chunks), fetch_local=False)
        final_ref = _put(SharedLayer(final))
        per_chunk = split_chunks(targets, self.chunk_size)
        parts = [self._worker(k).score_rows.remote(final_ref, c, score, t)
                 for k, (c, t) in enumerate(zip(self.chunks, per_chunk, strict=True))]
        return [result for part in parts for result in ray.get(part)]


def _put(value) -> ray.ObjectRef:
    """ray.put, then this process's mappings of the store pages it just wrote are dropped: the
    object is the store's now (memory.release_store_pages)."""
    ref = ray.put(value)
    release_store_pages()
    return ref


def _submit_solves(method: str, pattern: Pattern, group: list[LinearJob], in_layer: list[bool], layer_ref,
                   stats: InputStats):
    """The solves of the linears that read one input, in one call on the actor that owns its Hessian.
    A weight that is the collected layer's (`in_layer`) goes by name: the actor reads it from the
    layer already in the object store; any other is copied there."""
    hessian = stats.hessian(group[0].name)
    needs = sorted(resolve(method).needs - {"hessian"})
    jobs = [(job.name if same else _as_array(job.weight), job.sparsity,
             {s: stats.get(s, job.name) for s in needs} or None) for job, same in zip(group, in_layer, strict=True)]
    layer = layer_ref if any(in_layer) else None
    return hessian.owner.solve.options(num_returns=len(group)).remote(method, pattern, jobs, layer, hessian.dtype,
                                                                      hessian.ref, *hessian.chunks)


def _all_ready(refs: list) -> bool:
    return not ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[1]


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
