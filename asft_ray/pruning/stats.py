"""Input statistics of a decoder layer's linears, summed over calibration tokens in float64
(Hessians: in the dtype `hessian_dtype` gives for the linear's weights).

Linears fed the very same tensor (q/k/v, gate/up) share one accumulator, so each
statistic is computed once per distinct input.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class InputStats:
    """Summed input statistics of one layer's linears (plain data: picklable, addable)."""

    source: dict[str, str] = field(default_factory=dict)  # linear -> linear whose accumulator it shares
    sq_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_t x_t (input means, with `tokens`)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # tokens seen (a float64 scalar)

    def get(self, stat: str, name: str) -> torch.Tensor:
        """Statistic `stat` (a name in asft_ray.methods.INPUT_STATS) of linear `name`'s input."""
        table = {"sq_norms": self.sq_norms, "hessian": self.hessians, "sums": self.sums, "tokens": self.tokens}[stat]
        return table[self.source[name]]

    def sq_norm(self, name: str) -> torch.Tensor:
        return self.sq_norms[self.source[name]]

    def hessian(self, name: str) -> torch.Tensor:
        return self.hessians[self.source[name]]

    def __add__(self, other: "InputStats") -> "InputStats":
        return InputStats(
            {**self.source, **other.source},
            _add_dicts(self.sq_norms, other.sq_norms),
            _add_dicts(self.hessians, other.hessians),
            _add_dicts(self.sums, other.sums),
            _add_dicts(self.tokens, other.tokens),
        )


def _add_dicts(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}


def sum_in_order(parts) -> InputStats:
    """Add partial statistics left to right, as they come (`parts` may be a generator, so only
    one part lives beside the total). A fixed order keeps float64 sums bit-identical however
    the parts were spread over workers."""
    total = InputStats()
    for part in parts:
        total = total + part
    return total


GRAM_ROWS = 256  # rows of a Hessian computed at a time: 256 x 5632 float64 is 11 MB


def hessian_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a linear's Hessian is summed in, from its weights'; the solves that factor it
    (SparseGPT, OBS, structured refits) then work in the Hessian's dtype.

    float32 weights: float64, as they always were. 16-bit weights: float32, as the reference
    SparseGPT does for every model. Their pruned values are rounded to 8 (bf16) or 11 (fp16)
    mantissa bits, far coarser than float32's rounding of the sums and the factorisation, and the
    Hessian is the largest thing a solve holds (8 x 28672^2 = 6.6 GB for a 70 B Llama's down_proj
    input in float64, half that in float32; GPUs without fast float64 factor it many times slower).
    The one rule: every path that sums a Hessian reads its dtype from here."""
    return torch.float64 if weight_dtype.itemsize >= 4 else torch.float32


def gram_rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of x^T x, in float32, for a contiguous x (tokens x width).

    The one way every Hessian here is computed, whole or in blocks, so every path gives the same
    bits (on this CPU's BLAS the blocks also equal the rows of one whole product: tested)."""
    return x[:, start:stop].T @ x


def add_gram(total: torch.Tensor | None, x: torch.Tensor, rows: int = GRAM_ROWS,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """total + x^T x: the gram in float32, summed in the total's dtype (`dtype` for the first one,
    which is just widened; float64, or float32 for a 16-bit linear: `hessian_dtype`).

    The one rule for a Hessian's sum: LayerInputStats adds each sample's gram with it and
    `hessian_of` repeats it on inputs shipped to another actor, so both give the same bits.
    A block of rows at a time, so that neither the float32 gram nor a float64 copy of it
    (torch widens a mixed-dtype operand whole on the CPU) ever exists whole: 127 + 254 MB for
    the 5632-wide down_proj input of a 1.57 B model, a few MB per block."""
    x = x.contiguous()
    width = x.shape[1]
    first = total is None
    if first:
        total = torch.empty(width, width, dtype=dtype, device=x.device)
    for start in range(0, width, rows):
        block = gram_rows(x, start, start + rows)
        if first:
            total[start : start + rows].copy_(block)
        else:
            total[start : start + rows].add_(block)
    return total


def hessian_of(samples, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """sum_s x_s^T x_s over one chunk's samples (each tokens x width, float32), summed in `dtype`,
    exactly as LayerInputStats sums them while the layer runs."""
    total = None
    for x in samples:
        total = add_gram(total, x, dtype=dtype)
    return total


def add_hessian_of(total: torch.Tensor, samples, rows: int = GRAM_ROWS) -> torch.Tensor:
    """total += hessian_of(samples) in place, with the same bits, a block of rows at a time: the
    chunk's partial never exists whole (254 MB for a 5632-wide input), only one block of it."""
    xs = [x.contiguous() for x in samples]
    for start in range(0, total.shape[0], rows):
        part = None
        for x in xs:
            block = gram_rows(x, start, start + rows)
            part = block.to(total.dtype) if part is None else part.add_(block)  # float32: the fresh block itself
        total[start : start + rows].add_(part)
    return total


def inputs_are_smaller(tokens: int, width: int, dtype: torch.dtype) -> bool:
    """Whether a chunk's float32 inputs (tokens x width) take fewer bytes than their Hessian
    (width x width, of `dtype`): true for wide inputs and short chunks, e.g. a 5632-wide MLP input
    over 1024 tokens (23 MB against 254 MB in float64), and ever more so at 70 B widths."""
    return tokens * 4 < width * dtype.itemsize


class StopLayer(Exception):
    """Raised by the hooks once every watched linear has seen its input: the rest of the layer's forward is not needed."""


def input_groups(stats: InputStats) -> list[list[str]]:
    """The linears grouped by the input they share (q/k/v, o, gate/up, down in a Llama layer),
    in the order the layer computes those inputs."""
    return [[name for name, source in stats.source.items() if source == first] for first in stats.sq_norms]


class LayerInputStats:
    """Forward hooks that add up, per linear input: sum_t x_t^2 (Wanda), sum_t x_t and the token count
    (input means: DSnoT) and optionally sum_t x_t x_t^T (SparseGPT).

    With `stop_early`, the hooks raise StopLayer as soon as every linear in `linears` has seen
    its input in the current pass (used to collect one group's statistics without running
    the rest of the layer)."""

    def __init__(self, linears: dict[str, nn.Linear], hessian: bool, stop_early: bool = False,
                 keep_inputs: Collection[str] = ()):
        self.linears = linears
        self.keep_inputs = set(keep_inputs)  # sources whose inputs are kept (float32, per sample) instead of a Hessian
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.stop_early = stop_early
        self._fired: set[str] = set()
        self.want_hessian = hessian
        self.sq_norms: dict[str, torch.Tensor] = {}
        self.hessians: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, torch.Tensor] = {}
        self.source: dict[str, str] = {}  # linear name -> name of the linear whose accumulator it shares
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._handles: list = []

    def __enter__(self) -> "LayerInputStats":
        for name, linear in self.linears.items():
            self._handles.append(linear.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def begin_sample(self) -> None:
        """Call before each forward pass: inputs are matched by identity within one pass only."""
        self._seen.clear()
        self._fired.clear()

    def _hook(self, name: str):
        def hook(module, args, output):
            self._record(name, args[0])
            self._fired.add(name)
            if self.stop_early and len(self._fired) == len(self.linears):
                raise StopLayer

        return hook

    def _record(self, name: str, x: torch.Tensor) -> None:
        for seen_x, seen_name in self._seen:
            if seen_x is x:
                self.source[name] = seen_name
                return
        self._seen.append((x, name))
        self.add(name, x)

    def add(self, name: str, x: torch.Tensor) -> None:
        self.source.setdefault(name, name)
        x = x.detach().reshape(-1, x.shape[-1]).float()
        sq = x.pow(2).sum(0, dtype=torch.float64)
        self.sq_norms[name] = self.sq_norms[name] + sq if name in self.sq_norms else sq
        total = x.sum(0, dtype=torch.float64)
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        count = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
        self.tokens[name] = self.tokens[name] + count if name in self.tokens else count
        if self.want_hessian and name in self.keep_inputs:  # a copy: the layer's forward must not change it
            self.inputs.setdefault(name, []).append(x.clone(memory_format=torch.contiguous_format))
        elif self.want_hessian:
            self.hessians[name] = add_gram(self.hessians.get(name), x, dtype=hessian_dtype(self.linears[name].weight.dtype))

    def result(self) -> InputStats:
        return InputStats(dict(self.source), dict(self.sq_norms), dict(self.hessians), dict(self.sums),
                          dict(self.tokens))
