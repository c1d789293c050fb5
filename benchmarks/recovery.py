"""Recovery benchmark: fine-tune the surviving weights of a 50 % Wanda SmolLM2-135M.

Rows (each runs the real CLI, `asft recover` then `asft eval`, and appends one JSON line to
benchmarks/results/recovery.jsonl; rows already there are skipped, so the script resumes):

  pruned     the pruned model before recovery: 16-window WikiText-2 test ppl
  lm-zero2   LM loss on C4, ZeRO-2, 2 workers: recovery curve (WikiText-2 *valid* ppl every
             --eval-every steps), final 16-window test ppl, tokens/s, per-worker peak memory
  kd-zero2   the same with distillation from the dense model (KL on logits, T=2, + LM loss)
  lm-zero3   LM loss, ZeRO-3, --memory-steps steps, no curve: per-worker peak memory and
             tokens/s against lm-zero2's
  memory-w2  ZeRO-2 then ZeRO-3, 2 steps of 128 tokens, 2 workers: the parameter + optimizer-state
  memory-w4  MiB each worker holds (model_state_mib), and ZeRO-3's share of ZeRO-2's; 4 workers
  kd-zero3   kd-zero2 with ZeRO-3 (partitioned load, ZeRO-3 teacher): the same curve and test ppl
  full-test  full WikiText-2 test ppl of the pruned model and of the recovered run with the lowest
             final valid ppl (--recovered-key KEY: of that run)

    python benchmarks/recovery.py                       # everything (hours on 2 CPU cores)
    python benchmarks/recovery.py --only pruned lm-zero2
    python benchmarks/recovery.py --smoke               # minutes: 2 steps of 128 tokens, own results file
    python benchmarks/recovery.py --only kd-zero2 --lr 2e-4 --max-steps 70 --tag lr2e-4   # a variant: own key and folder
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import RESULTS_DIR, append_row, asft, read_rows, wikitext_ppl  # noqa: E402

DENSE = "smollm2-135m"
ROWS = ("pruned", "lm-zero2", "kd-zero2", "lm-zero3", "kd-zero3", "memory-w2", "memory-w4", "full-test")


def ensure_pruned(folder: Path, nsamples: int, seqlen: int) -> None:
    if (folder / "asft_run.json").is_file():
        return
    asft("prune", "--model", DENSE, "--method", "wanda", "--sparsity", "0.5", "--nsamples", str(nsamples),
         "--seqlen", str(seqlen), "--out", str(folder), "--no-progress")


def full_test_row(args, name: str) -> dict:
    """Full WikiText-2 test ppl of the pruned model and of the recovered run with the lowest final
    *valid* ppl (the test split plays no part in choosing it)."""
    rows = [r for r in read_rows(name) if r.get("curve_valid_ppl")]
    if args.recovered_key:  # one named run (e.g. the ZeRO-3 re-run of the chosen setting)
        rows = [r for r in rows if r["key"] == args.recovered_key]
        if not rows:
            raise SystemExit(f"no recovery row {args.recovered_key!r} in {name}.jsonl")
    best = min(rows, key=lambda r: r["curve_valid_ppl"][-1][1])
    recovered = args.runs / best["key"]
    key = "full-test" + (f"@{best['key']}" if args.recovered_key else "")
    return {"key": key, "pruned": str(args.pruned), "recovered": str(recovered),
            "chosen_by": "named run" if args.recovered_key else "final valid ppl",
            "test_seqlen": args.test_seqlen,
            # the pruned model's full test ppl is measured once, in the unnamed row
            **({} if args.recovered_key else
               {"pruned_test_ppl_full": wikitext_ppl(args.pruned, None, seqlen=args.test_seqlen)["ppl"]}),
            "recovered_test_ppl_full": wikitext_ppl(recovered, None, seqlen=args.test_seqlen)["ppl"]}


def recover(args, key: str, out: Path) -> dict:
    zero = "3" if key.endswith("zero3") else "2"
    steps = args.memory_steps if key == "lm-zero3" else args.max_steps
    flags = ["recover", "--model", str(args.pruned), "--out", str(out), "--workers", str(args.workers),
             "--zero-stage", zero, "--max-steps", str(steps), "--seqlen", str(args.seqlen),
             "--grad-accum", str(args.grad_accum), "--lr", str(args.lr), "--seed", "0",
             "--checkpoint-every", str(args.checkpoint_every), "--resume", "--json", "--no-progress"]
    if key != "lm-zero3":
        flags += ["--eval-every", str(args.eval_every), "--eval-windows", str(args.eval_windows),
                  "--eval-seqlen", str(args.eval_seqlen)]
    if key.startswith("kd"):
        flags += ["--teacher", DENSE, "--kd-weight", "1.0", "--lm-weight", "1.0", "--temperature", "2.0"]
    return json.loads(asft(*flags))


def memory_row(args, workers: int) -> dict:
    """Parameter + optimizer-state MiB per worker under ZeRO-2 and ZeRO-3 (gradients and activations
    not counted), from two 2-step runs with the same model and worker count."""
    row = {"key": f"memory-w{workers}", "pruned": str(args.pruned), "workers": workers}
    for zero in (2, 3):
        out = args.runs / f"memory-zero{zero}-w{workers}"
        record = json.loads(asft(
            "recover", "--model", str(args.pruned), "--out", str(out), "--workers", str(workers),
            "--worker-cpus", str(min(1.0, 2 / workers)), "--zero-stage", str(zero), "--max-steps", "2",
            "--seqlen", "128", "--seed", "0", "--overwrite", "--json", "--no-progress"))
        for part in ("model_state_mib", "params_mib", "optimizer_mib"):
            row[f"{part}_zero{zero}"] = [m[part] for m in record["memory"]]
        row[f"peak_rss_mib_zero{zero}"] = [m["peak_rss_mib"] for m in record["memory"]]
    row["zero3_share_of_zero2"] = max(row["model_state_mib_zero3"]) / max(row["model_state_mib_zero2"])
    return row


def run_row(args, key: str) -> dict:
    settings = {"pruned": str(args.pruned), "workers": args.workers, "seqlen": args.seqlen, "grad_accum": args.grad_accum,
                "lr": args.lr, "test_windows": args.test_windows, "test_seqlen": args.test_seqlen}
    if key == "full-test":
        return full_test_row(args, "recovery")
    if key.startswith("memory-w"):
        return memory_row(args, int(key.removeprefix("memory-w")))
    if key == "pruned":
        result = wikitext_ppl(args.pruned, args.test_windows, seqlen=args.test_seqlen)
        return {"key": key, **settings, "test_ppl": result["ppl"], "sparsity": result["sparsity"]}
    out = args.runs / (key + args.tag)
    start = time.perf_counter()
    record = recover(args, key, out)
    wall_s = time.perf_counter() - start
    row = {
        "key": key + args.tag, **settings,
        "zero_stage": record["deepspeed_config"]["zero_optimization"]["stage"],
        "teacher": record["config"]["teacher"],
        "max_steps": record["config"]["max_steps"],
        "curve_valid_ppl": [[e["step"], e["ppl"]] for e in record["evals"]],
        "eval_windows": args.eval_windows, "eval_seqlen": args.eval_seqlen,
        "loss_first": record["losses"][0], "loss_last": record["losses"][-1],
        "tokens_per_s": record["tokens_per_s"],
        "peak_rss_mib_per_worker": [m["peak_rss_mib"] for m in record["memory"]],
        "train_rss_max_mib_per_worker": [m["train_rss_max_mib"] for m in record["memory"]],
        "peak_cuda_mib_per_worker": [m.get("peak_cuda_mib") for m in record["memory"]],
        "train_s": record["timings"]["train_s"], "wall_s": wall_s,
        "mask_check": record["mask_check"],
    }
    if key != "lm-zero3":
        result = wikitext_ppl(out, args.test_windows, seqlen=args.test_seqlen)
        row.update(test_ppl=result["ppl"], sparsity=result["sparsity"])
    return row


def plot(name: str) -> None:
    """Recovery curves (WikiText-2 valid ppl vs step, one line per run) with the dense and pruned
    16-window test ppl as reference lines, to results/recovery.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(name)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        if r.get("curve_valid_ppl"):
            steps, ppl = zip(*r["curve_valid_ppl"])
            ax.plot(steps, ppl, marker="o", label=f"{r['key']} (lr {r['lr']:g}): valid, {r['eval_windows']} windows")
    ax.set_xlabel("optimizer step (2 workers x 4 x 512 tokens)")
    ax.set_ylabel("WikiText-2 valid ppl (windows of 2048)")
    ax.set_title("smollm2-135m, wanda 50 %: recovery with DeepSpeed ZeRO-2 on Ray Train", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "recovery.png", dpi=120)
    print(f"wrote {RESULTS_DIR / 'recovery.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=ROWS, help="rows to run (default: all, in order)")
    parser.add_argument("--pruned", type=Path, default=None, help="pruned model dir (made with asft prune if missing)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--memory-steps", type=int, default=10, help="steps of the ZeRO-3 memory row")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--test-windows", type=int, default=16)
    parser.add_argument("--test-seqlen", type=int, default=2048)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--recovered-key", default=None,
                        help="full-test: the recovery row to test (default: the lowest final valid ppl)")
    parser.add_argument("--plot", action="store_true", help="only draw results/recovery.png from the rows")
    parser.add_argument("--tag", default="", help="suffix for a variant's row key and folder (e.g. another --lr)")
    parser.add_argument("--smoke", action="store_true", help="tiny settings, results in recovery-smoke.jsonl")
    args = parser.parse_args()
    name = "recovery"
    if args.smoke:
        name = "recovery-smoke"
        args.max_steps, args.memory_steps, args.seqlen, args.grad_accum = 2, 2, 128, 1
        args.eval_every, args.eval_windows, args.eval_seqlen, args.checkpoint_every = 1, 2, 128, 1
        args.test_windows, args.test_seqlen = 2, 128
    if args.plot:
        return plot(name)
    bench = ROOT / "runs" / "bench"
    if args.pruned is None:
        args.pruned = bench / ("smoke/wanda50" if args.smoke else "wanda50")
        # the smoke prune is only there to have zeros; the real one is the benchmark's 32 x 2048 Wanda model
        ensure_pruned(args.pruned, *((2, 256) if args.smoke else (32, 2048)))
    args.runs = bench / ("smoke/recovery" if args.smoke else "recovery")
    if args.smoke:
        shutil.rmtree(args.runs, ignore_errors=True)  # a smoke run always trains
    done = set() if args.smoke else {r["key"] for r in read_rows(name)}
    if args.tag:
        args.tag = "@" + args.tag
    for key in args.only or ROWS:
        row_key = f"full-test@{args.recovered_key}" if key == "full-test" and args.recovered_key else key + args.tag
        if row_key in done:
            print(f"{key}: already in {name}.jsonl, skipped")
            continue
        append_row(name, run_row(args, key))


if __name__ == "__main__":
    main()
