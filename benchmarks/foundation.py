"""Foundation benchmark: one-shot pruning of smollm2-135m, quick (8w/16w) and full WikiText-2 ppl.

Runs the real CLI (`asft prune` on the embedded Ray cluster, then `asft eval`) for each
row, appends one JSON line per finished row to benchmarks/results/foundation.jsonl
(rows already there are skipped, so the script resumes), and prints a Markdown table.

    python benchmarks/foundation.py                 # everything, in priority order
    python benchmarks/foundation.py --only wanda-unstructured --table
    python benchmarks/foundation.py --results foundation-rerun --only dense-- wanda-2:4 --compare-to foundation
        (re-run rows into another file and compare their ppl with the recorded ones, digit for digit)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

from results_io import asft, read_rows, wikitext_ppl, window_ppl

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "bench"
MODEL = "smollm2-135m"

# (method, pattern, nsamples[, "true-sequential"]) in the order they run; "full" rows evaluate
# all 148 windows: of the dense model, of the best 50 % row ("best50"), or of the row whose key is given.
ROWS = [
    ("dense", "-", 0),
    ("magnitude", "unstructured", 0),
    ("magnitude", "2:4", 0),
    ("wanda", "unstructured", 32),
    ("sparsegpt", "unstructured", 32),
    ("wanda", "2:4", 32),
    ("sparsegpt", "2:4", 32),
    ("taylor", "unstructured", 32),
    ("fisher", "unstructured", 32),
    ("dense", "full", 0),
    ("best50", "full", 0),
    ("wanda", "2:4", 128),
    ("wanda", "unstructured", 128),
    ("taylor", "2:4", 32),
    ("fisher", "2:4", 32),
    ("wanda", "2:4", 32, "true-sequential"),
    ("wanda-2:4-ts", "full", 0),
    # issue #15: the best 50 % method string on WikiText-2 valid (benchmarks/methods_valid.py, 8 calibration
    # windows): configs/smollm2-best-50.yaml
    ("wanda+dsnot+obs", "unstructured", 32),
    # the 2:4 choice on valid since 2026-12-05: SparseGPT with the channel permutation (configs/smollm2-best-2of4.yaml)
    ("sparsegpt", "2:4", 32, "channel-permutation"),
    # issue #15, session 17: block reconstruction after the mask (pruning/reconstruct.py), chosen on valid
    ("sparsegpt", "unstructured", 32, "reconstruct"),
    ("sparsegpt", "2:4", 32, "channel-permutation+reconstruct"),
]


# ../shared/ANCHORS.md: locuslab/wanda reference code on this kind of machine, nsamples 32, seed 0 (8w, 16w ppl).
REFERENCE = {
    ("dense", "-"): (19.134, 20.713),
    ("magnitude", "unstructured"): (414.947, 465.618),
    ("wanda", "unstructured"): (42.040, 45.102),
    ("sparsegpt", "unstructured"): (39.830, 42.499),
    ("magnitude", "2:4"): (1677.642, 1937.691),
    ("wanda", "2:4"): (159.526, 169.375),
    ("sparsegpt", "2:4"): (83.741, 84.781),
}


# block reconstruction as chosen on valid for 50 % and 2:4 alike (benchmarks/methods_valid.py, 8 calibration
# windows x 4 epochs): the same 32 Adam steps a layer here = 1 epoch of the protocol's 32 windows
RECONSTRUCT = ["--reconstruct-epochs", "1", "--reconstruct-lr", "1e-3"]
# what a row's mode adds to `asft prune`: (its key suffix, the flags)
MODES = {
    "true-sequential": ("-ts", ["--true-sequential"]),
    "channel-permutation": ("-cp", ["--channel-permutation"]),
    "reconstruct": ("-rc", RECONSTRUCT),
    "channel-permutation+reconstruct": ("-cp-rc", ["--channel-permutation", *RECONSTRUCT]),
}


def mode_suffix(mode: str) -> str:
    return MODES[mode][0] if mode else ""


def row_key(method: str, pattern: str, nsamples: int, mode: str = "") -> str:
    return f"{method}-{pattern}" + (f"-n{nsamples}" if nsamples not in (0, 32) else "") + mode_suffix(mode)


def done_rows(results: str = "foundation") -> dict:
    return {r["key"]: r for r in read_rows(results)}


def run_row(method: str, pattern: str, nsamples: int, done: dict, runs: Path, mode: str = "") -> dict:
    if method == "dense" and pattern == "-":
        model, prune = MODEL, None
    elif pattern == "full":
        if method == "dense":
            model, prune = MODEL, None
        elif method in done:  # the full test of that quick-protocol row's model
            model, prune = done[method]["model_dir"], None
            method = f"{done[method]['method']} {done[method]['pattern']}"
        else:  # the best 50 % unstructured quick-protocol row
            quick = [r for r in done.values() if r["pattern"] == "unstructured" and r["nsamples"] == 32]
            best = min(quick, key=lambda r: r["ppl_16w"])
            model, prune = best["model_dir"], None
            method = f"{best['method']} (best 50 %)"
    else:
        out = runs / (f"{method}-{pattern.replace(':', 'of')}-n{nsamples}" + mode_suffix(mode))
        args = ["prune", "--model", MODEL, "--method", method, "--pattern", pattern,
                "--seqlen", "2048", "--out", str(out), "--no-progress"]
        if nsamples:  # magnitude reads no calibration (and --nsamples 0 is refused)
            args += ["--nsamples", str(nsamples)]
        if pattern == "unstructured":
            args += ["--sparsity", "0.5"]
        if mode:
            args += MODES[mode][1]
            method = f"{method} ({mode})"
        asft(*args)
        model, prune = str(out), json.loads((out / "asft_run.json").read_text())
    result = wikitext_ppl(model, None if pattern == "full" else 16)
    row = {
        "method": method,
        "pattern": pattern,
        "model_dir": model,
        "nsamples": nsamples,
        "sparsity": result["sparsity"],
        "windows": result["windows"],
        "eval_s": result["seconds"],
        "prune_s": prune["timings"]["prune_s"] if prune else None,
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.node()}",
    }
    if pattern == "full":
        row["ppl_full"] = result["ppl"]
    else:
        row["ppl_8w"] = window_ppl(result["window_nll"][:8])
        row["ppl_16w"] = result["ppl"]
    return row


def table(done: dict) -> str:
    lines = [
        "| method | pattern | nsamples | sparsity | ppl 8w | ppl 16w | reference 8w / 16w | 16w vs reference "
        "| ppl full | prune time (s) | eval time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x, fmt):
        return "" if x is None else format(x, fmt)

    for r in done.values():
        ref = REFERENCE.get((r["method"].split(" (")[0], r["pattern"]))
        versus = ""
        if ref and r.get("ppl_16w"):
            versus = f"{100 * (r['ppl_16w'] / ref[1] - 1):+.1f} %"
        lines.append(
            f"| {r['method']} | {r['pattern']} | {r['nsamples']} | {r['sparsity']:.4f} | {f(r.get('ppl_8w'), '.3f')} | "
            f"{f(r.get('ppl_16w'), '.3f')} | {f'{ref[0]} / {ref[1]}' if ref else ''} | {versus} | "
            f"{f(r.get('ppl_full'), '.3f')} | {f(r.get('prune_s'), '.0f')} | {r['eval_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", help="keys such as wanda-unstructured or dense-full")
    parser.add_argument("--table", action="store_true", help="only print the table of finished rows")
    parser.add_argument("--results", default="foundation", help="rows file: benchmarks/results/NAME.jsonl")
    parser.add_argument("--compare-to", help="another rows file: print both ppl columns of the shared rows")
    args = parser.parse_args()
    results = ROOT / "benchmarks" / "results" / f"{args.results}.jsonl"
    runs = RUNS if args.results == "foundation" else RUNS.parent / args.results
    results.parent.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for method, pattern, nsamples, *mode in ROWS:
            key = row_key(method, pattern, nsamples, *mode)
            if key in done_rows(args.results) or (args.only and key not in args.only):
                continue
            start = time.perf_counter()
            row = {"key": key, **run_row(method, pattern, nsamples, done_rows(args.results), runs, *mode)}
            row["wall_s"] = time.perf_counter() - start
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(table(done_rows(args.results)))
    if args.compare_to:
        print(comparison(done_rows(args.compare_to), done_rows(args.results), args.compare_to, args.results))


def comparison(old: dict, new: dict, old_name: str, new_name: str) -> str:
    """The ppl columns of the rows both files hold, side by side, and whether they are equal to the last digit."""
    columns = ("ppl_8w", "ppl_16w", "ppl_full")
    lines = [f"| row | column | {old_name} | {new_name} | equal |", "|---|---|---|---|---|"]
    for key in (k for k in new if k in old):
        for col in (c for c in columns if c in new[key] and c in old[key]):
            a, b = old[key][col], new[key][col]
            lines.append(f"| {key} | {col} | {a!r} | {b!r} | {'yes' if a == b else f'no ({b / a - 1:+.2e})'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
