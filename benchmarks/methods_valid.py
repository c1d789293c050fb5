"""RIA, +dsnot and +obs against Wanda (and SparseGPT) on SmolLM2-135M, WikiText-2 *valid* only.

Selection data for issue #15: C4 calibration (`--nsamples` x 2048, seed 0), the first
`--windows` 2048-token windows of WikiText-2 valid, in memory, one process. Test numbers are not
computed here (they are reported once, after a choice is made on valid).

    flock /tmp/asft-heavy.lock python benchmarks/methods_valid.py --nsamples 8 --windows 8
    ... --true-sequential --methods sparsegpt   (each linear group pruned on the outputs of the pruned groups before it)
    ... --patterns 2:4 --channel-permutation --methods sparsegpt   (MLP channels reordered for N:M first)
    ... --reconstruct-epochs 4 --reconstruct-lr 1e-4 --methods sparsegpt   (each pruned layer fitted to the dense hidden states)

Rows already in results/methods_valid.jsonl (same method, pattern, nsamples, windows) are skipped
unless --again.
"""

import argparse
import copy
import time

from results_io import append_row, read_rows

from asft_ray.config import Pattern
from asft_ray.data import c4_documents, sample_calibration, wikitext2_ids
from asft_ray.eval.perplexity import perplexity
from asft_ray.models import load_model
from asft_ray.pruning.engine import prune_model
from asft_ray.pruning.reconstruct import Reconstruction

METHODS = ("wanda", "ria", "wanda+dsnot", "ria+dsnot", "wanda+obs", "ria+dsnot+obs", "sparsegpt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--patterns", nargs="+", default=["unstructured", "2:4"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--true-sequential", action="store_true",
                        help="prune each layer's linears group by group (asft_ray.pruning.engine)")
    parser.add_argument("--channel-permutation", action="store_true",
                        help="N:M: reorder each MLP's intermediate channels first (asft_ray.pruning.permute)")
    parser.add_argument("--reconstruct-epochs", type=int, default=0,
                        help="block reconstruction after each layer's mask (asft_ray.pruning.reconstruct); 0: off")
    parser.add_argument("--reconstruct-lr", type=float, default=1e-4)
    parser.add_argument("--again", action="store_true",
                        help="run rows already recorded too (a same-run time next to a new row)")
    args = parser.parse_args()
    reconstruction = Reconstruction(args.reconstruct_epochs, args.reconstruct_lr) if args.reconstruct_epochs else None
    recon_key = (args.reconstruct_epochs, args.reconstruct_lr) if reconstruction else None
    done = set() if args.again else {(r["method"], r["pattern"], r["nsamples"], r["windows"], r.get("true_sequential", False),
             r.get("channel_permutation", False), r.get("reconstruct") and tuple(r["reconstruct"]))
             for r in read_rows("methods_valid")}
    model, tokenizer = load_model("smollm2-135m", "cpu", show_progress=False)
    calib = sample_calibration(c4_documents(), tokenizer, args.nsamples, 2048, 0)
    valid = wikitext2_ids(tokenizer, "valid")
    base = {"nsamples": args.nsamples, "windows": args.windows, "sparsity": 0.5}
    if ("dense", "-", args.nsamples, args.windows, False, False, None) not in done:
        append_row("methods_valid", {**base, "method": "dense", "pattern": "-",
                                     "ppl_valid": perplexity(model, valid, 2048, args.windows, False)["ppl"]})
    for pattern in args.patterns:
        for method in args.methods:
            if (method, pattern, args.nsamples, args.windows, args.true_sequential, args.channel_permutation,
                    recon_key) in done:
                continue
            pruned = copy.deepcopy(model)
            start = time.perf_counter()
            report = prune_model(pruned, method, Pattern.parse(pattern), 0.5, calib, show_progress=False,
                                 true_sequential=args.true_sequential, channel_permutation=args.channel_permutation,
                                 reconstruction=reconstruction)
            prune_s = time.perf_counter() - start
            ppl = perplexity(pruned, valid, 2048, args.windows, False)["ppl"]
            row = {**base, "method": method, "pattern": pattern, "ppl_valid": ppl,
                   "true_sequential": args.true_sequential, "prune_s": round(prune_s, 1)}
            if reconstruction:
                row["reconstruct"] = list(recon_key)
                row["reconstruction_loss_drop"] = sum(
                    1 - r["reconstruction_loss_last_epoch"] / r["reconstruction_loss_first_epoch"] for r in report) / len(report)
            if args.channel_permutation:
                row["channel_permutation"] = True
                for key, name in (("permutation_kept_score_gain", "down"), ("o_proj_permutation_kept_score_gain", "o")):
                    gains = [r[key] for r in report if key in r]
                    if gains:
                        row[f"{name}_kept_score_gain"] = {"mean": sum(gains) / len(gains), "min": min(gains),
                                                          "max": max(gains)}
            append_row("methods_valid", row)
            del pruned


if __name__ == "__main__":
    main()
