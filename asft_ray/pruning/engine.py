"""The pruning loop, separate from the methods (as in the SparseGPT/Wanda reference code).

Which path runs a method follows from what its declaration (asft_ray.methods) needs:

* no data (`magnitude`): every linear is pruned on its own.
* input statistics (`wanda`, `sparsegpt`, `ria`, and any method followed by a refinement such
  as `+dsnot`, `+lsq`, `+obs`): layer by layer. Capture the inputs of decoder layer 0; for each layer, run
  the calibration inputs through it to collect input statistics, prune its linears, then run the
  inputs through the *pruned* layer to get the next layer's inputs. With `true_sequential`
  (SparseGPT's `--true-sequential`), the linears of a layer are pruned group by group (q/k/v,
  then o, then gate/up, then down in a Llama layer), each group scored on inputs that already
  went through the pruned groups before it.
* gradients (`taylor`, `fisher`): gradients of the causal-LM loss of the dense model over the
  calibration set (one forward+backward per sample), then every linear is pruned.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn

from asft_ray.config import Pattern
from asft_ray.errors import AsftError
from asft_ray.eval.sparsity import linear_sparsity
from asft_ray.memory import return_free_memory
from asft_ray.methods import resolve
from asft_ray.models import decoder_layers, prunable_linears
from asft_ray.progress import progress
from asft_ray.pruning.hooks import EngineHooks
from asft_ray.pruning.masks import make_mask
from asft_ray.pruning.stats import InputStats, LayerInputStats, StopLayer, input_groups, sum_in_order


def prune_weight(method: str, weight: torch.Tensor, pattern: Pattern, sparsity: float,
                 consume_hessian: bool = False, **stats) -> torch.Tensor:
    """The pruned weight of one linear. `method` is a method string (asft_ray.methods.resolve);
    `stats` holds at least what it needs: sq_norms (wanda), hessian (sparsegpt), grad_sum
    (taylor), grad_sq_sum (fisher), sums and tokens (dsnot)...

    `consume_hessian`: the caller will not read stats["hessian"] again, so the last step that
    reads it may overwrite it (SparseGPT's update then factors it in place: no float64 copy).
    That step finds `consume_hessian` True in its stats; every other step finds it False."""
    recipe = resolve(method)
    declared = recipe.method
    steps = [declared, *(refinement for refinement, _ in recipe.refinements)]
    last_reader = max((i for i, step in enumerate(steps) if "hessian" in step.needs), default=None)

    def stats_of(step: int) -> dict:
        return {**stats, "consume_hessian": consume_hessian and step == last_reader}

    if declared.prune is not None:  # the method builds the weight itself (and may update the kept weights)
        pruned = declared.prune(weight, pattern, sparsity, stats_of(0))
        if not recipe.refinements:
            return pruned
        keep = pruned != 0  # only weight refinements follow such methods (registry.resolve checks)
    else:
        scores = declared.score(weight, stats_of(0))
        keep = make_mask(scores.float(), pattern, sparsity, per_row=declared.compare == "row")
    for step, (refinement, setting) in enumerate(recipe.refinements, 1):
        if refinement.changes == "weights":  # the last step: new values for the kept weights
            return refinement.refine(weight, keep, pattern, stats_of(step), setting)
        keep = refinement.refine(weight, keep, pattern, stats_of(step), setting)
    return weight.masked_fill(~keep, 0.0)  # +0.0, not the -0.0 that weight * keep gives; no zeros-sized temporary


@dataclass(frozen=True)
class LinearJob:
    """One linear to prune: its name in the layer, its weight and the sparsity it is pruned to."""

    name: str
    weight: torch.Tensor
    sparsity: float


def needed_stats(method: str, stats: InputStats, name: str) -> dict:
    """The statistics `prune_weight` needs for linear `name` (what the method string declares)."""
    return {stat: stats.get(stat, name) for stat in sorted(resolve(method).needs)}


def prune_jobs(method: str, pattern: Pattern, jobs: Iterable[LinearJob], stats: InputStats) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, pruned weight) for each job, one after another in this process."""
    for job in jobs:
        yield job.name, prune_weight(method, job.weight, pattern, job.sparsity, **needed_stats(method, stats, job.name))


def sparsity_of(sparsity, layer, name: str) -> float:
    """One linear's sparsity: `sparsity` is one float for every linear, or a per-layer plan
    {layer index (or "lm_head"): {linear name: sparsity}} from asft_ray.schedules."""
    if isinstance(sparsity, (int, float)):
        return float(sparsity)
    return sparsity[layer][name]


class _Captured(Exception):
    def __init__(self, args, kwargs):
        self.args, self.kwargs = args, kwargs


def capture_layer0_inputs(model: nn.Module, calib_ids: torch.Tensor) -> tuple[list[torch.Tensor], tuple, dict]:
    """Hidden states entering decoder layer 0 for each calibration sample, plus the other
    arguments the model passes its layers (rotary embeddings, masks, positions)."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device

    def stop(module, args, kwargs):
        raise _Captured(args, kwargs)

    inputs, extra_args, layer_kwargs = [], (), {}
    handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    # 16-bit embeddings: continue in float32, so rotary tables and masks are built in float32 as well
    upcast = model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.float())
    try:
        for ids in calib_ids:
            try:
                model(input_ids=ids.unsqueeze(0).to(device), use_cache=False)
            except _Captured as captured:
                hidden = captured.args[0] if captured.args else captured.kwargs.pop("hidden_states")
                inputs.append(hidden.detach().float())
                extra_args, layer_kwargs = captured.args[1:], captured.kwargs
    finally:
        handle.remove()
        upcast.remove()
    return inputs, to_float32(extra_args), to_float32(layer_kwargs)


def floats_as(value, dtype: torch.dtype):
    """`value` with every floating-point tensor inside it (tuples, lists, dicts) in `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(floats_as(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: floats_as(v, dtype) for k, v in value.items()}
    return value


def to_float32(value):
    """`value` with every 16-bit float tensor inside it (tuples, lists, dicts) in float32."""
    return floats_as(value, torch.float32)


def _is_float32(layer: nn.Module) -> bool:
    return all(p.dtype == torch.float32 for p in layer.parameters() if p.is_floating_point())


def computing_copy(layer: nn.Module) -> nn.Module:
    """The layer in float32, as its weights are fitted (reconstruction, gradients): itself if it
    already is, else a float32 copy (16-bit weights stay 16-bit in the model, the object store and
    the output). For a forward only, `computing_view` gives the same numbers without the copy."""
    if _is_float32(layer):
        return layer
    return copy.deepcopy(layer).float()


def computing_view(layer: nn.Module) -> nn.Module:
    """The layer as statistics and activations are computed, in float32: itself if it already is
    float32, else a copy that shares its 16-bit linear weights and upcasts each one only while that
    linear runs, so one linear's float32 weight exists at a time instead of the whole layer's (a
    1.57 B model's layer: 46 MB instead of 206 MB; a 70 B Llama's: 0.94 GB instead of 3.4 GB). The
    rest (norms, buffers) is copied to float32 as computing_copy does. The same numbers as
    computing_copy's layer: the same F.linear on the same float32 weight. Forward only: its linears'
    weights are still the 16-bit ones, so nothing may train or write them."""
    if _is_float32(layer):
        return layer
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    shared = {id(p): p for linear in linears for p in linear.parameters(recurse=False)}
    view = copy.deepcopy(layer, shared)  # new modules; the linears' parameters are the layer's own
    for module in view.modules():
        if isinstance(module, nn.Linear):
            module.forward = _linear_in_float32.__get__(module)
            continue
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                module._parameters[name] = nn.Parameter(p.detach().float(), p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                module._buffers[name] = b.float()
    return view


def _linear_in_float32(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if linear.bias is None else linear.bias.float()
    return torch.nn.functional.linear(x, linear.weight.float(), bias)


def run_layer(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = layer(x, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def untie_lm_head(model: nn.Module) -> nn.Linear:
    """The output projection as a weight of its own, so pruning it leaves the input embeddings dense."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, nn.Linear):
        raise AsftError(f"{type(model).__name__} has no linear lm_head to prune")
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
        model.all_tied_weights_keys = {}
    return head


def _final_norm(model: nn.Module) -> nn.Module:
    norm = getattr(model.base_model, "norm", None)
    if norm is None:
        raise AsftError(f"pruning lm_head needs the final norm (base_model.norm), which {type(model).__name__} lacks")
    return norm


CHUNK_SIZE = 4  # calibration samples per unit of work; statistics are reduced per chunk, in chunk order


def chunk_stats(layer: nn.Module, chunk: list[torch.Tensor], args: tuple, kwargs: dict, hessian: bool,
                only: list[str] | None = None) -> InputStats:
    """Input statistics of `layer`'s linears (or of the linears named in `only`, stopping each
    pass once they have all seen their input) over one chunk of calibration samples."""
    return _chunk_collector(layer, chunk, args, kwargs, hessian, only).result()


def chunk_stats_and_inputs(layer: nn.Module, chunk: list[torch.Tensor], args: tuple, kwargs: dict,
                           only: list[str] | None, keep_inputs: Collection[str]) -> tuple[InputStats, dict]:
    """chunk_stats with Hessians, except for the inputs (sources) in `keep_inputs`: for those, the
    inputs themselves (float32, tokens x width, one per sample), for another actor to sum with
    stats.hessian_of. Both: {source: ...}."""
    collector = _chunk_collector(layer, chunk, args, kwargs, True, only, keep_inputs)
    return collector.result(), collector.inputs


@torch.no_grad()
def _chunk_collector(layer, chunk, args, kwargs, hessian, only, keep_inputs=()) -> LayerInputStats:
    linears = prunable_linears(layer)
    if only is not None:
        linears = {name: linears[name] for name in only}
    with LayerInputStats(linears, hessian, stop_early=only is not None, keep_inputs=keep_inputs) as stats:
        for x in chunk:
            stats.begin_sample()
            try:
                run_layer(layer, x, args, kwargs)
            except StopLayer:
                pass
    return stats


@torch.no_grad()
def chunk_forward(layer: nn.Module, chunk: list[torch.Tensor], args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The layer's outputs for one chunk: the next layer's inputs."""
    return [run_layer(layer, x, args, kwargs) for x in chunk]


def split_chunks(inputs: list, chunk_size: int = CHUNK_SIZE) -> list[list]:
    return [inputs[i : i + chunk_size] for i in range(0, len(inputs), chunk_size)]


# What the evaluation computes from one sample's last-layer activations [1, T, h]:
# score(final (norm + lm_head, float32), activations, the sample's target) -> a result on the CPU
RowScore = Callable[[nn.Module, torch.Tensor, Any], Any]


class Runner(Protocol):
    """Where the calibration activations live and how a layer's statistics and solves are computed.

    `LocalRunner` does it in this process; `distributed.sharded.ShardedRunner` on Ray actors.
    Both add statistics per chunk in chunk order, so they give bit-identical results."""

    def collect(self, layer: nn.Module, hessian: bool, only: list[str] | None = None) -> InputStats:
        """Input statistics of the layer's linears (of those in `only`), summed over the calibration set."""

    def prune(self, method: str, pattern: Pattern, jobs: Iterable[LinearJob], stats: InputStats) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, pruned weight) for each job, in job order, from `stats` as `collect` returned them.
        `jobs` is read once, and each pair is produced only after the caller took the one before:
        a caller that swaps each weight in as it comes holds one layer and one pruned weight, not two layers."""

    def advance(self, layer: nn.Module) -> None:
        """Push the calibration activations through `layer`: they become the next layer's inputs."""

    def reconstruct(self, layer: nn.Module, targets: "Runner", reconstruction, index: int) -> dict:
        """Block reconstruction (pruning.reconstruct.Reconstruction) of pruned layer `index`, in place:
        its kept weights fitted so that its outputs on these activations approach `targets`' (a runner
        of the same kind over the same samples, holding the dense model's hidden states). Returns the
        report row's part."""

    def outputs(self) -> list[torch.Tensor]:
        """The activations as they are now, one tensor per calibration sample."""

    def score_rows(self, final: nn.Module, score: RowScore, targets: list) -> list:
        """Evaluation: `score(final, activations, target)` for each sample, with `final` the last
        step to logits (norm + lm_head) and `target` that sample's entry of `targets`; run where the
        activations are, the results in sample order (on the CPU)."""


class LocalRunner:
    """Runs the calibration activations through layers in this process, chunk by chunk.

    Statistics are added as each chunk is done: at most one chunk's partial sums live beside the total."""

    def __init__(self, inputs: list[torch.Tensor], args: tuple, kwargs: dict, chunk_size: int = CHUNK_SIZE):
        self.chunk_size = chunk_size
        self.chunks = split_chunks(inputs, chunk_size)
        self.args, self.kwargs = args, kwargs

    def collect(self, layer: nn.Module, hessian: bool, only: list[str] | None = None) -> InputStats:
        layer = computing_view(layer)
        return sum_in_order(chunk_stats(layer, c, self.args, self.kwargs, hessian, only) for c in self.chunks)

    def prune(self, method: str, pattern: Pattern, jobs: Iterable[LinearJob], stats: InputStats) -> Iterator[tuple[str, torch.Tensor]]:
        return prune_jobs(method, pattern, jobs, stats)

    def advance(self, layer: nn.Module) -> None:
        layer = computing_view(layer)
        for i, chunk in enumerate(self.chunks):  # in place: one chunk's outputs beside the activations, not a second set
            self.chunks[i] = chunk_forward(layer, chunk, self.args, self.kwargs)

    def reconstruct(self, layer: nn.Module, targets: "LocalRunner", reconstruction, index: int) -> dict:
        work = computing_copy(layer)  # float32: the layer itself, or a copy of a 16-bit one
        samples = self.outputs()
        row = reconstruction.fit(work, samples.__getitem__, targets.outputs().__getitem__, len(samples), self.args,
                                 self.kwargs, index)
        if work is not layer:
            fitted = prunable_linears(work)
            for name, lin in prunable_linears(layer).items():
                lin.weight.data = fitted[name].weight.data.to(lin.weight.dtype)
        return row

    def outputs(self) -> list[torch.Tensor]:
        return [x for chunk in self.chunks for x in chunk]

    def score_rows(self, final: nn.Module, score: RowScore, targets: list) -> list:
        final = computing_view(final)
        return [score(final, x, target) for x, target in zip(self.outputs(), targets, strict=True)]


class ResidentLayers:
    """Layers that already live in the model: nothing to load before pruning or write after.

    `pruning.streaming.StreamedLayers` has the same two methods and reads each layer from
    safetensors shards just before it is pruned, then writes it out and frees it."""

    def load(self, index: int, layer: nn.Module) -> None:
        pass

    def release(self, index: int, layer: nn.Module) -> None:
        pass

    def free(self, index: int, layer: nn.Module) -> None:
        pass

    def after_capture(self, model: nn.Module) -> None:
        pass


def _permute_channels(runner, layer, pattern: Pattern) -> dict:
    """Reorder the dense layer's MLP intermediate channels for down_proj's N:M groups, and each KV
    head's value dimensions for o_proj's (pruning.permute): the same function, so every statistic
    after it is of the same layer."""
    from asft_ray.pruning.permute import attention_orders, mlp_order, permute_attention_values, permute_mlp

    mlp, attn = getattr(layer, "mlp", None), getattr(layer, "self_attn", None)
    if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
        raise AsftError(f"channel permutation needs a gated MLP (gate_proj, up_proj, down_proj); {type(layer).__name__} has none")
    targets = ["mlp.down_proj"]
    head_dim = getattr(attn, "head_dim", None)
    permute_values = head_dim is not None and all(hasattr(attn, n) for n in ("v_proj", "o_proj")) \
        and head_dim % pattern.m == 0
    if permute_values:
        targets.append("self_attn.o_proj")
    stats = runner.collect(layer, hessian=False, only=targets)
    order, mlp_gain = mlp_order(mlp.down_proj.weight.data, stats.sq_norm("mlp.down_proj"), pattern.n, pattern.m)
    permute_mlp(mlp, order)
    extra = {"permutation_kept_score_gain": mlp_gain}
    if permute_values:
        n_heads, n_kv = attn.o_proj.in_features // head_dim, attn.v_proj.out_features // head_dim
        o_order, v_order, gain = attention_orders(attn.o_proj.weight.data, stats.sq_norm("self_attn.o_proj"),
                                                  n_heads, n_kv, pattern.n, pattern.m)
        permute_attention_values(attn, o_order, v_order)
        extra["o_proj_permutation_kept_score_gain"] = gain
    return extra


def _prune_one_layer(runner, layer, index, method, pattern, sparsity, true_sequential,
                     channel_permutation: bool = False) -> dict:
    """Prune one decoder layer's linears: all on the dense layer's inputs, or (true_sequential)
    one input group at a time, each group's statistics taken after the groups before it were pruned.
    With `channel_permutation` (N:M) the MLP's channels and the value dimensions are reordered first
    (_permute_channels). Returns what the layer's report row adds."""
    extra = _permute_channels(runner, layer, pattern) if channel_permutation else {}
    linears = prunable_linears(layer)
    hessian = resolve(method).hessian
    stats = runner.collect(layer, hessian)
    groups = input_groups(stats) if true_sequential else [list(linears)]
    for position, group in enumerate(groups):
        if position > 0:
            stats = runner.collect(layer, hessian, only=group)
        # a generator: no list of the dense weights outlives their swap for the pruned ones
        jobs = (LinearJob(name, linears[name].weight.data, sparsity_of(sparsity, index, name)) for name in group)
        for name, weight in runner.prune(method, pattern, jobs, stats):
            linears[name].weight.data = weight
            return_free_memory()  # the dense weight just replaced: its heap pages back to the OS before the next linear
    return extra


@torch.no_grad()
def _prune_layerwise(
    model, calib_ids, method, pattern, sparsity, show_progress, prune_lm_head=False, make_runner=LocalRunner,
    checkpoint=None, layer_store=None, true_sequential=False, channel_permutation=False, reconstruction=None,
) -> list[dict]:
    layer_store = layer_store or ResidentLayers()
    captured = capture_layer0_inputs(model, calib_ids)
    runner = make_runner(*captured)
    # block reconstruction's targets: the dense model's hidden states, pushed through each dense layer
    dense = make_runner(*captured) if reconstruction else None
    del captured  # the runners hold the activations (a ShardedRunner in the object store): no copy stays here
    if not prune_lm_head:
        layer_store.after_capture(model)
    layers = decoder_layers(model)
    report = checkpoint.completed() if checkpoint else []
    for index in range(len(report)):  # resume: restore finished layers and push the inputs through them
        layer_store.load(index, layers[index])
        if dense is not None:
            dense.advance(layers[index])  # still the dense layer: the checkpoint's is loaded next
        checkpoint.load_layer(index, layers[index])
        runner.advance(layers[index])
        layer_store.release(index, layers[index])
    for index, layer in enumerate(progress(layers, f"{method} layers", show_progress)):
        if index < len(report):
            continue
        start = time.perf_counter()
        layer_store.load(index, layer)
        if dense is not None:
            dense.advance(layer)
        extra = _prune_one_layer(runner, layer, index, method, pattern, sparsity, true_sequential, channel_permutation)
        if dense is not None:
            extra |= runner.reconstruct(layer, dense, reconstruction, index)
        runner.advance(layer)
        report.append({"layer": index, "seconds": time.perf_counter() - start, **linear_sparsity(prunable_linears(layer)),
                       **extra})
        if checkpoint:
            checkpoint.save_layer(index, layer, report[-1])
        layer_store.release(index, layer)
    if prune_lm_head:
        start = time.perf_counter()
        head, norm = untie_lm_head(model), _final_norm(model)
        collector = LayerInputStats({"lm_head": head}, hessian=resolve(method).hessian)
        for x in runner.outputs():
            collector.add("lm_head", norm(x))
        stats = collector.result()
        head.weight.data = prune_weight(method, head.weight.data, pattern, sparsity_of(sparsity, "lm_head", "lm_head"),
                                        **needed_stats(method, stats, "lm_head"))
        report.append({"layer": "lm_head", "seconds": time.perf_counter() - start, **linear_sparsity({"lm_head": head})})
    return report


def gradient_sums(model: nn.Module, calib_ids: torch.Tensor, show_progress: bool = True, lm_head: bool = False) -> dict:
    """Sum over calibration samples of dL/dW and (dL/dW)^2 for every decoder linear, in float64.

    Returns {(layer_index, linear_name): (grad_sum, grad_sq_sum)}; ("lm_head", "lm_head") too if asked."""
    device = next(model.parameters()).device
    weights = {
        (i, name): linear.weight
        for i, layer in enumerate(decoder_layers(model))
        for name, linear in prunable_linears(layer).items()
    }
    if lm_head:
        weights[("lm_head", "lm_head")] = untie_lm_head(model).weight
    wanted = {id(w) for w in weights.values()}
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    sums = {key: (torch.zeros_like(w, dtype=torch.float64), torch.zeros_like(w, dtype=torch.float64)) for key, w in weights.items()}
    try:
        for ids in progress(calib_ids, "gradients", show_progress):
            ids = ids.unsqueeze(0).to(device)
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for key, w in weights.items():
                g = w.grad.double()
                sums[key][0].add_(g)
                sums[key][1].add_(g * g)
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
    return sums


def add_gradient_sums(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {key: (a[key][0] + b[key][0], a[key][1] + b[key][1]) for key in a}


def chunked_gradient_sums(model: nn.Module, calib_ids: torch.Tensor, show_progress: bool = True,
                          lm_head: bool = False, chunk_size: int = CHUNK_SIZE) -> dict:
    """gradient_sums over fixed chunks of samples, added in chunk order: exactly what the
    sharded version (asft_ray.distributed.sharded) computes with any number of workers."""
    total = None
    for chunk in progress(calib_ids.split(chunk_size), "gradient chunks", show_progress):
        total = add_gradient_sums(total, gradient_sums(model, chunk, False, lm_head))
    return total


@torch.no_grad()
def _prune_each_linear(model, method, pattern, sparsity, grads=None, prune_lm_head=False, layer_store=None) -> list[dict]:
    layer_store = layer_store or ResidentLayers()
    layers = decoder_layers(model)
    groups = list(enumerate(layers))
    if prune_lm_head:
        groups.append(("lm_head", untie_lm_head(model)))
    report = []
    for index, module in groups:
        start = time.perf_counter()
        if index != "lm_head":
            layer_store.load(index, module)
        linears = prunable_linears(module) if index != "lm_head" else {"lm_head": module}
        for name, linear in linears.items():
            needed = {}
            if grads is not None:
                summed = dict(zip(("grad_sum", "grad_sq_sum"), grads[(index, name)]))
                needed = {stat: summed[stat] for stat in sorted(resolve(method).needs)}
            linear.weight.data = prune_weight(method, linear.weight.data, pattern, sparsity_of(sparsity, index, name), **needed)
        report.append({"layer": index, "seconds": time.perf_counter() - start, **linear_sparsity(linears)})
        if index != "lm_head":
            layer_store.release(index, module)
    return report


def check_pattern_fits(model: nn.Module, pattern: Pattern, prune_lm_head: bool = False) -> None:
    """N:M groups run along each linear's inputs, so every input width must be a multiple of M."""
    if pattern.kind != "nm":
        return
    groups = [(i, prunable_linears(layer)) for i, layer in enumerate(decoder_layers(model))]
    if prune_lm_head:
        groups.append(("lm_head", {"lm_head": model.get_output_embeddings()}))
    for index, linears in groups:
        for name, linear in linears.items():
            if linear.in_features % pattern.m:
                raise AsftError(
                    f"pattern {pattern} does not fit layer {index} {name}: input width {linear.in_features} "
                    f"is not a multiple of {pattern.m}"
                )


def prune_model(
    model: nn.Module,
    method: str,
    pattern: Pattern,
    sparsity: float | dict,
    calib_ids: torch.Tensor | None = None,
    show_progress: bool = True,
    prune_lm_head: bool = False,
    make_runner=None,
    *,
    true_sequential: bool = False,
    channel_permutation: bool = False,
    reconstruction=None,
    hooks: EngineHooks | None = None,
    checkpoint=None,
    layer_store=None,
    sum_gradients=None,
) -> list[dict]:
    """Prune every linear in the decoder layers in place (and lm_head if asked, untied from the
    input embeddings). Returns one report row per layer. `method` is a method string
    (asft_ray.methods: `wanda`, `ria+dsnot`, ...). `sparsity` is one float, or a per-layer plan
    {layer index: {linear name: sparsity}} (and "lm_head") from asft_ray.schedules.
    `true_sequential` (layer-wise methods) prunes each layer's linears group by group, as
    described at the top of this module. `channel_permutation` (N:M, layer-wise methods) reorders
    each layer's MLP intermediate channels and each KV head's value dimensions before pruning it
    (pruning.permute): the model computes the same function in a layout whose down_proj and
    o_proj keep more under N:M. `reconstruction` (a pruning.reconstruct.Reconstruction, layer-wise
    methods) fits each pruned layer's kept weights to the dense model's hidden states.

    `hooks` (pruning.hooks.EngineHooks) says where the work is done: `make_runner(inputs, args,
    kwargs)` where calibration activations live and are pushed through layers (layer-wise
    methods): here (LocalRunner) or on Ray actors; `checkpoint` (a pruning.checkpoint.LayerCheckpoint)
    saves each finished layer of the layer-wise methods and restores finished layers when
    resuming; `layer_store` loads each layer just before it is pruned and writes/frees it after
    (default: the layers are resident in `model`); `sum_gradients` (gradient methods) computes
    the summed gradients: here chunk by chunk, or on Ray actors. The keywords `make_runner`,
    `checkpoint`, `layer_store` and `sum_gradients` are accepted as well and fill the same fields."""
    hooks = _merge_hooks(hooks, make_runner=make_runner, checkpoint=checkpoint, layer_store=layer_store,
                         sum_gradients=sum_gradients)
    recipe = resolve(method)
    layer_store, make_runner = hooks.layer_store, hooks.make_runner or LocalRunner
    check_pattern_fits(model, pattern, prune_lm_head)
    if channel_permutation and (pattern.kind != "nm" or not recipe.layerwise):
        raise AsftError(f"channel permutation reorders channels for N:M groups with a layer-wise method, "
                        f"not {method} {pattern}")
    if reconstruction and not recipe.layerwise:
        raise AsftError(f"block reconstruction follows a layer-wise method, not {method}")
    if not recipe.calibrated:
        if layer_store is not None and not prune_lm_head:
            layer_store.after_capture(model)  # no inputs to capture: embeddings are not needed
        return _prune_each_linear(model, method, pattern, sparsity, prune_lm_head=prune_lm_head, layer_store=layer_store)
    if calib_ids is None:
        raise ValueError(f"method {method!r} needs calibration data")
    if recipe.layerwise:
        return _prune_layerwise(
            model, calib_ids, method, pattern, sparsity, show_progress, prune_lm_head, make_runner, hooks.checkpoint,
            layer_store, true_sequential, channel_permutation, reconstruction,
        )
    if layer_store is not None:  # one layer in memory: the gradients from a layer-streamed backward
        if prune_lm_head:
            raise AsftError(f"{method} with layer streaming keeps lm_head dense; prune it without streaming")
        from asft_ray.pruning.layer_gradients import prune_with_layer_gradients

        return prune_with_layer_gradients(model, calib_ids, method, pattern, sparsity, layer_store, show_progress)
    sum_gradients = hooks.sum_gradients or chunked_gradient_sums
    grads = sum_gradients(model, calib_ids, show_progress, lm_head=prune_lm_head)
    return _prune_each_linear(model, method, pattern, sparsity, grads, prune_lm_head)


def _merge_hooks(hooks: EngineHooks | None, **given) -> EngineHooks:
    """`hooks` with the hook keywords given to prune_model filled in (a field set both ways is an error)."""
    hooks = hooks or EngineHooks()
    values = {}
    for name, value in given.items():
        if value is None:
            continue
        if getattr(hooks, name) is not None:
            raise TypeError(f"prune_model: {name} given both as a keyword and in hooks")
        values[name] = value
    return dataclasses.replace(hooks, **values) if values else hooks
