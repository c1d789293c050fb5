"""Block reconstruction: after a decoder layer's linears are pruned, fit the weights they kept so
that the sparse layer, fed the sparse model's own inputs, reproduces the dense model's hidden
states at that depth. The masks stay exact: gradients are zero outside them, so Adam never moves
a pruned weight.

Per-linear methods (SparseGPT's update, +obs, +lsq) solve each linear on its own inputs; this fits
the whole layer (attention and MLP together, through the nonlinearities) and, because the target
is the *dense* model's hidden state while the input is the *sparse* model's, it also corrects the
error the layers before it left (as in EBFT, Guo et al. 2024, and the block-wise reconstruction of
BRECQ/OmniQuant-style calibration).

One step = one calibration sample: d/dW of mean((layer(x_k) - dense_k)^2), samples in a seeded
order per epoch; torch's Adam update on the float32 kept weights. Where a layer is fitted does not
change the result, so it is the same for any number of workers. Memory where it runs, beside the
float32 layer (moved in place): Adam's two moments of the kept weights only (1 layer at 50 %), the
masks (1 bit a weight), one linear's gradient (each linear steps inside the backward) and one
block of rows' temporaries, one sample's activations: about 1.8 x the layer's float32 bytes at the
peak, measured on a layer of the 1.57 B benchmark model at 50 % (benchmarks/fit_memory.py). Pure
torch; the runners (engine.LocalRunner, distributed.sharded.ShardedRunner) say where a layer is
fitted: in process, or on one scoring actor (which fetches one sample at a time from the object
store and fits a private copy of the layer: the store's is read-only), so the pruning coordinator
never holds Adam's state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.adam import adam

from asft_ray.models import prunable_linears
from asft_ray.recovery.masks import PackedMask


def sample_backward(layer: nn.Module, x: torch.Tensor, target: torch.Tensor, args: tuple, kwargs: dict,
                    on_gradient: Callable[[str, torch.Tensor], None]) -> float:
    """Backpropagate one sample's loss = mean((layer(x) - target)^2) (`layer` in float32) and hand each
    prunable linear's weight gradient to `on_gradient(name, gradient)` the moment the backward has
    finished it, then drop it: the linears' gradients never all exist at once (the optimizer can step
    one linear inside the backward: that linear's weight is no longer needed by it). Returns the loss."""
    from asft_ray.pruning.engine import run_layer

    weights = {name: lin.weight for name, lin in prunable_linears(layer).items()}

    def handler(name: str):
        def hook(weight: torch.Tensor) -> None:
            gradient, weight.grad = weight.grad, None
            on_gradient(name, gradient)
        return hook

    with torch.enable_grad():
        for w in weights.values():
            w.requires_grad_(True)
        hooks = [w.register_post_accumulate_grad_hook(handler(name)) for name, w in weights.items()]
        try:
            loss = F.mse_loss(run_layer(layer, x, args, kwargs), target)
            loss.backward()
        finally:
            for w in weights.values():
                w.requires_grad_(False)
            for hook in hooks:
                hook.remove()
    return float(loss.detach())


# backward_of(layer, k, on_gradient) -> sample k's loss, each linear's gradient handed to on_gradient
# as it is finished (sample_backward); where the samples are is the runner's
SampleBackward = Callable[[nn.Module, int, Callable[[str, torch.Tensor], None]], float]


BLOCK_ELEMENTS = 1 << 20  # weights per block of rows: what one Adam update gathers, and its temporaries


@dataclass
class _Block:
    """Rows `rows` of one linear: which weights are kept (1 bit each) and Adam's state for those only."""

    rows: slice
    mask: PackedMask
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor


def _blocks(weight: torch.Tensor, block_elements: int) -> list[_Block]:
    per_block = max(1, block_elements // weight.shape[1])
    blocks = []
    for start in range(0, weight.shape[0], per_block):
        rows = slice(start, start + per_block)
        keep = weight[rows] != 0
        kept = int(keep.sum())
        blocks.append(_Block(rows, PackedMask.pack(keep), weight.new_zeros(kept), weight.new_zeros(kept),
                             torch.tensor(0.0)))  # as torch.optim.Adam makes them (the step on the CPU)
    return blocks


@torch.no_grad()
def fit_layer(layer: nn.Module, backward_of: SampleBackward, n_samples: int, epochs: int, lr: float,
              seed: int, block_elements: int = BLOCK_ELEMENTS) -> dict:
    """Adam on the kept weights of `layer`'s prunable linears (float32), one sample per step, `epochs`
    passes in an order drawn from `seed`; the weights are moved in place, zero where they were zero.
    Returns the mean loss of the first and of the last epoch (the report's row).

    Each linear steps as soon as the backward has its gradient, and that gradient is freed before
    the next one exists. A step goes through the linear a block of rows at a time: the block's kept
    weights and their gradients are gathered into short vectors, torch's Adam update
    (`torch.optim.adam.adam`, per tensor) moves them, and they are scattered back. Adam's moments
    are kept for the kept weights only. All of this gives the bits of one `torch.optim.Adam` over
    the whole weights with the pruned gradients zeroed, stepped after each backward (tested): the
    update is elementwise, a pruned weight's zero gradient keeps its moments and its step at zero,
    and a tensor's update depends only on its own gradient and state. What it saves: the moments of
    the pruned weights (half of Adam's state at 50 %), a byte-per-weight mask (bits instead), and
    Adam's temporaries the size of a whole linear (one block's now)."""
    linears = prunable_linears(layer)
    if any(lin.weight.dtype != torch.float32 for lin in linears.values()):
        raise ValueError("fit_layer moves float32 weights: fit a float32 copy of the layer")
    blocks = {name: _blocks(lin.weight, block_elements) for name, lin in linears.items()}

    def step(name: str, gradient: torch.Tensor) -> None:
        weight = linears[name].weight.data  # in place, outside autograd's version counting (as an optimizer)
        for block in blocks[name]:
            rows = weight[block.rows].view(-1)
            at = block.mask.unpack().nonzero().squeeze(1)  # where the kept weights are in these rows
            kept = rows.index_select(0, at)  # (index_select/index_copy_: 10x faster than masked_select on a CPU)
            adam([kept], [gradient[block.rows].reshape(-1).index_select(0, at)], [block.exp_avg], [block.exp_avg_sq],
                 [], [block.step], foreach=False, amsgrad=False, beta1=0.9, beta2=0.999, lr=lr, weight_decay=0.0,
                 eps=1e-8, maximize=False)
            rows.index_copy_(0, at, kept)

    order = torch.Generator().manual_seed(seed)
    epoch_losses = []
    for _ in range(epochs):
        losses = [backward_of(layer, k, step) for k in torch.randperm(n_samples, generator=order).tolist()]
        epoch_losses.append(math.fsum(losses) / len(losses))
    return {"reconstruction_loss_first_epoch": epoch_losses[0], "reconstruction_loss_last_epoch": epoch_losses[-1]}


@dataclass(frozen=True)
class Reconstruction:
    """The engine's block-reconstruction step: `epochs` passes over the calibration samples at
    Adam learning rate `lr`. A runner calls `fit` where the samples are: in process, or on one
    scoring actor per layer (then only that actor holds the layer's Adam state)."""

    epochs: int
    lr: float

    def fit(self, layer: nn.Module, sample: Callable[[int], torch.Tensor], target: Callable[[int], torch.Tensor],
            n_samples: int, args: tuple, kwargs: dict, index: int) -> dict:
        """fit_layer for decoder layer `index` (float32; its sample order is drawn from the index), with
        sample k's input `sample(k)` and the dense model's hidden state `target(k)`."""
        return fit_layer(layer, lambda lay, k, on_gradient: sample_backward(lay, sample(k), target(k), args, kwargs,
                                                                            on_gradient),
                         n_samples, self.epochs, self.lr, seed=index)
