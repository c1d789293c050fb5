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
change the result, so it is the same for any number of workers. Memory where it runs: the float32
layer (Adam moves its weights in place), Adam's two moments of its linears, one step's gradients,
the masks (1 byte a weight) and two samples' activations: about 4.25 x the layer's float32 bytes. Pure torch; the runners
(engine.LocalRunner, distributed.sharded.ShardedRunner) say where a layer is fitted: in process,
or on one scoring actor (which fetches one sample at a time from the object store), so the pruning
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


def sample_gradients(layer: nn.Module, x: torch.Tensor, target: torch.Tensor, args: tuple,
                     kwargs: dict) -> tuple[dict[str, torch.Tensor], float]:
    """({linear name: d loss / d weight}, loss) for one sample, loss = mean((layer(x) - target)^2);
    `layer` in float32. Only the prunable linears' weights get gradients."""
    from asft_ray.pruning.engine import run_layer

    weights = {name: lin.weight for name, lin in prunable_linears(layer).items()}
    with torch.enable_grad():
        for w in weights.values():
            w.requires_grad_(True)
        try:
            loss = F.mse_loss(run_layer(layer, x, args, kwargs), target)
            grads = torch.autograd.grad(loss, list(weights.values()))
        finally:
            for w in weights.values():
                w.requires_grad_(False)
    return dict(zip(weights, grads, strict=True)), float(loss.detach())


# gradients_of(layer, k) -> (sample k's gradients, its loss): where they are computed is the runner's
SampleGradients = Callable[[nn.Module, int], tuple[dict[str, torch.Tensor], float]]


@torch.no_grad()
def fit_layer(layer: nn.Module, gradients_of: SampleGradients, n_samples: int, epochs: int, lr: float,
              seed: int) -> dict:
    """Adam on the kept weights of `layer`'s prunable linears, one sample per step, `epochs` passes in
    an order drawn from `seed`. The weights are set in place, in their own dtype, zero where they
    were zero. Returns the mean loss of the first and of the last epoch (the report's row)."""
    linears = prunable_linears(layer)
    keep = {name: lin.weight != 0 for name, lin in linears.items()}
    # What Adam moves: a float32 weight itself (the runners fit a float32 layer: no second copy of
    # it), else a float32 copy written back after each step.
    masters = {name: lin.weight.data if lin.weight.dtype == torch.float32 else lin.weight.detach().float().clone()
               for name, lin in linears.items()}
    # foreach=False: the per-tensor update, as on the CPU by default; the multi-tensor one (CUDA's
    # default) makes temporaries the size of all the layer's weights
    optimizer = torch.optim.Adam(list(masters.values()), lr=lr, foreach=False)
    order = torch.Generator().manual_seed(seed)
    epoch_losses = []
    for _ in range(epochs):
        losses = []
        for k in torch.randperm(n_samples, generator=order).tolist():
            grads, loss = gradients_of(layer, k)
            losses.append(loss)
            for name, master in masters.items():  # in place: one set of gradients, not two
                master.grad = grads[name].to(master.device, torch.float32).mul_(keep[name])
            del grads
            optimizer.step()
            for name, lin in linears.items():  # the next sample's forward sees the new weights
                if lin.weight.data is masters[name]:
                    masters[name].mul_(keep[name])  # already zero there (zero gradients, no decay): kept exact
                else:
                    lin.weight.data = masters[name].to(lin.weight.dtype) * keep[name]
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
        return fit_layer(layer, lambda lay, k: sample_gradients(lay, sample(k), target(k), args, kwargs),
                         n_samples, self.epochs, self.lr, seed=index)
