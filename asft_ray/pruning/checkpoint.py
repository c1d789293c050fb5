"""Per-layer checkpoints of the layer-wise engine, so that a killed run resumes after the last
finished layer and ends with exactly the weights of an uninterrupted run.

The folder holds one safetensors file per pruned layer and `state.json` (the run's identity
and the report rows of the finished layers). Files are written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from asft_ray.artifacts import same_run, write_json_atomic

LAYERS_STATE = "state.json"


class LayerCheckpoint:
    def __init__(self, folder: Path, identity: dict, resume: bool):
        self.folder = Path(folder)
        self.identity = identity
        state = self._read_state()
        if resume and state is not None and same_run(state.get("identity"), identity):
            self.rows = state["layers"]
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            self.rows = []
            self._write_state()

    def _read_state(self) -> dict | None:
        try:
            return json.loads((self.folder / LAYERS_STATE).read_text())
        except (OSError, ValueError):
            return None

    def _write_state(self) -> None:
        write_json_atomic(self.folder / LAYERS_STATE, {"identity": self.identity, "layers": self.rows})

    def _path(self, index: int) -> Path:
        return self.folder / f"layer-{index:04d}.safetensors"

    def completed(self) -> list[dict]:
        """Report rows of the layers already pruned, in order."""
        return list(self.rows)

    def load_layer(self, index: int, layer: nn.Module) -> None:
        layer.load_state_dict(load_file(self._path(index)), strict=True)

    def save_layer(self, index: int, layer: nn.Module, row: dict) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in layer.state_dict().items()}  # written, not kept: no copy
        tmp = self._path(index).with_suffix(".tmp")
        save_file(tensors, tmp)
        os.replace(tmp, self._path(index))
        self.rows.append(row)
        self._write_state()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
