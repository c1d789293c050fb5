"""The chosen 50 % method against SparseGPT beyond the foundation protocol (issue #15, acceptance 3).

    python benchmarks/winners.py --what quick --seeds 0 1 2 3     # prune (32 x 2048 C4, seed S) + 16-window test
    python benchmarks/winners.py --what full                       # the whole WikiText-2 test, seed-0 models
    python benchmarks/winners.py --what zeroshot                   # first 500 items of the 8 sets (LAMBADA ppl too)
    python benchmarks/winners.py --table
    python benchmarks/winners.py --what quick --methods best-50 --seeds 1 2 3   # a committed config (PRUNE_ARGS)
    python benchmarks/winners.py --what timing --methods sparsegpt best-50       # prunes only, fresh, in one run

Every step is the real CLI (`asft prune`, `asft eval`) on SmolLM2-135M at 50 % (unstructured, or 2:4
where the method says so), for each method in --methods (default: the chosen `wanda+dsnot+obs` and
`sparsegpt`), one after the other so that their prune times are side by side. One JSON line per finished step goes to
benchmarks/results/winners.jsonl; steps already there are skipped (the script resumes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import ROOT, append_row, asft, read_rows, wikitext_ppl, window_ppl  # noqa: E402

RESULTS = "winners"
RUNS = ROOT / "runs" / "bench" / "winners"
METHODS = ("wanda+dsnot+obs", "sparsegpt")
# a "method" here may be a committed config (flags after it override it: sparsity, seed, out)
PRUNE_ARGS = {"best-50": ["--config", "configs/smollm2-best-50.yaml"],  # sparsegpt + block reconstruction
              "best-2of4": ["--config", "configs/smollm2-best-2of4.yaml"],  # + channel permutation, at 2:4
              "sparsegpt-2:4": ["--method", "sparsegpt", "--pattern", "2:4"]}


def model_dir(method: str, seed: int) -> Path:
    return RUNS / f"{method}-50-s{seed}"


def prune(method: str, seed: int, out: Path) -> dict:
    """`asft prune` of SmolLM2 at 50 % with the protocol's 32 x 2048 C4 windows; its asft_run.json."""
    asft("prune", *PRUNE_ARGS.get(method, ["--method", method]), "--model", "smollm2-135m", "--sparsity", "0.5",
         "--nsamples", "32", "--seqlen", "2048", "--seed", str(seed), "--out", str(out), "--no-progress")
    return json.loads((out / "asft_run.json").read_text())


def quick(method: str, seed: int) -> dict:
    """Prune with seed S (a finished prune already in the folder is reused, and the row says so), then
    the first 16 test windows."""
    out = model_dir(method, seed)
    start = time.perf_counter()
    reused = (out / "asft_run.json").is_file()
    prune_run = json.loads((out / "asft_run.json").read_text()) if reused else prune(method, seed, out)
    result = wikitext_ppl(out, 16)
    return {"prune_s": prune_run["timings"]["prune_s"], "wall_s": time.perf_counter() - start, "reused_prune": reused,
            "sparsity": result["sparsity"], "ppl_8w": window_ppl(result["window_nll"][:8]), "ppl_16w": result["ppl"]}


def full(method: str, seed: int) -> dict:
    result = wikitext_ppl(model_dir(method, seed), None)
    return {"windows": result["windows"], "ppl_full": result["ppl"], "eval_s": result["seconds"]}


def zeroshot(method: str, seed: int) -> dict:
    out = asft("eval", "--model", str(model_dir(method, seed)), "--task", "zeroshot", "--limit", "500",
               "--no-stream", "--json", "--no-progress")
    return {"zeroshot": json.loads(out.strip().splitlines()[-1])}


def timing(method: str, seed: int) -> dict:
    """A fresh prune (never a reused or resumed one) into its own new folder, to put each method's
    prune time beside the others' of the same invocation (acceptance 4)."""
    out = RUNS / "timing" / f"{method}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.perf_counter()
    prune_run = prune(method, seed, out)
    return {"prune_s": prune_run["timings"]["prune_s"], "wall_s": time.perf_counter() - start,
            "sparsity": prune_run["sparsity"]["total"], "out": str(out)}


STEPS = {"quick": quick, "full": full, "zeroshot": zeroshot, "timing": timing}


def table(rows: list[dict]) -> str:
    lines = ["| method | seeds | 16w test ppl: mean (sd; each seed) | full test ppl (seed 0) | mean zero-shot acc "
             "(seed 0, 8 x 500) | LAMBADA ppl | prune s (each seed) |", "|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = {(r["what"], r["seed"]): r for r in rows if r["method"] == method}
        quicks = [mine[k] for k in sorted(mine) if k[0] == "quick"]
        ppl = [r["ppl_16w"] for r in quicks]
        spread = ""
        if ppl:
            sd = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
            spread = f"{statistics.mean(ppl):.3f} ({sd:.3f}; " + ", ".join(f"{p:.3f}" for p in ppl) + ")"
        full_row = mine.get(("full", 0))
        zs = mine.get(("zeroshot", 0), {}).get("zeroshot")
        lambada = zs["tasks"].get("lambada", {}).get("ppl") if zs else None
        cells = [method, str(len(ppl)), spread,
                 f"{full_row['ppl_full']:.3f}" if full_row else "",
                 f"{zs['mean_acc']:.4f}" if zs else "",
                 f"{lambada:.1f}" if lambada else "",
                 ", ".join(f"{r['prune_s']:.0f}" for r in quicks)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--what", choices=sorted(STEPS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--table", action="store_true")
    opts = parser.parse_args()
    if opts.what and not opts.table:
        for seed in opts.seeds:
            for method in opts.methods:  # the methods alternate: their prune times are side by side
                done = {(r["method"], r["what"], r["seed"]) for r in read_rows(RESULTS)}
                if (method, opts.what, seed) in done:
                    continue
                append_row(RESULTS, {"method": method, "what": opts.what, "seed": seed, "sparsity_target": 0.5,
                                     **STEPS[opts.what](method, seed)})
    print(table(read_rows(RESULTS)))


if __name__ == "__main__":
    main()
