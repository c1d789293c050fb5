"""Scaling of sharded calibration scoring: 1 vs 2 single-thread Ray workers, side by side.

For the first `--layers` decoder layers of smollm2-135m, each worker count pushes the same
calibration windows through ShardedRunner.collect (Wanda statistics) and .advance (layer
outputs). Reports tokens/s per worker count and the ratio, and appends a JSON line to
benchmarks/results/scaling.jsonl. Run it on an otherwise idle machine.

    python benchmarks/scaling.py --layers 6 --nsamples 16 --seqlen 2048
"""

import argparse
import time

import ray
import torch
from results_io import append_row

from asft_ray.data import c4_documents, sample_calibration
from asft_ray.distributed.sharded import ShardedRunner, WorkerResources, start_workers
from asft_ray.models import decoder_layers, load_model
from asft_ray.pruning.engine import capture_layer0_inputs


def time_workers(n, model, inputs, args, kwargs, layers):
    workers = start_workers(n, WorkerResources(cpus=1))
    try:
        ray.get([w.ready.remote() for w in workers])
        runner = ShardedRunner(workers, inputs, args, kwargs)
        first = decoder_layers(model)[0]  # warm-up: each worker imports transformers when it first unpickles a layer
        ray.get([w.stats.remote(first, runner.chunks[0], runner.context, False) for w in workers])
        start = time.perf_counter()
        for layer in decoder_layers(model)[:layers]:
            runner.collect(layer, hessian=False)
            runner.advance(layer)
        ray.get(runner.chunks)
        return time.perf_counter() - start
    finally:
        for w in workers:
            ray.kill(w)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    opts = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m", device="cpu", show_progress=False)
    calib = sample_calibration(c4_documents(), tok, opts.nsamples, opts.seqlen, 0)
    inputs, args, kwargs = capture_layer0_inputs(model, calib)
    tokens = opts.nsamples * opts.seqlen * opts.layers
    seconds = {1: [], 2: []}
    for _ in range(opts.repeats):  # interleaved, so drift in machine load hits both
        for n in (1, 2):
            seconds[n].append(time_workers(n, model, inputs, args, kwargs, opts.layers))
    best = {n: min(s) for n, s in seconds.items()}
    append_row("scaling", {
        "layers": opts.layers, "nsamples": opts.nsamples, "seqlen": opts.seqlen, "seconds": seconds,
        "tokens_per_s": {n: tokens / s for n, s in best.items()}, "speedup_2_vs_1": best[1] / best[2],
    })


if __name__ == "__main__":
    main()
