"""Inference speed of the deployment exports against the dense model, in one process and one run.

Variants (each optional except the dense baseline):
  dense           --model (alias, HF dir, .gguf)                      load_model
  compressed      --compressed DIR  (asft export --format compressed)  load_compressed: dense in memory,
                  so its speed equals dense; the row shows load time and bytes on disk
  structured      --structured DIR  (asft export --format structured, repeatable)
  2:4             --semistructured  (CUDA only: the --model, pruned 2:4, converted in memory)
  int8            --int8 DIR        (asft export --format int8 of the dense model or of a structured
                  export, repeatable; CPU; parameters count the int8 weights)
Each row: load seconds, parameters, weight bytes on disk, median prefill ms for a
--prompt-len prompt, median greedy decode tokens/s over --new-tokens, weights in memory, peak
memory of one prefill + decode (CPU: process RSS, weights and runtime included; CUDA: peak
allocated), and the ratios against dense (speedup = dense time / variant time). A dense
--model given as a GGUF alias has no safetensors size and its load time includes dequantizing. Rows are appended to
benchmarks/results/inference.jsonl; a markdown table is printed for BENCHMARKS.md.

CPU timings use `torch.set_num_threads(--threads)` (default: all cores); run on an idle machine.

    python benchmarks/inference.py --model smollm2-135m --compressed out/c --structured out/s25
    python benchmarks/inference.py --model /tmp/tiny --prompt-len 32 --new-tokens 8 --repeats 2   # smoke
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from results_io import append_row

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asft_ray.eval.speed import measure_speed  # noqa: E402
from asft_ray.export.compressed import load_compressed  # noqa: E402
from asft_ray.export.int8 import Int8Linear, load_int8  # noqa: E402
from asft_ray.models import load_model  # noqa: E402


def weight_bytes(folder: Path | None) -> int | None:
    if folder is None or not Path(folder).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def variants(args):
    """(name, loader returning a model, folder whose safetensors count as its size) in run order."""
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    device = args.device

    def dense():
        return load_model(args.model, device, dtype=dtype, show_progress=False)[0]

    yield "dense", dense, Path(args.model) if Path(args.model).is_dir() else None
    if args.compressed:
        yield "compressed", lambda: load_compressed(args.compressed, device).to(dtype), Path(args.compressed)
    for folder in args.structured or []:
        yield f"structured:{Path(folder).name}", (lambda f=folder: load_model(f, device, dtype=dtype, show_progress=False)[0]), Path(folder)
    for folder in args.int8 or []:
        yield f"int8:{Path(folder).name}", (lambda f=folder: load_int8(f, device, dtype=dtype)), Path(folder)
    if args.semistructured:
        from asft_ray.export.semistructured import to_semistructured

        def sparse24():
            model = dense()
            to_semistructured(model, args.dtype)
            return model

        yield "2:4", sparse24, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="dense baseline (and the 2:4 source with --semistructured)")
    p.add_argument("--compressed", help="folder written by asft export --format compressed")
    p.add_argument("--structured", action="append", help="folder written by asft export --format structured (repeatable)")
    p.add_argument("--int8", action="append", help="folder written by asft export --format int8 (repeatable)")
    p.add_argument("--semistructured", action="store_true", help="also run --model on 2:4 kernels (CUDA, fp16/bf16)")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-append", action="store_true", help="print only; do not append to results/inference.jsonl")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line instead of the table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rows, base = [], None
    for name, loader, folder in variants(args):
        start = time.perf_counter()
        model = loader()
        load_s = time.perf_counter() - start
        speed = measure_speed(model, args.prompt_len, args.new_tokens, args.repeats, args.warmup)
        row = {"variant": name, "model": args.model, "source": str(folder) if folder else args.model,
               "load_s": load_s, "parameters": sum(p.numel() for p in model.parameters())
               + sum(m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear)),
               "weight_bytes": weight_bytes(folder), "dtype": args.dtype, **speed}
        base = base or row
        row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
        row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
        row["param_ratio"] = row["parameters"] / base["parameters"]
        if row["weight_bytes"] and base["weight_bytes"]:
            row["bytes_ratio"] = row["weight_bytes"] / base["weight_bytes"]
        rows.append(append_row("inference", row) if not args.no_append else row)
        del model

    if args.json:
        print(json.dumps({"rows": rows}))
        return
    print("\n| variant | params | weights on disk | load s | prefill ms | decode tok/s | weights in memory MB | peak mem MB "
          "| prefill × | decode × |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        disk = f"{r['weight_bytes'] / 2**20:.1f} MiB" if r["weight_bytes"] else "–"
        print(f"| {r['variant']} | {r['parameters'] / 1e6:.1f} M | {disk} | {r['load_s']:.1f} | {r['prefill_ms']:.1f} | "
              f"{r['decode_tok_s']:.1f} | {r['weights_mb']:.0f} | {r['peak_mem_mb']:.0f} | {r['prefill_speedup']:.2f} | {r['decode_speedup']:.2f} |")
    print(f"\n{rows[0]['device']}, {args.dtype}, {rows[0]['threads']} threads, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, median of {args.repeats} after {args.warmup} warm-up")


if __name__ == "__main__":
    main()
