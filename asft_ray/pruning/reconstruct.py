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
order per epoch; plain torch Adam on the float32 kept weights. Where a layer is fitted does not
change the result, so it is the same for any number of workers. Memory where it runs, beside the
float32 layer (Adam moves its weights in place): Adam's two moments of its linears, the masks (1 byte
a weight), one linear's gradient and Adam's temporaries for that linear (each linear steps inside
the backward), one sample's activations: 3.2 x the layer's float32 bytes at the peak, measured on
a layer of the 1.57 B benchmark model (benchmarks/fit_memory.py). Pure torch; the runners
(engine.LocalRunner, distributed.sharded.ShardedRunner) say where a layer is fitted: in process,
or on one scoring actor (which fetches one sample at a time from the object store and fits a
private copy of the layer: the store's is read-only), so the pruning
coordinator never holds Adam's state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from asft_ray.models import prunable_linears


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


@torch.no_grad()
def fit_layer(layer: nn.Module, backward_of: SampleBackward, n_samples: int, epochs: int, lr: float,
              seed: int) -> dict:
    """Adam on the kept weights of `layer`'s prunable linears, one sample per step, `epochs` passes in
    an order drawn from `seed`. Each linear steps as soon as the backward has its gradient (Adam's
    update of one tensor depends on that tensor's gradient and state only, so this equals one step
    of all of them after the backward, bit for bit), and its gradient is freed before the next one
    exists. The weights are set in place, in their own dtype, zero where they were zero. Returns the
    mean loss of the first and of the last epoch (the report's row)."""
    linears = prunable_linears(layer)
    keep = {name: lin.weight != 0 for name, lin in linears.items()}
    # What Adam moves: a float32 weight itself (the runners fit a float32 layer: no second copy of
    # it), else a float32 copy written back after each step.
    in_place = {name: lin.weight.dtype == torch.float32 for name, lin in linears.items()}
    masters = {name: lin.weight.data if in_place[name] else lin.weight.detach().float().clone()
               for name, lin in linears.items()}
    # foreach=False: the per-tensor update, as on the CPU by default; the multi-tensor one (CUDA's
    # default) makes temporaries the size of all the layer's weights
    optimizers = {name: torch.optim.Adam([master], lr=lr, foreach=False) for name, master in masters.items()}

    def step(name: str, gradient: torch.Tensor) -> None:
        master, lin = masters[name], linears[name]
        master.grad = gradient.to(master.device, torch.float32).mul_(keep[name])  # in place: no second copy
        del gradient
        optimizers[name].step()
        master.grad = None
        if in_place[name]:  # (not `lin.weight.data is master`: .data is a new tensor object at every access)
            master.mul_(keep[name])  # already zero there (zero gradients, no decay): kept exact
        else:  # the next sample's forward sees the new weights
            lin.weight.data = master.to(lin.weight.dtype) * keep[name]

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
