"""Taylor and Fisher scores of a model that is never whole in memory: a layer-streamed backward.

`engine.gradient_sums` backpropagates the causal-LM loss of each calibration sample through the
whole model. The same gradients, one decoder layer in memory at a time:

  1. forward: capture layer 0's inputs, then push every sample through the dense layers one
     layer at a time (each read from the shards and freed), keeping each layer's inputs;
  2. the loss: final norm + lm_head + cross-entropy of each sample; its gradient with respect to
     the last layer's outputs;
  3. backward, top layer first: read the layer, recompute its forward from the kept inputs and
     backpropagate each sample's output gradient through it. That gives the gradient of every
     linear in the layer (summed over samples in float64: sum g for Taylor, sum g^2 for Fisher,
     per sample as `gradient_sums` does) and the gradient with respect to the layer's inputs,
     which goes on to the layer below. Then the layer is pruned with the dense model's gradients
     (as in memory), written and freed.

Memory: one layer, the summed gradients of that layer's linears, and the calibration
activations of every layer (samples x tokens x hidden x 4 bytes per layer).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from asft_ray.eval.sparsity import linear_sparsity
from asft_ray.models import decoder_layers, prunable_linears
from asft_ray.progress import progress


def _layer_output(layer, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = layer(x, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def loss_gradients(final, hidden: list[torch.Tensor], ids: torch.Tensor) -> list[torch.Tensor]:
    """d(mean next-token NLL of each sample) / d(its last-layer outputs); `final` is norm + lm_head."""
    saved = {p: p.requires_grad for p in final.parameters()}
    for p in final.parameters():
        p.requires_grad_(False)  # only the activations' gradient is wanted
    grads = []
    try:
        for h, row in zip(hidden, ids):
            h = h.detach().requires_grad_(True)
            logits = final(h)
            F.cross_entropy(logits[0, :-1].float(), row[1:].to(logits.device), reduction="mean").backward()
            grads.append(h.grad)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return grads


def layer_backward(layer, inputs: list[torch.Tensor], out_grads: list[torch.Tensor], args: tuple, kwargs: dict,
                   squared: bool) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """({linear: sum over samples of dL/dW (or of its square)} in float64, [dL/d(input) per sample])."""
    linears = prunable_linears(layer)
    saved = {p: p.requires_grad for p in layer.parameters()}
    for p in layer.parameters():
        p.requires_grad_(False)
    for linear in linears.values():
        linear.weight.requires_grad_(True)
    sums = {name: torch.zeros_like(linear.weight, dtype=torch.float64) for name, linear in linears.items()}
    in_grads = []
    try:
        for x, grad in zip(inputs, out_grads):
            x = x.detach().requires_grad_(True)
            _layer_output(layer, x, args, kwargs).backward(grad)
            for name, linear in linears.items():
                g = linear.weight.grad.double()
                sums[name].add_(g * g if squared else g)
                linear.weight.grad = None
            in_grads.append(x.grad)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return sums, in_grads


def prune_with_layer_gradients(model, calib_ids: torch.Tensor, method: str, pattern, sparsity, layer_store,
                               show_progress: bool = True) -> list[dict]:
    """Taylor/Fisher pruning of every decoder linear, one layer in memory (see the module docstring)."""
    from asft_ray.eval.streamed import FinalHead
    from asft_ray.pruning.engine import capture_layer0_inputs, computing_copy, prune_weight, sparsity_of

    inputs, args, kwargs = capture_layer0_inputs(model, calib_ids)
    layers = decoder_layers(model)
    kept = []  # kept[i]: the inputs of layer i, one tensor per sample
    with torch.no_grad():
        for index, layer in enumerate(progress(layers, f"{method} forward", show_progress)):
            layer_store.load(index, layer)
            compute = computing_copy(layer)
            kept.append(inputs)
            inputs = [_layer_output(compute, x, args, kwargs) for x in inputs]
            del compute
            layer_store.free(index, layer)  # read again, and written, on the way back
    head = computing_copy(FinalHead(model.base_model.norm, model.get_output_embeddings()))
    out_grads = loss_gradients(head, inputs, calib_ids)
    del inputs, head
    rows = {}
    from asft_ray.methods import resolve

    squared = "grad_sq_sum" in resolve(method).needs  # the one sum the method reads (taylor: grad_sum)
    for index in progress(reversed(range(len(layers))), f"{method} backward", show_progress):
        start = time.perf_counter()
        layer = layers[index]
        layer_store.load(index, layer)
        compute = computing_copy(layer)
        sums, out_grads = layer_backward(compute, kept.pop(), out_grads, args, kwargs, squared)
        del compute
        key = "grad_sq_sum" if squared else "grad_sum"
        with torch.no_grad():
            for name, linear in prunable_linears(layer).items():
                linear.weight.data = prune_weight(method, linear.weight.data, pattern, sparsity_of(sparsity, index, name),
                                                  **{key: sums.pop(name)})
        rows[index] = {"layer": index, "seconds": time.perf_counter() - start,
                       **linear_sparsity(prunable_linears(layer))}
        layer_store.release(index, layer)
    return [rows[i] for i in range(len(layers))]
