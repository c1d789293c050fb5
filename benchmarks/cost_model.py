"""Calibrate the decode-cost model (asft_ray/eval/cost_model.py) on this machine and test it on held-out shapes.

Random-init Llama models (no download; speed does not depend on the weights' values), float32,
tied head as in SmolLM2. For each shape: the greedy decode cost per generated token (eval/speed.py's
decode loop: a --prompt-len prompt prefilled untimed, then --new-tokens cached steps; the median of
--repeats runs after --warmup), first with float32 linears, then with the decoder linears and the
head as int8 (export/int8.quantize_model: the kernel the int8 export loads onto).

The model is fitted on the CALIBRATION shapes only and then predicts the HELD_OUT ones: SmolLM2-135M
itself, SmolLM2-135M shrunk the way a structured export shrinks it (MLP -50 %, 6 layers dropped), and a
wider, shallower Llama none of the calibration shapes has. The row (all measurements, coefficients,
predicted vs measured, relative errors) goes to benchmarks/results/cost_model.jsonl and the fitted
model to benchmarks/results/cost_model-fit.json.

    python benchmarks/cost_model.py                  # ~6 minutes on 2 vCPUs
    python benchmarks/cost_model.py --smoke          # tiny shapes, seconds: the code path only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import RESULTS_DIR, append_row  # noqa: E402

from asft_ray.eval.cost_calibration import as_measurement, measure as measure_shape  # noqa: E402
from asft_ray.eval.cost_model import DecoderShape, fit  # noqa: E402

# (hidden, intermediate, heads, kv_heads, layers, vocab, prompt_len): varied widths, depths, vocabularies and contexts
# 34 M - 78 M linear weights (135 - 310 MB in float32), near the held-out shapes (81 M - 135 M), so that
# no shape runs from a cache the others do not fit in
CALIBRATION = [
    (512, 1024, 8, 2, 24, 8192, 64),
    (512, 1536, 8, 4, 8, 16384, 512),
    (576, 1536, 9, 3, 12, 49152, 128),
    (768, 2048, 12, 4, 6, 32000, 256),
    (384, 1024, 6, 2, 32, 16384, 128),
    (1024, 2816, 16, 4, 4, 32000, 64),
    (576, 768, 6, 2, 20, 49152, 256),
    (640, 1792, 10, 5, 14, 16384, 512),
]
HELD_OUT = {
    "smollm2-135m": (576, 1536, 9, 3, 30, 49152, 512),
    "smollm2-135m mlp-50% drop-6": (576, 768, 9, 3, 24, 49152, 512),
    "wide-shallow": (896, 2432, 14, 2, 10, 32000, 256),
}
SMOKE_CALIBRATION = [(64, 128, 4, 2, 2, 512, 16), (96, 192, 4, 2, 3, 1024, 32), (128, 256, 8, 4, 2, 512, 16),
                     (64, 256, 4, 1, 4, 768, 32), (128, 128, 4, 2, 3, 512, 16), (96, 384, 6, 2, 2, 1024, 32)]
SMOKE_HELD_OUT = {"smoke": (112, 224, 7, 7, 3, 640, 24)}


def measure(spec, args) -> list[dict]:
    """The float32 and the int8 measurement of one shape (asft_ray/eval/cost_calibration.measure)."""
    *dims, prompt_len = spec
    start = time.perf_counter()
    rows = measure_shape(DecoderShape(*dims), (prompt_len,), args.new_tokens, args.repeats, args.warmup, int8_too=True)
    for row in rows:
        print(json.dumps(row), flush=True)
    print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: check the code path, record nothing")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    calibration, held_out = (SMOKE_CALIBRATION, SMOKE_HELD_OUT) if args.smoke else (CALIBRATION, HELD_OUT)
    start = time.perf_counter()
    with torch.no_grad():
        calibrated = [row for spec in calibration for row in measure(spec, args)]
        tested = {name: measure(spec, args) for name, spec in held_out.items()}
    model = fit([as_measurement(row) for row in calibrated])
    results = []
    for name, rows in tested.items():
        for row in rows:
            m = as_measurement(row)
            predicted = model.predict(m.shape, m.context)
            results.append({"name": name + (" int8" if m.shape.int8 else " fp32"), "context": m.context,
                            "measured_ms": 1000 * m.seconds_per_token, "predicted_ms": 1000 * predicted,
                            "relative_error": predicted / m.seconds_per_token - 1})
    print("\n| held-out shape | context | measured ms/token | predicted | error |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['context']} | {r['measured_ms']:.2f} | {r['predicted_ms']:.2f} | {100 * r['relative_error']:+.1f} % |")
    print("coefficients:", json.dumps(model.coefficients))
    print("calibration fit errors:", [f"{100 * c['relative_error']:+.1f} %" for c in model.calibration])
    if args.smoke:
        return
    (RESULTS_DIR / "cost_model-fit.json").write_text(json.dumps(model.to_dict(), indent=2) + "\n")
    append_row("cost_model", {"threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "repeats": args.repeats,
                              "warmup": args.warmup, "torch": torch.__version__, "coefficients": model.coefficients,
                              "calibration": model.calibration, "held_out": results, "measurements": calibrated,
                              "held_out_measurements": tested, "max_abs_held_out_error": max(abs(r["relative_error"]) for r in results),
                              "seconds": time.perf_counter() - start})


if __name__ == "__main__":
    main()
