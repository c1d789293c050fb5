"""Zero-shot accuracy of a model that is never whole in memory: eval/zeroshot.py's scoring, with
the requests pushed through the decoder layers one layer at a time (eval/streamed.py).

The same requests, model inputs and sums as `zeroshot.loglikelihoods`; what differs is how they
reach the model. The engine's runners share one set of layer arguments (rotary tables, masks)
among their rows, so every row of a runner has the same length: the model inputs are grouped by
length (up to the next power of two, `length_groups`), each group right-padded to its longest
input, one runner per group, and every group goes through a layer while it is loaded, so the
model is read once for all tasks (or once per pass, when the activations of all requests would
exceed eval/streamed.py's activation budget). Right padding leaves a causal LM's logits at the real positions
unchanged, and only the positions that predict continuation tokens go through the head: there each
row gives its continuations' log-probs and whether each token is the argmax
(`continuation_logprobs`), where the activations are. Results equal the in-memory scoring's to
float tolerance.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from asft_ray.eval.streamed import streamed_scores
from asft_ray.eval.zeroshot import all_requests, item_metrics, per_item, requests_by_input, tasks_summary
from asft_ray.eval.zeroshot_tasks import load_task, task_metrics


@torch.no_grad()
def continuation_logprobs(final: nn.Module, hidden: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor],
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """An engine.RowScore: `target` is (positions [n], continuations [k, n]): the logits at each
    position predict one continuation token. Returns each continuation's token log-probs [k, n]
    and whether each token is the argmax [k, n]."""
    positions, continuations = target
    logits = final(hidden[0, positions].float())  # `final` computes in float32 (engine.computing_view)
    logprobs = F.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    steps = torch.arange(len(positions), device=logprobs.device)
    return logprobs[steps, continuations], continuations == logprobs.argmax(-1)


def length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of `lengths` grouped by the next power of two at or above each length (so a row is
    padded to less than twice its length), groups and members in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        groups.setdefault((length - 1).bit_length(), []).append(i)
    return list(groups.values())


@torch.no_grad()
def streamed_loglikelihoods(folder: Path, tokenizer, requests: list[tuple[str, str]], max_length: int = 2048,
                            make_runner=None, show_progress: bool = False) -> list[tuple[float, bool]]:
    """zeroshot.loglikelihoods of the safetensors model in `folder`, one decoder layer in memory at a time."""
    sharing, conts = requests_by_input(tokenizer, requests, max_length)
    unique = list(sharing)  # (input tokens, continuation length)
    groups = length_groups([len(tokens) for tokens, _ in unique])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, targets = [], []  # per group: the right-padded inputs; per input, (positions, continuations)
    for group in groups:
        width = max(len(unique[u][0]) for u in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        group_targets = []
        for row, u in enumerate(group):
            (tokens, n), shared = unique[u], sharing[unique[u]]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            group_targets.append((torch.arange(len(tokens) - n, len(tokens)), torch.tensor([conts[i] for i in shared])))
        rows.append(ids)
        targets.append(group_targets)
    scores = streamed_scores(folder, rows, targets, continuation_logprobs, make_runner, "zero-shot layers", show_progress)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for group, group_scores in zip(groups, scores, strict=True):
        for u, (logprobs, greedy) in zip(group, group_scores, strict=True):
            for k, i in enumerate(sharing[unique[u]]):
                results[i] = (float(logprobs[k].sum()), bool(greedy[k].all()))
    return results


def streamed_evaluate_tasks(folder: Path, tokenizer, names: list[str], data_dir: str | None = None,
                            limit: int | None = None, max_length: int = 2048, make_runner=None,
                            show_progress: bool = False) -> dict:
    """zeroshot.evaluate_tasks of the safetensors model in `folder`, every task's requests together in
    the same passes over the layers. The tasks share them, so the time is the whole's ("seconds")."""
    start = time.perf_counter()
    items = {name: load_task(name, data_dir, limit) for name in names}
    requests = [all_requests(task_items) for task_items in items.values()]
    results = streamed_loglikelihoods(folder, tokenizer, [r for task in requests for r in task], max_length,
                                      make_runner, show_progress)
    by_task, at = {}, 0
    for (name, task_items), task_requests in zip(items.items(), requests):
        task_results = results[at : at + len(task_requests)]
        at += len(task_requests)
        by_task[name] = {"task": name, **item_metrics(task_items, per_item(task_items, task_results), task_metrics(name))}
    return {**tasks_summary(by_task), "seconds": time.perf_counter() - start, "streamed": True}
