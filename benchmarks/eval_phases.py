"""Where a streamed evaluation's time goes, with 2 workers and with 1 (issue #13's 1.7 x target).

Runs `eval.streamed.evaluate_streamed` (what `asft eval --workers N` runs) on a safetensors model and
times the driver's phases: `load` (a decoder layer read from the shards), `put` (it and the final
head copied into Ray's object store), `wait` (for the workers' forwards of the layer before), and
`score_rows` (the final head on the workers, including its own wait for the last layer and its put,
which also count in `wait` and `put`). Then the machine's own limit: two
single-thread processes doing the same float32 matmuls at once against one alone (a layer's
forward is such matmuls; two scoring actors are two such processes).

    python benchmarks/eval_phases.py --model /work/runs-large/wanda-rc-w2     # 16 windows of 256

One JSON line per run (and one for the matmul check) in benchmarks/results/eval_phases.jsonl.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from results_io import append_row

MATMULS = """
import sys, time, torch
torch.set_num_threads(1)
x, w, w2 = torch.randn(1024, 2048), torch.randn(5632, 2048), torch.randn(2048, 5632)
start = time.perf_counter()
for _ in range(int(sys.argv[1])):
    torch.nn.functional.linear(torch.nn.functional.linear(x, w), w2)
print(time.perf_counter() - start)
"""


def timed_phases(spent: dict):
    """Wrap the driver's calls whose wall time is recorded in `spent` (this process only)."""
    import ray

    import asft_ray.distributed.sharded as sharded
    import asft_ray.pruning.streaming as streaming

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    streaming.StreamedLayers.load = timed("load", streaming.StreamedLayers.load)
    ray.put = timed("put", ray.put)
    ray.wait = timed("wait", ray.wait)
    sharded.ShardedRunner.score_rows = timed("score_rows", sharded.ShardedRunner.score_rows)


def matmul_contention(steps: int) -> dict:
    """Seconds of `steps` matmul pairs in one process alone, then in each of two at once."""
    def run(n: int) -> list[float]:
        procs = [subprocess.Popen([sys.executable, "-c", MATMULS, str(steps)], stdout=subprocess.PIPE, text=True)
                 for _ in range(n)]
        return [float(p.communicate()[0]) for p in procs]

    alone, together = run(1), run(2)
    return {"alone_s": alone[0], "together_s": together, "slowdown": max(together) / alone[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a safetensors model folder")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--matmul-steps", type=int, default=30)
    opts = parser.parse_args()

    from transformers import AutoTokenizer

    from asft_ray.data import wikitext2_ids
    from asft_ray.eval.streamed import evaluate_streamed

    spent: dict[str, float] = defaultdict(float)
    timed_phases(spent)
    ids = wikitext2_ids(AutoTokenizer.from_pretrained(opts.model), "test", None)
    seconds = {}
    for workers in opts.workers:
        spent.clear()
        result = evaluate_streamed(Path(opts.model), ids, opts.seqlen, opts.windows, workers, show_progress=False)
        seconds[workers] = result["seconds"]
        append_row("eval_phases", {"model": opts.model, "windows": opts.windows, "seqlen": opts.seqlen,
                                   "workers": workers, "seconds": result["seconds"], "ppl": result["ppl"],
                                   "driver_s": {k: round(v, 2) for k, v in spent.items()}})
    if {1, 2} <= seconds.keys():
        append_row("eval_phases", {"model": opts.model, "throughput_w2_over_w1": seconds[1] / seconds[2]})
    append_row("eval_phases", {"check": "two single-thread matmul processes at once", "steps": opts.matmul_steps,
                               **matmul_contention(opts.matmul_steps)})


if __name__ == "__main__":
    main()
