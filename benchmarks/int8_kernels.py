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

With --quality-tokens N it instead measures what each kernel does to quality: the perplexity of
SmolLM2-135M on the first N tokens of WikiText-2 test (one sequence) with every decoder linear and
the head on that kernel (no timing; any machine).

Usage: python benchmarks/int8_kernels.py [--threads N] [--seconds S]
       python benchmarks/int8_kernels.py --quality-tokens 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


class _Kernel(torch.nn.Module):
    """A linear on one probed kernel, for the quality check."""

    def __init__(self, kind: str, weight: torch.Tensor):
        super().__init__()
        import torch.ao.nn.quantized.dynamic as nnqd

        self.kind = kind
        self.scale = weight.abs().amax(1) / 127
        self.q = torch.round(weight / self.scale[:, None]).clamp(-127, 127).to(torch.int8)
        if kind == "dynamic":
            self.dyn = nnqd.Linear(weight.shape[1], weight.shape[0], bias_=False, dtype=torch.qint8)
            self.dyn.set_weight_bias(torch._make_per_channel_quantized_tensor(
                self.q, self.scale.double(), torch.zeros(weight.shape[0], dtype=torch.long), 0), None)

    def forward(self, x):
        shape, x2 = x.shape, x.reshape(-1, x.shape[-1])
        if self.kind == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        elif self.kind == "int8pack_bf16":
            y = torch.ops.aten._weight_int8pack_mm(x2.bfloat16(), self.q, self.scale.bfloat16()).float()
        elif self.kind == "int_mm":
            y = int_mm_linear(x2, self.q.t().contiguous().t(), self.scale)
        else:
            y = self.dyn(x2)
        return y.reshape(*shape[:-1], -1)


@torch.no_grad()
def quality(tokens: int) -> None:
    import copy
    from pathlib import Path

    from asft_ray.export.int8 import quantized_module_names
    from asft_ray.models import load_model

    model, tok = load_model("smollm2-135m", "cpu", show_progress=False)
    text = (Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "test.txt").read_text()
    ids = tok(text[: 40 * tokens], return_tensors="pt").input_ids[:, :tokens]

    def ppl(m) -> float:
        logits = m(ids).logits[0, :-1]
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp().item()

    print(json.dumps({"kernel": "fp32 dense", "tokens": ids.shape[1], "ppl": ppl(model)}), flush=True)
    for kind in ("int8pack", "int8pack_bf16", "int_mm", "dynamic"):
        m = copy.deepcopy(model)
        for name in quantized_module_names(m, head=True):
            m.set_submodule(name, _Kernel(kind, m.get_submodule(name).weight.detach()))
        print(json.dumps({"kernel": kind, "tokens": ids.shape[1], "ppl": ppl(m)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--seconds", type=float, default=1.0, help="time spent per kernel and shape")
    ap.add_argument("--quality-tokens", type=int, default=0, help="measure perplexity with each kernel instead")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quality_tokens:
        quality(args.quality_tokens)
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, engine {torch.backends.quantized.engine}")
    for out_f, in_f in SHAPES:
        print(json.dumps(probe(out_f, in_f, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
