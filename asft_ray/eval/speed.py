"""Inference speed of a causal LM: prefill latency, greedy decode throughput, peak memory.

  prefill   one forward pass over a `prompt_len`-token prompt that builds the KV cache
  decode    `new_tokens` greedy steps, one token each, reusing the KV cache (transformers'
            DynamicCache; no static cache, no compilation); the prompt's prefill is not timed
  memory    the peak while one prefill + decode runs, weights included: on CUDA the allocator's
            peak allocated bytes; on CPU the process RSS (Python and torch's own ~0.3-0.5 GB
            too), sampled every 2 ms by a thread, so very short spikes can be missed.
            `weights_mb` is the model's parameter and buffer bytes, for the difference

Every measurement is repeated after `warmup` untimed runs and the median is reported, with
all samples. CPU timings depend on torch's intra-op threads: the benchmark script sets them
with `torch.set_num_threads` and records `threads`. The prompt is seeded random token ids
(speed does not depend on the content).
"""

from __future__ import annotations

import statistics
import threading
import time

import psutil
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    device = _device(model)
    _sync(device)
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Seconds for `new_tokens` greedy steps after an untimed prefill, and the generated ids."""
    device = _device(model)
    out = model(input_ids=ids, use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    generated = [token]
    _sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        generated.append(token)
    _sync(device)
    return time.perf_counter() - start, torch.cat(generated, dim=1)


class PeakMemory:
    """Peak memory while the block runs: CUDA allocated bytes, or the CPU process RSS."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device, self.interval_s, self.peak_bytes = device, interval_s, 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._proc = psutil.Process()
            self._peak = self._proc.memory_info().rss
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.peak_bytes = self._peak

    @property
    def kind(self) -> str:
        return "cuda_allocated_peak" if self.device.type == "cuda" else "cpu_rss_peak"


def weights_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (tied tensors once)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _timed_samples(fn, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(repeats)]


def prompt_ids(vocab_size: int, prompt_len: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, prompt_len), generator=g)


def measure_speed(model, prompt_len: int = 512, new_tokens: int = 64, repeats: int = 5, warmup: int = 1,
                  seed: int = 0) -> dict:
    """Median prefill latency, median decode tokens/s and the peak memory of one prefill + decode."""
    if prompt_len < 1 or new_tokens < 2 or repeats < 1 or warmup < 0:
        raise ValueError("need prompt_len >= 1, new_tokens >= 2, repeats >= 1, warmup >= 0")
    device = _device(model)
    ids = prompt_ids(model.config.vocab_size, prompt_len, seed).to(device)
    prefill = _timed_samples(lambda: prefill_seconds(model, ids), repeats, warmup)
    decode = _timed_samples(lambda: decode_seconds(model, ids, new_tokens)[0], repeats, warmup)
    with PeakMemory(device) as mem:
        decode_seconds(model, ids, new_tokens)
    steps = new_tokens - 1  # the first new token comes from the prefill
    return {
        "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
        "prefill_ms": 1000 * statistics.median(prefill), "prefill_ms_all": [1000 * s for s in prefill],
        "decode_tok_s": steps / statistics.median(decode), "decode_tok_s_all": [steps / s for s in decode],
        "peak_mem_mb": mem.peak_bytes / 2**20, "memory": mem.kind, "weights_mb": weights_bytes(model) / 2**20,
        "device": str(device), "threads": torch.get_num_threads(),
    }
