"""Evaluation of a model that is never whole in memory: token rows go through the decoder layers
one layer at a time, each layer read from the safetensors shards and freed after use
(`stream_through_layers`); perplexity here, zero-shot log-likelihoods in streamed_zeroshot.py.

The rows are the calibration inputs of the pruning engine's runner: `LocalRunner` pushes them
through in this process, `distributed.sharded.ShardedRunner` on Ray actors (rows sharded over
the workers, activations in the object store). The last step (final norm, lm_head, and the
row's score: here its window NLL) runs where the activations are. The perplexity protocol is
`eval.perplexity`'s: non-overlapping windows of `seqlen` tokens, ppl = exp(mean window NLL); the
numbers equal the in-memory evaluation's to float tolerance.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from asft_ray.eval.perplexity import count_windows, ppl_result
from asft_ray.models import decoder_layers
from asft_ray.progress import progress


class FinalHead(nn.Module):
    """What turns the last layer's outputs into logits: the final norm and lm_head."""

    def __init__(self, norm: nn.Module, head: nn.Linear):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))


@torch.no_grad()
def last_layer_nll(final: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token NLL of one window, from its last-layer activations [1, T, h] and its ids [T]
    (an engine.RowScore: `final` computes in float32, engine.computing_view)."""
    logits = final(hidden.float())
    ids = ids.to(logits.device)
    return float(F.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="mean"))


def _output_head(model: nn.Module, reader) -> nn.Module:
    """The output projection, read from the shards now (the tied embedding's tensor when tied)."""
    head = model.get_output_embeddings()
    key = next(k for k, p in model.named_parameters(remove_duplicate=False) if p is head.weight and k in reader)
    head.weight = nn.Parameter(reader.get(key), requires_grad=False)
    return head


@torch.no_grad()
def stream_through_layers(folder: Path, groups: list[torch.Tensor], make_runner=None, what: str = "layers",
                          show_progress: bool = True, zero_counts=None) -> tuple[list, nn.Module]:
    """Token rows [n, T] of each group (one T per group) pushed through every decoder layer of the
    safetensors model in `folder`, one layer in memory at a time, each layer read once for all
    groups. Returns one runner per group (engine.Runner, made by `make_runner`, default LocalRunner)
    holding the last layer's outputs, and the final step to logits (norm + lm_head) to score them with.
    `zero_counts` (eval.sparsity.ZeroCounts), if given, counts the zeros of each layer while it is here."""
    from asft_ray.pruning.engine import LocalRunner, capture_layer0_inputs
    from asft_ray.pruning.streaming import StreamedLayers, build_skeleton

    model, reader = build_skeleton(Path(folder), load_head=False)
    runners = [(make_runner or LocalRunner)(*capture_layer0_inputs(model, rows)) for rows in groups]
    layers = StreamedLayers(model, reader, out_dir=None)  # read only
    layers.after_capture(model)  # the embeddings go until the end: never beside a decoder layer
    for index, layer in enumerate(progress(decoder_layers(model), what, show_progress)):
        layers.load(index, layer)
        for runner in runners:
            runner.advance(layer)
        if zero_counts is not None:  # while the workers run the layer
            zero_counts.add_layer(index, layer)
        layers.free(index, layer)
    final = FinalHead(model.base_model.norm, _output_head(model, reader))
    if zero_counts is not None:
        zero_counts.add_head(final.head, tied=bool(getattr(model.config, "tie_word_embeddings", False)))
    return runners, final


ACTIVATION_BUDGET_BYTES = 512 * 2**20  # float32 activations one streamed evaluation pass holds at once


def passes(groups: list[torch.Tensor], hidden: int, budget: int) -> list[list[tuple]]:
    """The rows of `groups` (token rows [n, T], one T per group) split into passes over the layers:
    each pass a list of (group index, first row, end row) whose float32 activations (4 * hidden * T
    bytes a row) stay within `budget`. Pieces start at multiples of engine.CHUNK_SIZE, so the runners'
    chunks, and the results, are those of a single pass; a chunk larger than the budget is a pass
    of its own."""
    from asft_ray.pruning.engine import CHUNK_SIZE

    plan, current, used = [], [], 0
    for g, rows in enumerate(groups):
        row_bytes = 4 * hidden * rows.shape[1]
        start = 0
        while start < len(rows):
            fits = (budget - used) // row_bytes // CHUNK_SIZE * CHUNK_SIZE
            if fits <= 0 and current:  # this pass is full
                plan.append(current)
                current, used = [], 0
                continue
            end = min(len(rows), start + max(fits, CHUNK_SIZE))
            current.append((g, start, end))
            used += (end - start) * row_bytes
            start = end
    return plan + ([current] if current else [])


def streamed_scores(folder: Path, groups: list[torch.Tensor], targets: list[list], score, make_runner=None,
                    what: str = "layers", show_progress: bool = True, budget: int | None = None,
                    zero_counts=None) -> list[list]:
    """`score(final, activations, target)` of every row of every group (engine.RowScore), in as few
    passes over the model's layers (`stream_through_layers`) as keep the activations held at once
    within `budget` (default ACTIVATION_BUDGET_BYTES; `passes`). Returns one list of results per
    group, in row order. A full WikiText-2 test of a 70B Llama (148 windows of 2048 x 8192 floats,
    9.9 GB of activations) takes 20 passes; SmolLM2's (0.7 GB), 2. `zero_counts`: counted in the first pass."""
    from asft_ray.models import model_config

    hidden = model_config(str(folder)).hidden_size
    results: list[list] = [[] for _ in groups]
    plan = passes(groups, hidden, ACTIVATION_BUDGET_BYTES if budget is None else budget)
    for number, pieces in enumerate(plan, 1):
        label = what if len(plan) == 1 else f"{what} (pass {number}/{len(plan)})"
        runners, final = stream_through_layers(folder, [groups[g][a:b] for g, a, b in pieces], make_runner, label,
                                               show_progress, zero_counts if number == 1 else None)
        for (g, a, b), runner in zip(pieces, runners, strict=True):
            results[g] += runner.score_rows(final, score, targets[g][a:b])
    return results


@torch.no_grad()
def streamed_perplexity(folder: Path, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                        make_runner=None, show_progress: bool = True, sparsity: bool = False) -> dict:
    """`eval.perplexity.perplexity` of the model in `folder` (safetensors), one decoder layer in memory
    at a time; with `sparsity`, also "sparsity": its eval.sparsity.model_sparsity, counted in the same
    pass (the shards are read once)."""
    from asft_ray.eval.sparsity import ZeroCounts

    ids = ids.reshape(-1)
    windows = count_windows(ids, seqlen, max_windows)
    start = time.perf_counter()
    rows = ids[: windows * seqlen].reshape(windows, seqlen)
    counts = ZeroCounts() if sparsity else None
    (nlls,) = streamed_scores(folder, [rows], [list(rows)], last_layer_nll, make_runner, "ppl layers", show_progress,
                              zero_counts=counts)
    result = {**ppl_result(nlls, seqlen, time.perf_counter() - start), "streamed": True}
    return result | ({"sparsity": counts.result()} if counts is not None else {})


@contextmanager
def runner_factory(folder, workers: int = 0, worker_resources: tuple[float, float] = (1, 0),
                   address: str | None = None):
    """The runner factory of a streamed evaluation: None (LocalRunner, in this process) without
    workers; else ShardedRunners over `workers` Ray actors, started here and stopped on exit (and
    Ray too, when this call started it: an embedded object store sized for streaming `folder`)."""
    if not workers:
        yield None
        return
    import ray

    from asft_ray.distributed.runner import init_ray, streaming_object_store_bytes
    from asft_ray.distributed.sharded import WorkerResources, sharded_runner_factory, start_workers

    owned = init_ray(address, streaming_object_store_bytes(str(folder)))
    actors = []
    try:
        actors = start_workers(workers, WorkerResources(*worker_resources))
        yield sharded_runner_factory(actors)
    finally:
        for actor in actors:
            ray.kill(actor)
        if owned:
            ray.shutdown()


def evaluate_streamed(folder, ids: torch.Tensor, seqlen: int, max_windows: int | None, workers: int = 0,
                      worker_resources: tuple[float, float] = (1, 0), address: str | None = None,
                      show_progress: bool = True, sparsity: bool = False) -> dict:
    """streamed_perplexity in this process (workers=0) or with the windows sharded over Ray actors."""
    with runner_factory(folder, workers, worker_resources, address) as make_runner:
        result = streamed_perplexity(folder, ids, seqlen, max_windows, make_runner, show_progress, sparsity)
    return {**result, "workers": workers} if workers else result
