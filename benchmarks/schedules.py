"""Schedules benchmark: WikiText-2 test ppl vs global sparsity for uniform, owl and a Tune-searched schedule.

For each budget: `asft sweep` (trials prune with few calibration windows and score on
WikiText-2 *valid*), then `asft prune` with 32 calibration windows for each schedule and
`asft eval` on the first 16 test windows. Rows are appended to
benchmarks/results/schedules.jsonl (finished rows are skipped, so it resumes), and
`--plot` draws benchmarks/results/schedules.png.

    python benchmarks/schedules.py --budgets 0.7 0.6           # sweeps + rows
    python benchmarks/schedules.py --budgets 0.7 --full         # the tuned schedule on the full test set
    python benchmarks/schedules.py --budgets 0.6 --schedules tuned --sweep-tag linear --trials 24 \
        --linear-offsets self_attn.q_proj self_attn.k_proj self_attn.v_proj mlp.down_proj   # a wider search space
    python benchmarks/schedules.py --plot
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from results_io import RESULTS_DIR, append_row, asft, read_rows, wikitext_ppl

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "bench"


def done() -> dict:
    return {r["key"]: r for r in read_rows("schedules") if "key" in r}


def sweep(method: str, budget: float, opts) -> tuple[Path, dict]:
    name = f"sweep-{method}-{budget:g}" + (f"-{opts.sweep_tag}" if opts.sweep_tag else "")
    out, config = RUNS / name, RUNS / f"{name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    extra = {"linear_offsets": opts.linear_offsets} if opts.linear_offsets else {}
    config.write_text(yaml.safe_dump({
        "model": "smollm2-135m", "method": method, "sparsity": budget, "nsamples": opts.sweep_nsamples,
        "seqlen": 2048, "out": str(out), "trials": opts.trials, "concurrency": 2, "val_windows": opts.val_windows,
        **extra,
    }))
    if not (out / "sweep.json").exists():
        asft("sweep", str(config), "--no-progress")
    return out / "best_schedule.yaml", json.loads((out / "sweep.json").read_text())


def prune_and_eval(method: str, budget: float, schedule: str, label: str, windows: int | None, nsamples: int) -> dict:
    out = RUNS / (f"{method}-{label}-{budget:g}" + ("" if nsamples == 32 else f"-n{nsamples}"))
    record = json.loads(asft("prune", "--model", "smollm2-135m", "--method", method, "--sparsity", str(budget),
                             "--nsamples", str(nsamples), "--schedule", schedule, "--out", str(out), "--no-progress",
                             "--json"))
    result = wikitext_ppl(out, windows)
    return {"ppl": result["ppl"], "windows": result["windows"], "sparsity": result["sparsity"],
            "layer_sparsity": result["sparsity_layers"], "prune_s": record["timings"].get("prune_s"),
            "schedule_s": record["timings"].get("schedule_s"), "eval_s": result["seconds"]}


def preferred(row: dict, other: dict) -> bool:
    """Of two rows for one point: a budget's own sweep over a borrowed shape, then the sweep whose best
    trial had the lower *validation* ppl (never the test ppl)."""
    if ("from" in row["key"]) != ("from" in other["key"]):
        return "from" not in row["key"]
    return row.get("sweep_best_val_ppl", float("inf")) < other.get("sweep_best_val_ppl", float("inf"))


def plot() -> None:
    """ppl vs budget from the 16-window rows: one panel per method, one line per schedule and
    calibration size (solid: 32 windows, dashed: fewer). A budget's own sweep is preferred over
    a shape tuned at another budget (marked * when that is all there is)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in done().values() if r["windows"] == 16]
    dense = [r["ppl_16w"] for r in read_rows("foundation") if r["method"] == "dense" and r.get("ppl_16w")]
    methods = sorted({r["method"] for r in rows}, key=lambda m: m != "wanda")
    fig, axes = plt.subplots(1, len(methods), figsize=(6.4 * len(methods), 4.4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for label, colour in (("uniform", "#4c72b0"), ("owl", "#dd8452"), ("tuned", "#55a868")):
            for n in sorted({r["nsamples"] for r in rows}, reverse=True):
                best = {}
                for r in rows:
                    if (r["method"], r["schedule"], r["nsamples"]) == (method, label, n) and (
                            r["budget"] not in best or preferred(r, best[r["budget"]])):
                        best[r["budget"]] = r
                points = sorted(best.values(), key=lambda r: r["budget"])
                if not points:
                    continue
                ax.plot([100 * r["budget"] for r in points], [r["ppl"] for r in points], marker="o", color=colour,
                        linestyle="-" if n >= 32 else "--", label=f"{label} (n={n})")
                for r in points:
                    if "from" in r["key"]:
                        ax.annotate("*", (100 * r["budget"], r["ppl"]), textcoords="offset points", xytext=(4, 4),
                                    color=colour)
        if dense:
            ax.axhline(dense[0], color="grey", linestyle=":", label=f"dense ({dense[0]:.1f})")
        ax.set_yscale("log")
        ax.set_xlabel("global sparsity of the decoder linears (%)")
        ax.set_ylabel("WikiText-2 test ppl (first 16 windows of 2048)")
        ax.set_title(f"smollm2-135m, {method}: per-layer schedules (n = calibration windows)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS_DIR / "schedules.png", dpi=120)
    print(f"wrote {RESULTS_DIR / 'schedules.png'}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--budgets", type=float, nargs="*", default=[])
    parser.add_argument("--schedules", nargs="*", default=["uniform", "owl", "tuned"])
    parser.add_argument("--tuned-from", type=float, default=None,
                        help="use the best schedule of the sweep at this budget (default: each budget's own sweep)")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows of the evaluated prunes")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--sweep-nsamples", type=int, default=4)
    parser.add_argument("--val-windows", type=int, default=4)
    parser.add_argument("--sweep-tag", default="", help="names a sweep with another search space (own folder and row key)")
    parser.add_argument("--linear-offsets", nargs="*", default=[], help="linears that get an offset knob in the sweep")
    parser.add_argument("--full", action="store_true", help="evaluate on the full test set instead of 16 windows")
    parser.add_argument("--plot", action="store_true")
    opts = parser.parse_args()
    windows = None if opts.full else 16
    rows = done()
    for budget in opts.budgets:
        for label in opts.schedules:
            key = f"{opts.method}-{label}-{budget:g}-{'full' if opts.full else '16w'}" + (
                "" if opts.nsamples == 32 else f"-n{opts.nsamples}")
            source = opts.tuned_from or budget
            if label == "tuned" and source != budget:
                key += f"-from{source:g}"
            if label == "tuned" and opts.sweep_tag:
                key += f"-{opts.sweep_tag}"
            if key in rows:
                continue
            extra, schedule, name = {}, label, label
            if label == "tuned":
                best, summary = sweep(opts.method, source, opts)
                schedule = str(best)
                extra = {"tuned_at": source, "sweep_trials": summary["trials"], "sweep_stopped_early": summary["stopped_early"],
                         "sweep_s": summary["sweep_s"], "sweep_best_val_ppl": summary["best"]["val_ppl"],
                         "sweep_nsamples": opts.sweep_nsamples, "sweep_val_windows": opts.val_windows,
                         "sweep_tag": opts.sweep_tag, "sweep_linear_offsets": opts.linear_offsets}
                if source != budget:
                    name = f"tuned-from{source:g}"
                if opts.sweep_tag:
                    name += f"-{opts.sweep_tag}"
            result = prune_and_eval(opts.method, budget, schedule, name, windows, opts.nsamples)
            append_row("schedules", {"key": key, "method": opts.method, "schedule": label, "budget": budget,
                                     "nsamples": opts.nsamples, **result, **extra})
    if opts.plot:
        plot()


if __name__ == "__main__":
    main()
