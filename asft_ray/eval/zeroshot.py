"""Zero-shot accuracy scored the way lm-evaluation-harness scores log-likelihood tasks.

For every (context, continuation) request: tokenize as lm-eval's `_encode_pair` does
(trailing spaces of the context move to the continuation; context and context+continuation
are tokenized separately without special tokens and the continuation is the tail of the
whole), run context+continuation[:-1] through the model, and sum the continuation tokens'
log-probabilities; `is_greedy` says whether every continuation token is the argmax.

  acc       = argmax over choices of the summed log-likelihood (first choice wins ties)
  acc_norm  = argmax of log-likelihood / len(choice text in characters)   (lm-eval's acc_norm)
  lambada   acc = is_greedy of the last word; ppl = exp(-mean log-likelihood)

Requests run in batches sorted by length (longest first, ties in input order), right-padded;
only the logits at continuation positions are materialized. Results do not depend on batch
size beyond float rounding.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from asft_ray.errors import AsftError
from asft_ray.eval.zeroshot_tasks import Item, load_task, task_metrics
from asft_ray.progress import progress


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's HFLM._encode_pair: (context tokens, continuation tokens)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not context:  # lm-eval feeds the end-of-text token as the context
        ctx = [tokenizer.eos_token_id]
        whole = ctx + whole
    return ctx, whole[len(ctx) :]


def _model_inputs(ctx: list[int], cont: list[int], max_length: int) -> tuple[list[int], int]:
    """lm-eval's input: (ctx + cont)[-(max_length + 1):][:-1], and the number of continuation tokens."""
    if not cont or len(cont) > max_length:
        raise AsftError(f"a continuation encoded to {len(cont)} tokens; it must be 1..max_length={max_length}")
    tokens = (ctx + cont)[-(max_length + 1) :]
    return tokens[:-1], len(cont)


def requests_by_input(tokenizer, requests: list[tuple[str, str]], max_length: int,
                      ) -> tuple[dict[tuple[tuple[int, ...], int], list[int]], list[list[int]]]:
    """({(model input tokens, number of continuation tokens): indices of the requests with that
    input}, each request's continuation tokens). Requests with the same input (one-token
    continuations of one context) share one forward pass."""
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    sharing: dict[tuple[tuple[int, ...], int], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        inp, n = _model_inputs(ctx, cont, max_length)
        sharing.setdefault((tuple(inp), n), []).append(i)
    return sharing, [cont for _, cont in pairs]


@torch.no_grad()
def loglikelihoods(
    model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16, max_length: int = 2048,
    show_progress: bool = False,
) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, is_greedy) per request, in request order."""
    if batch_size < 1:
        raise AsftError(f"batch size must be at least 1, got {batch_size}")
    sharing, conts = requests_by_input(tokenizer, requests, max_length)
    unique = list(sharing)
    order = sorted(range(len(unique)), key=lambda u: (-len(unique[u][0]), u))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress(batches, "zero-shot batches", show_progress):
        width = max(len(unique[u][0]) for u in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, u in enumerate(batch):
            inp = unique[u][0]
            ids[row, : len(inp)] = torch.tensor(inp)
            mask[row, : len(inp)] = 1
        # positions whose logits predict a continuation token, over the whole batch
        first = min(len(unique[u][0]) - unique[u][1] for u in batch)
        keep = torch.arange(first, width)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device),
                       use_cache=False).logits
        logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
        for row, u in enumerate(batch):
            length, n = len(unique[u][0]), unique[u][1]
            lp = logprobs[row, length - n - first : length - first]  # [n, vocab]
            greedy = lp.argmax(-1)
            for i in sharing[unique[u]]:
                target = torch.tensor(conts[i])
                results[i] = (float(lp.gather(1, target[:, None]).sum()), bool((greedy == target).all()))
    return results


def item_metrics(items: list[Item], scores: list[list[tuple[float, bool]]], metrics: tuple[str, ...]) -> dict:
    """Aggregate per-item scores into lm-eval's metrics (means over items)."""
    out: dict = {"n": len(items)}
    lls = [np.array([s[0] for s in item_scores]) for item_scores in scores]
    if "ppl" in metrics:  # lambada: one request per item
        out["acc"] = float(np.mean([item_scores[0][1] for item_scores in scores]))
        out["ppl"] = math.exp(-math.fsum(float(ll[0]) for ll in lls) / len(items))
        return out
    out["acc"] = float(np.mean([int(np.argmax(ll)) == it.gold for ll, it in zip(lls, items)]))
    if "acc_norm" in metrics:
        out["acc_norm"] = float(np.mean([int(np.argmax(ll / np.array(it.lengths, dtype=float))) == it.gold
                                         for ll, it in zip(lls, items)]))
    return out


def score_items(model, tokenizer, items: list[Item], metrics: tuple[str, ...], batch_size: int = 16,
                max_length: int = 2048, show_progress: bool = False) -> dict:
    """Run every request of every item, then aggregate."""
    results = loglikelihoods(model, tokenizer, all_requests(items), batch_size, max_length, show_progress)
    return item_metrics(items, per_item(items, results), metrics)


def all_requests(items: list[Item]) -> list[tuple[str, str]]:
    return [req for it in items for req in it.requests]


def per_item(items: list[Item], results: list) -> list[list]:
    """The results of all_requests(items), cut into one list per item."""
    scores, at = [], 0
    for it in items:
        scores.append(results[at : at + len(it.requests)])
        at += len(it.requests)
    return scores


def evaluate_task(model, tokenizer, name: str, data_dir: str | None = None, limit: int | None = None,
                  batch_size: int = 16, max_length: int = 2048, show_progress: bool = False) -> dict:
    """{"task", "n", "acc", ["acc_norm" | "ppl"], "seconds"} for one task."""
    start = time.perf_counter()
    items = load_task(name, data_dir, limit)
    result = score_items(model, tokenizer, items, task_metrics(name), batch_size, max_length, show_progress)
    return {"task": name, **result, "seconds": time.perf_counter() - start}


def evaluate_tasks(model, tokenizer, names: list[str], data_dir: str | None = None, limit: int | None = None,
                   batch_size: int = 16, max_length: int = 2048, show_progress: bool = False) -> dict:
    """{task name: evaluate_task result}, plus "mean_acc" over the tasks' acc."""
    return tasks_summary({n: evaluate_task(model, tokenizer, n, data_dir, limit, batch_size, max_length, show_progress)
                          for n in names})


def tasks_summary(results: dict) -> dict:
    """{"tasks": {task name: its result}, "mean_acc": the mean of their acc}."""
    return {"tasks": results, "mean_acc": float(np.mean([r["acc"] for r in results.values()]))}
