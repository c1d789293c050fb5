"""Training windows as a pure function of (seed, step): the data order a resumed run replays.

The C4 documents are tokenized once into one stream (documents joined by EOS). Each optimizer
step draws `world * grad_accum * micro_batch` window starts from a generator seeded by
(seed, step) alone; worker `rank` takes its slice for each accumulation micro-step. No
iterator state, so resuming at step k needs nothing but k.
"""

from __future__ import annotations

import random

import torch

from asft_ray.errors import AsftError


def token_stream(documents: list[str], tokenizer) -> torch.Tensor:
    """All documents tokenized and joined with EOS, as one int32 tensor."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in documents:
        ids.extend(tokenizer(text).input_ids + eos)
    return torch.tensor(ids, dtype=torch.int32)


def step_starts(seed: int, step: int, count: int, stream_len: int, seqlen: int) -> list[int]:
    """`count` window starts for one optimizer step; the same (seed, step) always gives the same list."""
    if stream_len <= seqlen:
        raise AsftError(f"the training text has {stream_len} tokens, not more than one window of {seqlen}")
    rng = random.Random(f"asft-recover:{seed}:{step}")  # str seeds hash with sha512: stable across runs
    return [rng.randrange(0, stream_len - seqlen) for _ in range(count)]


def micro_batch(
    stream: torch.Tensor, seed: int, step: int, micro: int, rank: int, world: int, micro_size: int, grad_accum: int,
    seqlen: int,
) -> torch.Tensor:
    """Token ids [micro_size, seqlen] of worker `rank` for accumulation micro-step `micro` of `step`."""
    starts = step_starts(seed, step, world * grad_accum * micro_size, len(stream), seqlen)
    first = (micro * world + rank) * micro_size
    rows = [stream[s : s + seqlen] for s in starts[first : first + micro_size]]
    return torch.stack(rows).long()
