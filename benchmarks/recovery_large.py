"""Recovery of a model no worker holds whole (issue #14, acceptance 2): memory per worker and driver.

A random-init Llama (default: hidden 1536, MLP 4096, 15 layers, vocab 32000 = 523 M parameters,
2.09 GB of fp32 weights; the smallest of that width >= 0.5 B) is built once as safetensors and
pruned 50 % with `asft prune --method magnitude` (streamed). A tiny Llama of the same vocabulary
(hidden 64, 2 layers) is built and pruned the same way. Then for each label ZEROSTAGE-wWORKERS
(z3-w2, z3-w4, z2-w2, z2-w4) the real CLI runs

    asft recover --model PRUNED --teacher DENSE --zero-stage Z --workers W --worker-cpus min(1, 2/W)
                 --max-steps 3 --seqlen 128 --grad-accum 1 --seed 0 --overwrite --json

first on the tiny model, then on the large one, each under a /proc sampler (memory_streaming.PeakRss)
that records the driver's peak RSS (the CLI process) and every process below it. Each worker's
record gives its peak RSS and the bytes it holds, measured from the tensors: parameters, optimizer
state, gradients at the update (grads_mib) and the teacher's weights (teacher_mib).

The bound checked per worker (rank r):
    peak_rss(large, r) <= 1.25 x state(large, r) + overhead(r),
    state = params + optimizer + grads + teacher,  overhead(r) = peak_rss(tiny, r) - state(tiny, r)
(the tiny run has the same ranks, settings and vocabulary, so its overhead is the runtime: Python,
torch, DeepSpeed, Ray, logits of 128 tokens; rank 0 also exports). The driver: peak RSS below 25 %
of the fp32 weight bytes.

Before a large run the per-worker memory is estimated (fp32 bytes: ZeRO-2 holds the whole student
and teacher, its reduce bucket fills with every trainable gradient (T) up to 5e8 elements, and a
1/W partition of the gradient, master and two Adam moments: 2W + T + 4T/W; ZeRO-3: (2 x weights +
4T)/W) plus the tiny run's overhead; a run whose W workers, with a 10 % margin, would not fit in the memory
available now less 3 GiB (the driver and Ray's own processes) is not started, and its row says so
with the estimate.

One JSON line per label in benchmarks/results/recovery_large.jsonl (recovery_large-smoke.jsonl
with --smoke: a 2-layer hidden-256 "large" model, minutes, no lock needed).

    flock /tmp/asft-heavy.lock python benchmarks/recovery_large.py
    python benchmarks/recovery_large.py --smoke
    python benchmarks/recovery_large.py --layers 4 --tag 211m --only z2-w2 z3-w2   # another shape
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
from memory_streaming import PeakRss, add_model_shape_args, build_model
from results_io import append_row

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("z3-w2", "z3-w4", "z2-w2", "z2-w4")
MIB = 2**20
RESERVE_MIB = 3 * 1024  # the driver (~0.55 GiB) and Ray's controller and helper actors (~1.6 GiB), measured


def cli(args: list[str], label: str) -> tuple[dict, dict]:
    """One CLI command under the /proc sampler: (its JSON record, memory facts of the driver and Ray)."""
    cmd = [sys.executable, "-m", "asft_ray.cli", *args, "--json", "--no-progress"]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    with PeakRss() as rss:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{err[-4000:]}")
    record = json.loads(out[out.index("{"):])
    me = psutil.Process().pid
    peaks = {f"{rss.names.get(pid, '?')[:60]} [{pid}]": peak for pid, peak in rss.peaks.items() if pid != me}
    facts = {
        "wall_s": wall,
        "driver_peak_bytes": rss.peaks.get(proc.pid, 0),
        "driver_parts_bytes": {p: rss.parts.get((proc.pid, p), 0) for p in ("RssAnon", "RssFile", "RssShmem")},
        "processes_peak_bytes": dict(sorted(peaks.items(), key=lambda kv: -kv[1])[:10]),
    }
    return record, facts


def state_mib(worker: dict) -> float:
    return worker["params_mib"] + worker["optimizer_mib"] + worker["grads_mib"] + worker["teacher_mib"]


def summarize(record: dict, facts: dict) -> dict:
    keys = ("peak_rss_mib", "train_rss_max_mib", "rss_peak_by_phase_mib", "params_mib", "optimizer_mib", "grads_mib", "teacher_mib",
            "load_read_bytes", "load_full_param_bytes", "mask_bytes")
    return {"workers": [{k: m.get(k) for k in keys} | {"state_mib": state_mib(m)} for m in record["memory"]],
            "losses": record["losses"], "tokens_per_s": record["tokens_per_s"], "timings": record["timings"],
            "mask_check": record["mask_check"], **facts}


def model_numbers(folder: Path) -> dict:
    """Parameters, trainable (decoder linear) parameters and fp32 weight bytes, from the config."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(folder)
    h, i, n = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    linear = n * (2 * h * h + 2 * h * kv + 3 * h * i)
    params = linear + n * 2 * h + h + c.vocab_size * h * (1 if c.tie_word_embeddings else 2)
    return {"params": params, "trainable": linear, "fp32_bytes": 4 * params,
            "shape": {"hidden": h, "intermediate": i, "layers": n, "vocab": c.vocab_size}}


def estimate_bytes(numbers: dict, zero: int, workers: int) -> float:
    """Model-state bytes per worker (see the module docstring), before runtime overhead."""
    w, t = numbers["fp32_bytes"], 4 * numbers["trainable"]
    if zero == 2:
        return 2 * w + min(t, 4 * 5e8) + 4 * t / workers
    return (2 * w + 4 * t) / workers


def ensure_models(work: Path, shape: dict, tiny_shape: dict) -> dict[str, Path]:
    folders = {}
    for name, dims in (("large", shape), ("tiny", tiny_shape)):
        dense, pruned = work / f"{name}-dense", work / f"{name}-pruned"
        if not (dense / "config.json").is_file():
            shutil.rmtree(dense, ignore_errors=True)
            print(f"building {name}: {dims}", flush=True)
            build_model(dense, **dims)
        if not (pruned / "asft_run.json").is_file():
            subprocess.run([sys.executable, "-m", "asft_ray.cli", "prune", "--model", str(dense), "--method", "magnitude",
                            "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "128", "--out", str(pruned),
                            "--overwrite", "--no-progress"], cwd=ROOT, check=True)
        folders[f"{name}-dense"], folders[f"{name}-pruned"] = dense, pruned
    return folders


def recover_args(pruned: Path, dense: Path, out: Path, zero: int, workers: int, steps: int, seqlen: int) -> list[str]:
    return ["recover", "--model", str(pruned), "--teacher", str(dense), "--out", str(out), "--workers", str(workers),
            "--worker-cpus", str(min(1.0, 2 / workers)), "--zero-stage", str(zero), "--max-steps", str(steps),
            "--seqlen", str(seqlen), "--grad-accum", "1", "--seed", "0", "--overwrite"]


def run_label(label: str, folders: dict, work: Path, opts, numbers: dict) -> dict:
    zero, workers = int(label[1]), int(label.split("-w")[1])
    row = {"key": label + opts.tag, "zero_stage": zero, "workers": workers, "steps": opts.steps, "seqlen": opts.seqlen,
           **numbers}
    tiny_out, large_out = work / f"out-tiny-{label}", work / f"out-large-{label}"
    extra = list(opts.recover_flags)  # the same flags for the tiny run that measures the fixed overhead
    row["recover_flags"] = extra
    record, facts = cli(recover_args(folders["tiny-pruned"], folders["tiny-dense"], tiny_out, zero, workers,
                                     opts.steps, opts.seqlen) + extra, f"tiny {label}")
    row["tiny"] = tiny = summarize(record, facts)
    overhead = [w["peak_rss_mib"] - w["state_mib"] for w in tiny["workers"]]
    row["overhead_mib"] = overhead
    estimate = estimate_bytes(numbers, zero, workers) / MIB + max(overhead)
    available = psutil.virtual_memory().available / MIB
    row["estimate_mib_per_worker"], row["available_mib_at_start"] = estimate, available
    if 1.1 * workers * estimate > available - RESERVE_MIB:
        row["skipped"] = (f"not run: 1.1 x {workers} workers x {estimate / 1024:.1f} GiB estimated = "
                          f"{1.1 * workers * estimate / 1024:.1f} GiB > {available / 1024:.1f} GiB available "
                          f"- {RESERVE_MIB / 1024:.0f} GiB for the driver and Ray's own processes")
        print(row["skipped"], flush=True)
        return row
    record, facts = cli(recover_args(folders["large-pruned"], folders["large-dense"], large_out, zero, workers,
                                     opts.steps, opts.seqlen) + extra, f"large {label}")
    row["large"] = large = summarize(record, facts)
    row["bound_mib"] = [1.25 * w["state_mib"] + o for w, o in zip(large["workers"], overhead)]
    row["bound_ok"] = [w["peak_rss_mib"] <= b for w, b in zip(large["workers"], row["bound_mib"])]
    row["driver_fraction_of_fp32_weights"] = large["driver_peak_bytes"] / numbers["fp32_bytes"]
    row["driver_ok"] = row["driver_fraction_of_fp32_weights"] < 0.25
    shutil.rmtree(large_out, ignore_errors=True)  # 2 GB each; the numbers are in the row
    return row


def table(name: str) -> None:
    """The rows of results/NAME.jsonl as one markdown table (MiB), one line per worker."""
    from results_io import read_rows

    print("| run | rank | params | grads | optimizer | teacher | state | tiny overhead | bound | peak RSS | ok | driver peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in read_rows(name):
        if "large" not in row:
            print(f"| {row['key']} | | | | | | | {max(row['overhead_mib']):.0f} | | "
                  f"not run (estimate {row['estimate_mib_per_worker']:.0f} per worker) | | |")
            continue
        driver = row["large"]["driver_peak_bytes"] / MIB
        for r, (w, o, b, ok) in enumerate(zip(row["large"]["workers"], row["overhead_mib"], row["bound_mib"],
                                              row["bound_ok"])):
            print(f"| {row['key']} | {r} | {w['params_mib']:.0f} | {w['grads_mib']:.0f} | {w['optimizer_mib']:.0f} | "
                  f"{w['teacher_mib']:.0f} | {w['state_mib']:.0f} | {o:.0f} | {b:.0f} | {w['peak_rss_mib']:.0f} | "
                  f"{'yes' if ok else 'NO'} | {driver:.0f} ({row['driver_fraction_of_fp32_weights']:.1%}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_shape_args(parser)
    parser.set_defaults(hidden=1536, intermediate=4096, layers=15, vocab=32000)
    parser.add_argument("--only", nargs="*", choices=LABELS, help="labels to run (default: all, in order)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--workdir", default="runs/recovery-large")
    parser.add_argument("--tag", default="", help="suffix of the row keys (another shape)")
    parser.add_argument("--recover-flags", nargs="*", default=[],
                        help="more `asft recover` flags for every run, e.g. --recover-flags=--activation-checkpointing")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer hidden-256 model, own results file")
    parser.add_argument("--table", action="store_true", help="only print the rows as a markdown table")
    opts = parser.parse_args()
    name = "recovery_large"
    if opts.smoke:
        name, opts.workdir = "recovery_large-smoke", "runs/recovery-large-smoke"
        opts.hidden, opts.intermediate, opts.layers, opts.vocab = 256, 512, 2, 32000
    if opts.table:
        return table(name)
    if opts.tag:
        opts.tag = "@" + opts.tag
    work = ROOT / opts.workdir
    shape = {"hidden": opts.hidden, "intermediate": opts.intermediate, "layers": opts.layers, "vocab": opts.vocab}
    tiny_shape = {"hidden": 64, "intermediate": 128, "layers": 2, "vocab": opts.vocab}
    folders = ensure_models(work, shape, tiny_shape)
    numbers = model_numbers(folders["large-dense"])
    print(json.dumps(numbers), flush=True)
    for label in opts.only or LABELS:
        append_row(name, run_label(label, folders, work, opts, numbers))


if __name__ == "__main__":
    main()
