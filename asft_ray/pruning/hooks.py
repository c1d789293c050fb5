"""What `engine.prune_model` can be given besides the model and the method: where the work runs
(`Runner`), where the layers live (`LayerStore`), what is saved for resuming (`Checkpoint`) and how
gradients are summed (`GradientSummer`), gathered in one `EngineHooks`. The defaults run
everything in this process on a model that is entirely in memory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from torch import nn


class LayerStore(Protocol):
    """Where decoder layers live: `engine.ResidentLayers` (in the model) or
    `pruning.streaming.StreamedLayers` (read from safetensors shards, written and freed after)."""

    def load(self, index: int, layer: nn.Module) -> None:
        """Make layer `index`'s weights available before it is used."""

    def release(self, index: int, layer: nn.Module) -> None:
        """Layer `index` is final (pruned): keep or write it, and free it if it does not stay in memory."""

    def free(self, index: int, layer: nn.Module) -> None:
        """Layer `index` is not needed for now (it will be loaded again): free it without writing."""

    def after_capture(self, model: nn.Module) -> None:
        """Layer 0's inputs are captured: the embeddings are no longer needed."""


class Checkpoint(Protocol):
    """Finished layers of a layer-wise run (`pruning.checkpoint.LayerCheckpoint`)."""

    def completed(self) -> list[dict]:
        """The report rows of the layers finished so far, in order."""

    def load_layer(self, index: int, layer: nn.Module) -> None:
        """Restore finished layer `index`'s weights."""

    def save_layer(self, index: int, layer: nn.Module, row: dict) -> None:
        """Save finished layer `index` with its report row."""


GradientSummer = Callable[..., dict]
"""(model, calib_ids, show_progress, lm_head=...) -> {(layer, linear): (sum dL/dW, sum (dL/dW)^2)}."""


@dataclass(frozen=True)
class EngineHooks:
    """Where and how the engine's work is done. Every field None = the in-process default:
    `make_runner` engine.LocalRunner, `layer_store` engine.ResidentLayers, no checkpoint,
    `sum_gradients` engine.chunked_gradient_sums."""

    make_runner: Callable | None = None  # (inputs, args, kwargs) -> Runner (layer-wise methods)
    layer_store: LayerStore | None = None
    checkpoint: Checkpoint | None = None  # layer-wise methods: save each finished layer, resume after them
    sum_gradients: GradientSummer | None = None  # gradient methods on a model in memory
