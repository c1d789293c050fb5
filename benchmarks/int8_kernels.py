"""Which int8 linear is fastest for one decode step (batch 1) on this CPU? A kernel probe.

For each weight shape (out, in) of SmolLM2-135M and of a 1-2 B Llama, the median seconds of
y = x @ W.T for a (1, in) activation, through:

  fp32          F.linear with a float32 weight (the dense baseline)
  bf16          F.linear with a bfloat16 weight and activation
  int8pack      torch.ops.aten._weight_int8pack_mm: int8 weight, per-output-channel scale,
                float32 activation (weight-only int8; the CPU kernel torchao's int8 weight-only
                config and gpt-fast dispatch to)
  int8pack_bf16 the same kernel with a bfloat16 activation and scale
  dynamic       torch.ao.nn.quantized.dynamic.Linear (fbgemm/x86): int8 weight per channel,
                activation quantized per call (dynamic int8 x int8)
  int_mm        torch._int_mm on an activation quantized per token in Python (symmetric), then
                rescaled: the eager form of torchao's int8 dynamic-activation int8-weight config

Usage: python benchmarks/int8_kernels.py [--threads N] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

SHAPES = [(1536, 576), (576, 1536), (49152, 576), (8192, 2048), (2048, 8192), (2048, 2048)]


def timed(fn, seconds: float) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds / 5:
        fn()
        n += 1
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t) / n)
    return statistics.median(samples)


def int_mm_linear(x: torch.Tensor, q_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x_scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    xq = torch.round(x / x_scale).clamp(-127, 127).to(torch.int8)
    return torch._int_mm(xq, q_t.t()).float() * x_scale * scale


@torch.no_grad()
def probe(out_f: int, in_f: int, seconds: float) -> dict:
    import torch.ao.nn.quantized.dynamic as nnqd

    w = torch.randn(out_f, in_f) / in_f**0.5
    x = torch.randn(1, in_f)
    scale = w.abs().amax(1) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    dyn = nnqd.Linear(in_f, out_f, bias_=False, dtype=torch.qint8)
    dyn.set_weight_bias(torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(out_f, dtype=torch.long), 0), None)
    wb, xb, qt = w.bfloat16(), x.bfloat16(), q.t().contiguous().t()
    fns = {
        "fp32": lambda: torch.nn.functional.linear(x, w),
        "bf16": lambda: torch.nn.functional.linear(xb, wb),
        "int8pack": lambda: torch.ops.aten._weight_int8pack_mm(x, q, scale),
        "int8pack_bf16": lambda: torch.ops.aten._weight_int8pack_mm(xb, q, scale.bfloat16()),
        "dynamic": lambda: dyn(x),
        "int_mm": lambda: int_mm_linear(x, qt, scale),
    }
    us = {name: 1e6 * timed(fn, seconds) for name, fn in fns.items()}
    return {"shape": [out_f, in_f], "us": us, "speedup_vs_fp32": {k: us["fp32"] / v for k, v in us.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--seconds", type=float, default=1.0, help="time spent per kernel and shape")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, engine {torch.backends.quantized.engine}")
    for out_f, in_f in SHAPES:
        print(json.dumps(probe(out_f, in_f, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
