"""Structured pruning trade (issue #6): smaller dense exports of SmolLM2-135M, before and after recovery.

For each --point "MLP_RATIO:HEAD_RATIO" it runs the real CLI:
  asft export --format structured (|W|*||X|| channel/KV-group scores on --nsamples C4 windows)
  asft eval   8-window WikiText-2 valid ppl and 16-window test ppl of the export
Then it recovers the point with the lowest valid ppl (selection never looks at the test split):
  asft recover --dense --teacher smollm2-135m (every remaining weight trains; ZeRO-2, 2 workers)
  asft eval   16-window and (with --full) full WikiText-2 test ppl
With --int8 every folder above (each export and the recovered model) is also written as int8
(asft export --format int8: decoder linears and head int8, weight-only) and evaluated the same way,
and --dense-int8 adds the int8 export of the dense model itself: the rows dense + int8, pruned,
pruned + int8 that show how much of a saving pruning contributes.
Rows go to benchmarks/results/structured.jsonl; decode speed comes from benchmarks/inference.py on
the same folders (run it on an idle machine, dense in the same run), e.g.
    python benchmarks/inference.py --model smollm2-135m --structured runs/bench/structured/X \
        --int8 runs/bench/structured/dense-int8 --int8 runs/bench/structured/X-int8

    python benchmarks/structured.py --point 0.5:0 --point 0.4:0.34 --max-steps 40 --full
    python benchmarks/structured.py --point 0.5:0:6 --refit --int8 --dense-int8 --max-steps 0
    python benchmarks/structured.py --from runs/cs75 --max-steps 110 --lr 2e-4 --full   # an existing export
    python benchmarks/structured.py --point 0.5:0 --refit --nsamples 8 --reconstruct-epochs 4 --max-steps 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import append_row, asft, wikitext_ppl  # noqa: E402

DENSE = "smollm2-135m"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--point", action="append", default=[],
                   help="MLP_RATIO:HEAD_RATIO or MLP_RATIO:HEAD_RATIO:LAYERS_DROPPED (repeatable)")
    p.add_argument("--from", dest="source", type=Path,
                   help="recover this structured export (e.g. one `asft export --cost-search` chose) instead of --point")
    p.add_argument("--eval-every", type=int, default=10, help="recovery steps between valid ppl checks")
    p.add_argument("--refit", action="store_true", help="export with the least-squares refit of down_proj/o_proj")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--reconstruct-epochs", type=int, default=0, help="export with block reconstruction (0: off)")
    p.add_argument("--reconstruct-lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=40, help="recovery steps (0: exports only)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--full", action="store_true", help="also the full WikiText-2 test ppl of the recovered model")
    p.add_argument("--int8", action="store_true", help="also write and evaluate the int8 form of every folder")
    p.add_argument("--dense-int8", action="store_true", help="also the int8 export of the dense model")
    args = p.parse_args()
    if bool(args.point) == bool(args.source):
        p.error("give either --point (repeatable) or --from")
    runs = ROOT / "runs" / "bench" / "structured"

    def int8_of(source, name: str, stage: str, full: bool = False) -> None:
        """The int8 export of `source` (a folder or the dense alias) into runs/NAME, evaluated like its source."""
        out = runs / name
        if not (out / "int8.json").is_file():
            asft("export", "--model", str(source), "--format", "int8", "--out", str(out), "--no-progress")
        report = json.loads((out / "int8.json").read_text())
        row = {"stage": stage, "source": str(source.relative_to(ROOT)) if isinstance(source, Path) else source,
               "folder": str(out.relative_to(ROOT)), "int8": True, "head_quantized": report["head_quantized"],
               "weights_file_bytes": report["weights_file_bytes"], "dense_bytes": report["dense_bytes"],
               "valid_ppl_8w": wikitext_ppl(out, 8, "valid")["ppl"], "test_ppl_16w": wikitext_ppl(out, 16)["ppl"]}
        if full:
            row["test_ppl_full"] = wikitext_ppl(out)["ppl"]
        append_row("structured", row)

    if args.dense_int8:
        int8_of(DENSE, "dense-int8", "dense+int8", args.full)

    scored = []
    for point in args.point:
        mlp, heads, drop = (point.split(":") + ["0"])[:3]
        rc = ["--reconstruct-epochs", str(args.reconstruct_epochs), "--reconstruct-lr", str(args.reconstruct_lr)]
        out = runs / (f"mlp{mlp}-heads{heads}" + (f"-drop{drop}" if drop != "0" else "") + ("-refit" if args.refit else "")
                      + (f"-n{args.nsamples}-rc{args.reconstruct_epochs}-lr{args.reconstruct_lr:g}"
                         if args.reconstruct_epochs else ""))
        if not (out / "config.json").is_file():
            asft("export", "--model", DENSE, "--format", "structured", "--mlp-ratio", mlp, "--head-ratio", heads,
                 "--drop-layers", drop, *(["--refit"] if args.refit else []), *(rc if args.reconstruct_epochs else []),
                 "--nsamples", str(args.nsamples), "--seqlen", "2048", "--out", str(out), "--no-progress")
        valid = wikitext_ppl(out, 8, "valid")
        test = wikitext_ppl(out, 16)
        scored.append((valid["ppl"], out))
        report = json.loads((out / "structured.json").read_text())
        append_row("structured", {"stage": "export", "mlp_ratio": float(mlp), "head_ratio": float(heads),
                                  "layers_dropped": report.get("layers_dropped", []), "refit": args.refit,
                                  "reconstruction": report.get("reconstruction"),
                                  "parameter_ratio": report["parameter_ratio"],
                                  "nsamples": args.nsamples, "folder": str(out.relative_to(ROOT)),
                                  "valid_ppl_8w": valid["ppl"], "test_ppl_16w": test["ppl"]})
        if args.int8:
            int8_of(out, out.name + "-int8", "export+int8")

    if args.max_steps == 0:
        return
    best = args.source.resolve() if args.source else min(scored)[1]
    out = (runs / (best.name + "-recovered")) if args.source else best.with_name(best.name + "-recovered")
    record = json.loads(asft(
        "recover", "--model", str(best), "--dense", "--teacher", DENSE, "--out", str(out), "--workers", "2",
        "--zero-stage", "2", "--max-steps", str(args.max_steps), "--seqlen", str(args.seqlen),
        "--grad-accum", str(args.grad_accum), "--lr", str(args.lr), "--seed", "0", "--checkpoint-every", str(args.eval_every),
        "--eval-every", str(args.eval_every), "--eval-windows", "4", "--eval-seqlen", "2048", "--resume", "--json", "--no-progress"))
    row = {"stage": "recovered", "source": str(best), "folder": str(out.relative_to(ROOT)),
           "max_steps": args.max_steps, "lr": args.lr, "seqlen": args.seqlen, "grad_accum": args.grad_accum,
           "tokens_per_s": record["tokens_per_s"], "train_s": record["timings"]["train_s"],
           "wall_s": record["timings"]["total_s"],
           "curve_valid_ppl": [[e["step"], e["ppl"]] for e in record["evals"]],
           "test_ppl_16w": wikitext_ppl(out, 16)["ppl"]}
    if args.full:
        row["test_ppl_full"] = wikitext_ppl(out)["ppl"]
    append_row("structured", row)
    if args.int8:
        int8_of(out, out.name + "-int8", "recovered+int8", args.full)


if __name__ == "__main__":
    main()
