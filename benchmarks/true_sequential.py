"""Layer-at-once vs true-sequential pruning (one input group of linears at a time) on SmolLM2-135M.

For each calibration seed, prunes with 32 x 2048 C4 windows both ways in one process and
evaluates the first 16 windows of WikiText-2 *valid* (to choose by) and *test* (to report).
Both modes use asft-ray's float64 statistics; only the inputs the later groups are scored on
differ (dense-layer inputs vs inputs through the already pruned q/k/v, o, gate/up).

    python benchmarks/true_sequential.py [--method wanda] [--pattern 2:4] [--seeds 0 1 2 3]
    python benchmarks/true_sequential.py --table

Rows already in results/true_sequential.jsonl (same method, pattern, seed, mode) are skipped.
"""

import argparse
import copy
import statistics
import time

import torch
from results_io import append_row, read_rows, window_ppl

from asft_ray.config import Pattern
from asft_ray.data import c4_documents, sample_calibration, wikitext2_ids
from asft_ray.eval.perplexity import perplexity
from asft_ray.models import load_model
from asft_ray.pruning.engine import prune_model

WINDOWS = 16


def ppl(model, ids) -> tuple[float, float]:
    """(ppl over the first 16 windows, ppl over the first 8)."""
    nll = perplexity(model, ids, 2048, max_windows=WINDOWS, show_progress=False)["window_nll"]
    return window_ppl(nll), window_ppl(nll[:8])


def table() -> str:
    """Markdown: one line per (method, pattern, seed), both modes side by side, and the means."""
    rows = {(r["method"], r["pattern"], r["sparsity"], r["seed"], r["mode"]): r for r in read_rows("true_sequential")}
    cases = sorted({key[:4] for key in rows})
    lines = ["| method | pattern | seed | valid 16w: layer / true-seq | test 16w: layer / true-seq | prune s: layer / true-seq |",
             "|---|---|---|---|---|---|"]
    pairs = {}
    for case in cases:
        layer, seq = rows.get((*case, "layer")), rows.get((*case, "true-sequential"))
        if not (layer and seq):
            continue
        pairs.setdefault(case[:3], []).append((layer, seq))
        lines.append(f"| {case[0]} | {case[1]} | {case[3]} | {layer['valid_ppl_16w']:.2f} / {seq['valid_ppl_16w']:.2f} | "
                     f"{layer['test_ppl_16w']:.2f} / {seq['test_ppl_16w']:.2f} | {layer['prune_s']:.0f} / {seq['prune_s']:.0f} |")
    for (method, pattern, _), both in pairs.items():
        if len(both) > 1:
            def mean(mode, key):
                return statistics.mean(pair[mode][key] for pair in both)
            lines.append(f"| {method} | {pattern} | mean of {len(both)} | {mean(0, 'valid_ppl_16w'):.2f} / "
                         f"{mean(1, 'valid_ppl_16w'):.2f} | {mean(0, 'test_ppl_16w'):.2f} / {mean(1, 'test_ppl_16w'):.2f} | "
                         f"{mean(0, 'prune_s'):.0f} / {mean(1, 'prune_s'):.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt"])
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--sparsity", type=float, default=None, help="default: implied by the N:M pattern")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration sampler seeds")
    parser.add_argument("--table", action="store_true", help="only print the table of finished rows")
    parser.add_argument("--modes", nargs="+", default=["true-sequential", "layer"], choices=["true-sequential", "layer"])
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    torch.set_num_threads(2)
    pattern = Pattern.parse(args.pattern)
    sparsity = args.sparsity if args.sparsity is not None else pattern.implied_sparsity
    done = {(r["method"], r["pattern"], r["sparsity"], r["seed"], r["mode"]) for r in read_rows("true_sequential")}
    model, tok = load_model("smollm2-135m", device="cpu", show_progress=False)
    test_ids, valid_ids = wikitext2_ids(tok, "test"), wikitext2_ids(tok, "valid")
    documents = c4_documents()
    dense = copy.deepcopy(model.state_dict())
    for seed in args.seeds:
        calib = sample_calibration(documents, tok, 32, 2048, seed)
        for mode in args.modes:
            if (args.method, args.pattern, sparsity, seed, mode) in done:
                continue
            model.load_state_dict(dense)
            start = time.perf_counter()
            prune_model(model, args.method, pattern, sparsity, calib, show_progress=False,
                        true_sequential=mode == "true-sequential")
            prune_s = time.perf_counter() - start
            valid16, valid8 = ppl(model, valid_ids)
            test16, test8 = ppl(model, test_ids)
            append_row("true_sequential", {
                "method": args.method, "pattern": args.pattern, "sparsity": sparsity, "seed": seed, "mode": mode,
                "nsamples": 32, "prune_s": round(prune_s, 1), "valid_ppl_16w": valid16, "valid_ppl_8w": valid8,
                "test_ppl_16w": test16, "test_ppl_8w": test8,
            })


if __name__ == "__main__":
    main()
