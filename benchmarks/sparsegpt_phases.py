"""Private memory of each SparseGPT step a scoring actor runs, on one layer of the 1.57 B model's shape.

The steps of distributed/sharded.py, called in process (no Ray, so no object-store pages: this is
what each step adds to an actor's *private* memory, RssAnon):

  * stats: one 4-sample chunk of 256 tokens through a Llama decoder layer (hidden 2048, MLP 5632),
    summing the float64 Hessians of its 4 distinct inputs (engine.chunk_stats);
  * add: the owner's step of the in-order sum, total + partial, for down_proj's 5632-wide input;
  * solve: down_proj pruned to 50 % with its weight update, from a read-only Hessian (as an actor
    reads it from the object store).

Each step runs in a fresh process; the number is its peak resident size above what it held just
before the step (/proc/self/status VmHWM after clear_refs). Run it with the code to measure first
on PYTHONPATH, e.g. once for main and once for a branch:

    PYTHONPATH=/work/main python benchmarks/sparsegpt_phases.py --tag main
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

TOKENS, SAMPLES = 256, 4


def step(name: str, HIDDEN: int, MLP: int) -> dict:
    import numpy as np
    from results_io import peak_above_start
    import torch

    torch.set_num_threads(1)  # as a single-thread scoring actor
    torch.manual_seed(0)
    if name == "stats":
        from transformers import LlamaConfig, LlamaForCausalLM

        from asft_ray.models import decoder_layers
        from asft_ray.pruning.engine import capture_layer0_inputs, chunk_stats

        config = LlamaConfig(vocab_size=1000, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=1,
                             num_attention_heads=HIDDEN // 128, num_key_value_heads=HIDDEN // 128)
        model = LlamaForCausalLM(config).eval()
        inputs, args, kwargs = capture_layer0_inputs(model, torch.randint(0, 1000, (SAMPLES, TOKENS)))
        run = lambda: chunk_stats(decoder_layers(model)[0], inputs, args, kwargs, hessian=True)  # noqa: E731
    elif name == "add":
        total = torch.from_numpy(np.random.rand(MLP, MLP))
        part = torch.from_numpy(np.random.rand(MLP, MLP))
        run = lambda: total + part  # noqa: E731
    else:
        from asft_ray.config import Pattern
        from asft_ray.pruning.engine import prune_weight

        x = torch.randn(SAMPLES * TOKENS * 2, MLP)
        hessian = (x.T @ x).double().numpy()
        hessian.flags.writeable = False  # read-only, like an object-store buffer
        del x
        weight = torch.randn(HIDDEN, MLP)
        run = lambda: prune_weight("sparsegpt", weight, Pattern.parse("unstructured"), 0.5,  # noqa: E731
                                   hessian=torch.from_numpy(hessian))
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    result, peak = peak_above_start(run)
    peak /= 2**20
    del result
    return {"step": name, "peak_above_start_mib": round(peak, 1)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag", required=True, help="which code this is (main, a branch...)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--mlp", type=int, default=5632)
    parser.add_argument("--step", choices=["stats", "add", "solve"], help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.step:
        print(json.dumps(step(opts.step, opts.hidden, opts.mlp)))
        return
    import asft_ray

    rows = []
    for name in ("stats", "add", "solve"):
        out = subprocess.run([sys.executable, __file__, "--tag", opts.tag, "--step", name,
                              "--hidden", str(opts.hidden), "--mlp", str(opts.mlp)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    matrix_mib = opts.mlp * opts.mlp * 8 / 2**20
    from results_io import append_row

    append_row("sparsegpt_phases", {"tag": opts.tag, "asft_ray": asft_ray.__file__, "hidden": opts.hidden,
                                    "mlp": opts.mlp, "down_hessian_mib": round(matrix_mib, 1), "steps": rows})


if __name__ == "__main__":
    main()
