"""GPU check of recovery: 10 steps of a 50 % pruned SmolLM2-135M on one GPU, bf16 (fp32 master),
ZeRO-3 with partitioned loading, distillation from the dense model, masks checked in the module,
the fp32 master and both Adam moments (the run fails if any masked weight moved). Prints one JSON
line: tokens/s, losses, mask check, peak CUDA memory, wall time.

    python benchmarks/gpu_check_recovery.py                      # prunes by magnitude first (no download)
    python benchmarks/gpu_check_recovery.py --pruned runs/wanda50 --offload   # a given pruned dir; offload both

Without a CUDA device it prints why on stderr and exits with code 2 at once (nothing is run).
Expected cost on one modern GPU: model load ~1 min, 10 steps of 4 x 512 tokens well under a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DENSE = "smollm2-135m"
NO_GPU_EXIT = 2


def magnitude_pruned(folder: Path, sparsity: float = 0.5) -> Path:
    """SmolLM2 magnitude-pruned by the engine (every decoder linear, exact sparsity), saved once."""
    from asft_ray.config import Pattern
    from asft_ray.models import load_model, save_model
    from asft_ray.pruning.engine import prune_model

    if (folder / "config.json").is_file():
        return folder
    model, tokenizer = load_model(DENSE, "cpu", show_progress=False)
    prune_model(model, "magnitude", Pattern.parse("unstructured"), sparsity, show_progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, tokenizer, folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned", type=Path, help="a pruned HF model dir (default: magnitude-prune SmolLM2)")
    parser.add_argument("--teacher", default=DENSE, help="the dense model to distil from (default: %(default)s)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "gpu-check")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--offload", action="store_true", help="offload optimizer state and parameters to the CPU")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_check_recovery: no CUDA device here: this check needs one GPU; nothing was run", file=sys.stderr)
        return NO_GPU_EXIT

    from asft_ray.recovery.config import RecoverConfig
    from asft_ray.recovery.recipe import run_recover

    start = time.perf_counter()
    pruned = args.pruned or magnitude_pruned(args.runs / "magnitude50")
    cfg = RecoverConfig(
        model=str(pruned), teacher=args.teacher, kd_weight=1.0, lm_weight=1.0, out=str(args.runs / "recovered"),
        data_dir=args.data_dir, workers=1, worker_cpus=1, device="cuda", zero_stage=3, bf16=True,
        offload_optimizer=args.offload or None, offload_params=args.offload or None, max_steps=args.steps,
        seqlen=args.seqlen, grad_accum=args.grad_accum, lr=1e-4, overwrite=True,
    )
    record = run_recover(cfg)
    print(json.dumps({
        "check": "gpu_check_recovery", "device": torch.cuda.get_device_name(0), "pruned": str(pruned),
        "steps": len(record["losses"]), "tokens_per_step": record["tokens_per_step"],
        "tokens_per_s": record["tokens_per_s"], "losses": record["losses"], "mask_check": record["mask_check"],
        "peak_cuda_mib": [m.get("peak_cuda_mib") for m in record["memory"]],
        "peak_rss_mib": [m["peak_rss_mib"] for m in record["memory"]],
        "offload": args.offload, "wall_s": time.perf_counter() - start,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
