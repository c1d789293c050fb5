"""The large-model path with its defaults: peak memory of every process and the speed-up of a second worker.

A random-init Llama (default ~1.57 B parameters, 6.3 GB of fp32 weights; built once, reused) and a
bf16 copy of it, run through the real CLI (`python -m asft_ray.cli`) with no flag or environment
variable set to stay in bounds:

  * `asft prune --method sparsegpt --workers 2` and `--workers 1` (fp32; same output bits expected);
  * `asft eval --workers 2` and `--workers 1` (streamed; windows sharded over the workers);
  * `asft staged` with Wanda, 2 workers, stages 30 % -> 50 % and a gate of 4 windows (streamed);
  * `asft export --format compressed` of the pruned model (streamed: one decoder layer at a time);
  * `asft prune --method fisher --workers 2` (the layer-streamed backward; the workers are not used);
  * `asft sweep` of Wanda 50 % schedules, 2 trials at once (each streams the model: prune and
    validation one layer at a time);
  * `asft run` of a pipeline config: a one-stage Wanda prune on 2 workers with its gate, the compressed
    export, the evaluation of dense and pruned (streamed, zero-shot included) and the report (no
    recovery: see `_pipeline_config`); `pipeline-recover-w2` adds 3 ZeRO-3 recovery steps (for a smaller shape);
  * `asft prune --method wanda --pattern 2:4 --channel-permutation --workers 2`, and the same without
    the permutation (its extra statistics pass and order search per layer);
  * `asft prune --method sparsegpt --workers 2` on the bf16 copy (output size = input size);
  * `asft prune --method wanda --reconstruct-epochs 1 --workers 2` (block reconstruction: each layer's
    Adam fit on one scoring actor), and the same Wanda prune without it.

Each command runs under a sampler of /proc (benchmarks/memory_streaming.PeakRss) that records the
peak RSS of the CLI process and every process below it (Ray's GCS, raylet, the pruning coordinator,
the scoring actors), and each one's CPU seconds (`cpu_s`). One JSON line per command in
benchmarks/results/large_model.jsonl.

    python benchmarks/large_model.py                        # needs ~20 GB of disk under runs/
    python benchmarks/large_model.py --hidden 256 --intermediate 512 --layers 4 --workdir runs/lm-smoke  # smoke
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


def run_measured(label: str, args: list[str], weight_bytes: dict, record_file: Path | None = None) -> dict:
    """One CLI command under the /proc sampler; its record, wall time and the peak of every process.
    The record is what the command prints with --json, or with `record_file`, what it writes there
    (`asft run`: its report.json)."""
    cmd = [sys.executable, "-m", "asft_ray.cli", *args, *(["--json"] if record_file is None else []), "--no-progress"]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    with PeakRss() as rss:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{label} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    record = json.loads(done.stdout[done.stdout.index("{"):] if record_file is None else record_file.read_text())
    me = psutil.Process().pid
    peaks = {f"{rss.names.get(pid, '?')} [{pid}]": peak for pid, peak in rss.peaks.items() if pid != me}
    private = {f"{rss.names.get(pid, '?')} [{pid}]": rss.parts.get((pid, "RssAnon"), 0) for pid in rss.peaks if pid != me}
    top = dict(sorted(peaks.items(), key=lambda kv: -kv[1])[:8])
    # what the largest peaks are made of: private (RssAnon), object-store pages (RssShmem), mapped files
    # (RssFile), each the largest value seen for that process (not necessarily at the same instant)
    parts = {f"{rss.names.get(pid, '?')} [{pid}]": {part: rss.parts.get((pid, part), 0)
                                                    for part in ("RssAnon", "RssShmem", "RssFile")}
             for pid, _ in sorted(rss.peaks.items(), key=lambda kv: -kv[1])[:4] if pid != me}
    # where the CPU time went: with as many workers as cores, every CPU second outside them slows them
    cpu_s = {f"{rss.names.get(pid, '?')} [{pid}]": round(seconds, 1) for pid, seconds in
             sorted(rss.cpu_s.items(), key=lambda kv: -kv[1]) if pid != me and seconds >= 1.0}
    # the kernel's peak RSS of each process (VmHWM): what a 0.2 s sampler can miss between two looks
    hwm = {pid: value for pid, value in rss.hwm.items() if pid != me}
    row = {"label": label, "command": " ".join(args), "wall_s": wall, "peak_rss_bytes": top, "peak_parts_bytes": parts,
           "cpu_s": cpu_s,
           "max_peak_bytes": max(peaks.values()), "max_private_bytes": max(private.values()),
           **{f"max_peak_fraction_of_{k}": max(peaks.values()) / v for k, v in weight_bytes.items()},
           "max_hwm_bytes": max(hwm.values()), "max_hwm_process": rss.names.get(max(hwm, key=hwm.get), "?"),
           **{f"max_hwm_fraction_of_{k}": max(hwm.values()) / v for k, v in weight_bytes.items()},
           "store_shmem_peak_bytes": rss.shmem_peak}
    for key in ("timings", "sparsity", "ppl", "seconds", "windows", "tokens", "window_nll", "streamed",
                "file_ratio", "weights_file_bytes", "dense", "results", "final", "cost_plan", "parameter_ratio",
                "trials", "completed", "best", "prepare_s", "sweep_s", "models", "pipeline_seconds", "recommended"):
        if key in record:
            row[key] = record[key] if key != "sparsity" or not isinstance(record[key], dict) else record[key]["total"]
    append_row("large_model", row)
    print(json.dumps({k: v for k, v in row.items() if k not in ("window_nll", "peak_rss_bytes", "peak_parts_bytes",
                                                                 "cpu_s")}), flush=True)
    return row


def check_cost_prediction(dense: Path, structured: Path) -> dict:
    """The structured export's predicted decode cost (structured.json: cost_plan, the cost model
    calibrated on shallower copies of this shape) against a measurement of both models, each loaded
    whole in this harness process (no memory claim), with the calibration's own decode loop."""
    import torch
    from transformers import AutoModelForCausalLM

    from asft_ray.eval.cost_calibration import decode_cost

    plan = json.loads((structured / "structured.json").read_text())["cost_plan"]
    new_tokens = 16
    prompt = plan["context"] - new_tokens // 2  # decode_cost's context: the prompt + half the new tokens
    measured = {}
    with torch.no_grad():
        for name, folder in (("dense", dense), ("structured", structured)):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            measured[name] = decode_cost(model, prompt, new_tokens, repeats=3, warmup=1)
            del model
    ratio = measured["structured"]["seconds_per_token"] / measured["dense"]["seconds_per_token"]
    return {"context": plan["context"], "measured": measured, "measured_relative_cost": ratio,
            "predicted_relative_cost": plan["predicted_relative_cost"],
            "predicted_seconds_per_token": {"dense": plan["dense_predicted_seconds_per_token"],
                                            "structured": plan["predicted_seconds_per_token"]},
            "relative_error_of_ratio": plan["predicted_relative_cost"] / ratio - 1}


def _staged_config(work: Path, model: Path, opts) -> Path:
    """A 2-stage run (30 % then 50 %) whose gate passes both stages: the model is random, the run
    measures memory and time of the staged path (prune a stage, gate it, keep it), not quality."""
    import yaml

    config = work / "staged.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model), "method": "wanda", "nsamples": opts.nsamples, "seqlen": opts.seqlen, "workers": 2,
        "out": str(work / "staged-w2"), "stages": [0.3, 0.5], "gate": {"max_ppl_ratio": 100.0, "windows": 4}}))
    return config


def _sweep_config(work: Path, model: Path, opts) -> Path:
    """A 2-trial schedule sweep of the streamed model (each trial prunes and evaluates it a layer at a time)."""
    import yaml

    config = work / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model), "method": "wanda", "sparsity": 0.5, "nsamples": opts.nsamples, "seqlen": opts.seqlen,
        "out": str(work / "sweep"), "trials": 2, "concurrency": 2, "val_windows": 2, "groups": 2}))
    return config


def _pipeline_config(work: Path, model: Path, opts, recover: bool = False) -> Path:
    """`asft run`: a one-stage Wanda prune on 2 workers with its gate, the compressed export, the
    evaluation of dense and pruned (streamed when larger than `whole_model_max_gb`: speed predicted by
    the decode-cost model calibrated here), then the report. Memory and time of the whole path, not
    quality: the model is random.

    Without recovery by default: on the 1.57 B model its Adam state alone (16 bytes a parameter, 25 GB)
    is more than this machine. With `recover` (label pipeline-recover-w2, meant for the 0.5 B shape of
    recovery_large.py: --hidden 1536 --intermediate 4096 --layers 15): 3 ZeRO-3 steps on 2 Ray Train
    workers distilling from the dense model, and every model evaluated streamed (whole_model_max_gb 1)."""
    import yaml

    name = "pipeline-recover" if recover else "pipeline"
    values = {
        "model": str(model), "out": str(work / name),
        "prune": {"method": "wanda", "nsamples": opts.nsamples, "seqlen": opts.seqlen, "workers": 2, "stages": [0.5],
                  "gate": {"max_ppl_ratio": 100.0, "windows": 2}},
        "export": ["compressed"],
        "eval": {"ppl_windows": 4, "ppl_seqlen": opts.seqlen, "zeroshot": ["arc_easy", "piqa"], "zeroshot_limit": 20},
        "price_per_hour": 0.10}
    if recover:
        values["recover"] = {"workers": 2, "zero_stage": 3, "max_steps": 3, "seqlen": 128, "distill": True,
                             "eval_every": 0}
        values["eval"]["whole_model_max_gb"] = 1.0
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(values))
    return config


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main():
    parser = argparse.ArgumentParser()
    add_model_shape_args(parser)
    parser.add_argument("--nsamples", type=int, default=8, help="calibration windows (8 = two chunks of 4)")
    parser.add_argument("--seqlen", type=int, default=256, help="calibration and evaluation window length")
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows")
    parser.add_argument("--workdir", default="runs/large-model")
    parser.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    parser.add_argument("--eval-model", default="sgpt-w2", help="the model (under --workdir) the eval rows read")
    opts = parser.parse_args()
    work = ROOT / opts.workdir
    fp32, bf16 = work / "model-fp32", work / "model-bf16"
    if not (fp32 / "config.json").is_file():
        build_model(fp32, opts.hidden, opts.intermediate, opts.layers, opts.vocab)
    if not (bf16 / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(bf16, max_shard_size="1GB")
        AutoTokenizer.from_pretrained(fp32).save_pretrained(bf16)
    sizes = {"fp32": folder_bytes(fp32), "bf16": folder_bytes(bf16)}
    print(json.dumps({"weight_bytes": sizes}), flush=True)

    calib = ["--nsamples", str(opts.nsamples), "--seqlen", str(opts.seqlen), "--overwrite"]
    evaluation = ["--task", "wikitext2", "--seqlen", str(opts.seqlen), "--max-windows", str(opts.windows)]
    runs = {
        "sparsegpt-fp32-w2": ["prune", "--model", str(fp32), "--method", "sparsegpt", "--sparsity", "0.5",
                              "--workers", "2", "--out", str(work / "sgpt-w2"), *calib],
        "sparsegpt-fp32-w1": ["prune", "--model", str(fp32), "--method", "sparsegpt", "--sparsity", "0.5",
                              "--workers", "1", "--out", str(work / "sgpt-w1"), *calib],
        "eval-w2": ["eval", "--model", str(work / opts.eval_model), "--workers", "2", *evaluation],
        "eval-w1": ["eval", "--model", str(work / opts.eval_model), "--workers", "1", *evaluation],
        "staged-wanda-w2": ["staged", str(_staged_config(work, fp32, opts)), "--overwrite"],
        "sweep-wanda": ["sweep", str(_sweep_config(work, fp32, opts))],
        "pipeline-wanda-w2": ["run", str(_pipeline_config(work, fp32, opts))],
        "pipeline-recover-w2": ["run", str(_pipeline_config(work, fp32, opts, recover=True))],
        "export-compressed": ["export", "--model", str(work / "sgpt-w2"), "--format", "compressed",
                              "--out", str(work / "sgpt-w2-compressed"), "--overwrite"],
        # N:M with the MLP channel permutation (an extra statistics pass and the order search per layer)
        # next to the same prune without it
        "wanda-2of4-perm-w2": ["prune", "--model", str(fp32), "--method", "wanda", "--pattern", "2:4",
                               "--channel-permutation", "--workers", "2", "--out", str(work / "wanda24-perm-w2"), *calib],
        "wanda-2of4-w2": ["prune", "--model", str(fp32), "--method", "wanda", "--pattern", "2:4",
                          "--workers", "2", "--out", str(work / "wanda24-w2"), *calib],
        # block reconstruction (each layer's Adam fit on one scoring actor, its targets from a second,
        # dense stream) next to the same Wanda prune without it
        "wanda-fp32-w2": ["prune", "--model", str(fp32), "--method", "wanda", "--sparsity", "0.5",
                          "--workers", "2", "--out", str(work / "wanda-w2"), *calib],
        "wanda-reconstruct-fp32-w2": ["prune", "--model", str(fp32), "--method", "wanda", "--sparsity", "0.5",
                                      "--reconstruct-epochs", "1", "--workers", "2",
                                      "--out", str(work / "wanda-rc-w2"), *calib],
        "fisher-fp32-w2": ["prune", "--model", str(fp32), "--method", "fisher", "--sparsity", "0.5",
                           "--workers", "2", "--out", str(work / "fisher-w2"), *calib],
        "sparsegpt-bf16-w2": ["prune", "--model", str(bf16), "--method", "sparsegpt", "--sparsity", "0.5",
                              "--workers", "2", "--out", str(work / "sgpt-bf16-w2"), *calib],
        # structure under a cost budget: decode-cost calibration (bounded: shallower models of the same
        # widths) + the streamed structured export (one layer at a time) with the least-squares refit
        "structured-cost-fp32": ["export", "--model", str(fp32), "--format", "structured", "--cost-target", "0.7",
                                 "--cost-knobs", "mlp,heads",
                                 "--refit", "--nsamples", str(opts.nsamples), "--seqlen", str(opts.seqlen),
                                 "--out", str(work / "structured-cost"), "--overwrite"],
    }
    rows = {}
    for label, args in runs.items():
        if opts.only is None or label in opts.only:
            if label == "staged-wanda-w2":  # a staged run resumes the stages it finds: measure a fresh one
                shutil.rmtree(work / "staged-w2", ignore_errors=True)
            if label == "sweep-wanda":  # likewise a sweep resumes its trials
                shutil.rmtree(work / "sweep", ignore_errors=True)
            pipeline = {"pipeline-wanda-w2": "pipeline", "pipeline-recover-w2": "pipeline-recover"}.get(label)
            if pipeline:  # and a pipeline its stages
                shutil.rmtree(work / pipeline, ignore_errors=True)
            record = work / pipeline / "report.json" if pipeline else None
            rows[label] = run_measured(label, args, sizes, record)
    summary = {}
    if opts.only is not None and "structured-cost-check" in opts.only:
        summary["structured_cost_check"] = check_cost_prediction(fp32, work / "structured-cost")
    if {"sparsegpt-fp32-w1", "sparsegpt-fp32-w2"} <= rows.keys():
        from safetensors.torch import load_file

        a = {k: v for f in sorted((work / "sgpt-w1").glob("*.safetensors")) for k, v in load_file(f).items()}
        b = {k: v for f in sorted((work / "sgpt-w2").glob("*.safetensors")) for k, v in load_file(f).items()}
        summary["w1_w2_bit_identical"] = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
        del a, b
        summary["prune_time_ratio_w2_over_w1"] = (rows["sparsegpt-fp32-w2"]["timings"]["prune_s"]
                                                 / rows["sparsegpt-fp32-w1"]["timings"]["prune_s"])
    if {"eval-w1", "eval-w2"} <= rows.keys():
        summary["eval_throughput_w2_over_w1"] = rows["eval-w1"]["seconds"] / rows["eval-w2"]["seconds"]
        summary["eval_equal_nll"] = rows["eval-w1"]["window_nll"] == rows["eval-w2"]["window_nll"]
    if "sparsegpt-bf16-w2" in rows:
        out = folder_bytes(work / "sgpt-bf16-w2")
        summary["bf16_output_over_input_size"] = out / sizes["bf16"]
    if summary:
        append_row("large_model", {"label": "summary", **summary, "weight_bytes": sizes})
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
