"""The vocabulary-sized tables of a ZeRO-3 model, split into parts that are gathered one at a time.

ZeRO-3 gathers a whole parameter whenever its module runs. An untied input embedding and
LM head are vocab x hidden each (32000 x 1536 fp32 = 197 MB in a 0.5 B model, 128256 x 8192
bf16 = 2.1 GB in a 70 B one): gathered whole on every worker at each step, they set a floor
under every worker's memory that does not shrink with more workers. Here each is rebuilt as
`parts` smaller tables of consecutive vocabulary rows, each its own module, so ZeRO-3 gathers
and releases them one after another.

* `PartedEmbedding`: every part looks up every token (ids outside it clamped) and keeps the
  rows of the tokens it holds (`torch.where`): the very values of one whole lookup.
* `PartedHead`: the logits of each part, concatenated: the same logits (each is the same dot
  product). The gradient that flows back to the hidden states is summed over the parts, so it
  can differ from the whole head's in the last bits (float tolerance, tested).

Only untied tables are split (a tied head is the embedding: small models, where it does not
matter). The parts map to rows of the original tensors (`sources`), which the partitioned load
reads from and the export writes back to, so checkpoints on disk keep the usual names.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def part_rows(vocab: int, hidden: int, unit: int) -> list[int]:
    """Rows per part: as few parts as keep each one at most `unit` elements (ZeRO-3's unit, the
    largest decoder linear or 1e6: deepspeed_config.zero3_unit), rows spread as evenly as possible."""
    parts = max(1, math.ceil(vocab * hidden / max(1, unit)))
    return [vocab // parts + (k < vocab % parts) for k in range(parts)]


class PartedEmbedding(nn.Module):
    """An embedding table as consecutive row blocks, each an nn.Embedding."""

    def __init__(self, rows: list[int], hidden: int, dtype=None):
        super().__init__()
        # a ModuleDict, not a ModuleList: models.decoder_layers looks for the one ModuleList of layers
        self.parts = nn.ModuleDict({str(k): nn.Embedding(n, hidden, dtype=dtype) for k, n in enumerate(rows)})
        self.starts = [sum(rows[:k]) for k in range(len(rows))]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = None
        for start, part in zip(self.starts, self.parts.values()):
            inside = (ids >= start) & (ids < start + part.num_embeddings)
            rows = part((ids - start).clamp(0, part.num_embeddings - 1))  # every part runs: ZeRO-3's trace stays fixed
            out = rows if out is None else torch.where(inside.unsqueeze(-1), rows, out)
        return out


class PartedHead(nn.Module):
    """A bias-free output projection as consecutive row blocks, each an nn.Linear."""

    def __init__(self, rows: list[int], hidden: int, dtype=None):
        super().__init__()
        self.parts = nn.ModuleDict({str(k): nn.Linear(hidden, n, bias=False, dtype=dtype) for k, n in enumerate(rows)})

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(hidden) for part in self.parts.values()], dim=-1)


def split_vocab_tables(model: nn.Module, unit: int) -> dict[str, tuple[str, int]]:
    """Replace an untied model's input embedding and LM head by parted ones (call it where the new
    modules should be built, e.g. inside `deepspeed.zero.Init`). Returns the sources: for each new
    parameter, (the original parameter's name, its first row in it); {} when nothing was split
    (tied tables, a head with a bias, or tables that already fit in one unit)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (getattr(model.config, "tie_word_embeddings", True) or not isinstance(embedding, nn.Embedding)
            or not isinstance(head, nn.Linear) or head.bias is not None):
        return {}
    vocab, hidden = embedding.num_embeddings, embedding.embedding_dim
    rows = part_rows(vocab, hidden, unit)
    if len(rows) == 1 or head.out_features != vocab:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    embedding_name, head_name = names[id(embedding)], names[id(head)]
    dtype = next(iter(embedding.parameters())).dtype
    model.set_input_embeddings(PartedEmbedding(rows, hidden, dtype))
    model.set_output_embeddings(PartedHead(rows, hidden, dtype))
    starts = [sum(rows[:k]) for k in range(len(rows))]
    sources = {}
    for table in (embedding_name, head_name):
        for k, start in enumerate(starts):
            sources[f"{table}.parts.{k}.weight"] = (f"{table}.weight", start)
    return sources
