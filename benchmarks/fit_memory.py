"""What block reconstruction's fit of one decoder layer adds to a process's peak RSS, in float32 layers.

    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/fit_memory.py --config /work/runs-large/model-fp32/config.json

(the 1.57 B benchmark model's layer; the malloc setting the pruning workers get, distributed/runner.py)

One random-init decoder layer of the given Llama config (float32, every linear 50 % pruned by
magnitude), `--samples` random rows of `--seqlen` tokens as its inputs, the inputs plus noise as the
targets; `Reconstruction(epochs, lr).fit` as a runner calls it (pruning/reconstruct.py). The peak is
the kernel's VmHWM, reset just before the fit (/proc/self/clear_refs), minus the RSS before it: the
masks, Adam's moments, the gradients, autograd's activations and the allocator's slack, without the
layer itself or the process. One JSON line to benchmarks/results/fit_memory.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import append_row, peak_above_start  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="a Llama config.json")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    opts = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from asft_ray.models import prunable_linears
    from asft_ray.pruning.engine import capture_layer0_inputs
    from asft_ray.pruning.reconstruct import Reconstruction

    torch.manual_seed(0)
    torch.set_num_threads(1)
    values = json.loads(Path(opts.config).read_text())
    config = LlamaConfig(**{**values, "num_hidden_layers": 1, "vocab_size": 512, "tie_word_embeddings": True})
    model = LlamaForCausalLM(config).float().eval()
    ids = torch.randint(0, 512, (opts.samples, opts.seqlen))
    inputs, args, kwargs = capture_layer0_inputs(model, ids)
    layer = model.model.layers[0]
    with torch.no_grad():
        for lin in prunable_linears(layer).values():
            w = lin.weight
            w.mul_(w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values)
    targets = [x + 0.01 * torch.randn_like(x) for x in inputs]
    layer_bytes = sum(lin.weight.numel() * 4 for lin in prunable_linears(layer).values())

    start = time.perf_counter()
    row, added = peak_above_start(lambda: Reconstruction(opts.epochs, opts.lr).fit(
        layer, inputs.__getitem__, targets.__getitem__, opts.samples, args, kwargs, 0))
    seconds = time.perf_counter() - start
    result = {"config": opts.config, "hidden": config.hidden_size, "intermediate": config.intermediate_size,
              "samples": opts.samples, "seqlen": opts.seqlen, "epochs": opts.epochs, "layer_bytes": layer_bytes,
              "fit_peak_added_bytes": added, "fit_peak_added_layers": round(added / layer_bytes, 3),
              "fit_s": round(seconds, 2), "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "default"),
              **row}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    append_row("fit_memory", {**result, "commit": commit})


if __name__ == "__main__":
    main()
