"""Perplexity of a model that is never whole in memory: the windows go through the decoder layers
one layer at a time, each layer read from the safetensors shards and freed after use.

The windows are the calibration inputs of the pruning engine's runner: `LocalRunner` pushes them
through in this process, `distributed.sharded.ShardedRunner` on Ray actors (windows sharded over
the workers, activations in the object store). The last step (final norm, lm_head, per-window
NLL) runs where the activations are. The protocol is `eval.perplexity`'s: non-overlapping
windows of `seqlen` tokens, ppl = exp(mean window NLL); the numbers equal the in-memory
evaluation's to float tolerance.
"""

from __future__ import annotations

import time
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
def chunk_nlls(final: nn.Module, chunk: list[torch.Tensor], targets: list[torch.Tensor]) -> list[float]:
    """Mean next-token NLL of each window, from its last-layer activations [1, T, h] and its ids [T]."""
    nlls = []
    for hidden, ids in zip(chunk, targets):
        logits = final(hidden.to(next(final.parameters()).dtype))
        ids = ids.to(logits.device)
        nlls.append(float(F.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="mean")))
    return nlls


def _output_head(model: nn.Module, reader) -> nn.Module:
    """The output projection, read from the shards now (the tied embedding's tensor when tied)."""
    head = model.get_output_embeddings()
    key = next(k for k, p in model.named_parameters(remove_duplicate=False) if p is head.weight and k in reader)
    head.weight = nn.Parameter(reader.get(key), requires_grad=False)
    return head


@torch.no_grad()
def streamed_perplexity(folder: Path, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                        make_runner=None, show_progress: bool = True) -> dict:
    """`eval.perplexity.perplexity` of the model in `folder` (safetensors), one decoder layer in memory at a time."""
    from asft_ray.pruning.engine import LocalRunner, capture_layer0_inputs
    from asft_ray.pruning.streaming import StreamedLayers, build_skeleton

    ids = ids.reshape(-1)
    windows = count_windows(ids, seqlen, max_windows)
    start = time.perf_counter()
    rows = ids[: windows * seqlen].reshape(windows, seqlen)
    model, reader = build_skeleton(Path(folder), load_head=False)
    runner = (make_runner or LocalRunner)(*capture_layer0_inputs(model, rows))
    layers = StreamedLayers(model, reader, out_dir=None)  # read only
    layers.after_capture(model)  # the embeddings go until the end: never beside a decoder layer
    for index, layer in enumerate(progress(decoder_layers(model), "ppl layers", show_progress)):
        layers.load(index, layer)
        runner.advance(layer)
        layers.free(index, layer)
    final = FinalHead(model.base_model.norm, _output_head(model, reader))
    nlls = runner.nlls(final, list(rows))
    return {**ppl_result(nlls, seqlen, time.perf_counter() - start), "streamed": True}


def evaluate_streamed(folder, ids: torch.Tensor, seqlen: int, max_windows: int | None, workers: int = 0,
                      worker_resources: tuple[float, float] = (1, 0), address: str | None = None,
                      show_progress: bool = True) -> dict:
    """streamed_perplexity in this process (workers=0) or with the windows sharded over Ray actors."""
    if not workers:
        return streamed_perplexity(folder, ids, seqlen, max_windows, show_progress=show_progress)
    import ray

    from asft_ray.distributed.runner import init_ray, streaming_object_store_bytes
    from asft_ray.distributed.sharded import WorkerResources, sharded_runner_factory, start_workers

    owned = init_ray(address, streaming_object_store_bytes(str(folder)))
    actors = []
    try:
        actors = start_workers(workers, WorkerResources(*worker_resources))
        result = streamed_perplexity(folder, ids, seqlen, max_windows, sharded_runner_factory(actors), show_progress)
        return {**result, "workers": workers}
    finally:
        for actor in actors:
            ray.kill(actor)
        if owned:
            ray.shutdown()
