"""Speed measurement mechanics (the numbers themselves come from benchmarks/inference.py)."""

from __future__ import annotations

import time

import torch

from asft_ray.eval.speed import PeakMemory, decode_seconds, measure_speed, prompt_ids


def test_cached_greedy_decode_equals_recomputing_everything(tiny_model):
    ids = prompt_ids(512, 12)
    _, generated = decode_seconds(tiny_model, ids, 6)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = tiny_model(seq, use_cache=False).logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq[:, 12:])


def test_measure_speed_reports_medians_of_every_repeat(tiny_model):
    r = measure_speed(tiny_model, prompt_len=16, new_tokens=4, repeats=3, warmup=0)
    assert len(r["prefill_ms_all"]) == 3 and len(r["decode_tok_s_all"]) == 3
    assert sorted(r["prefill_ms_all"])[1] == r["prefill_ms"]
    # fp32: 4 bytes per parameter (the tied embedding once) and per buffer element (two rotary tables of 8)
    assert r["weights_mb"] * 2**20 == 4 * (sum(p.numel() for p in tiny_model.parameters()) + 16)
    assert r["decode_tok_s"] > 0 and r["memory"] == "cpu_rss_peak" and r["threads"] >= 1


def test_peak_memory_sees_a_large_allocation():
    import psutil

    with PeakMemory(torch.device("cpu")) as mem:
        block = torch.rand(64 * 2**20 // 4)  # 64 MiB, touched
        during = psutil.Process().memory_info().rss  # (the allocator may reuse pages already resident)
        time.sleep(1.0)  # many polling intervals, even when a loaded machine delays the polling thread
        del block
        import gc

        gc.collect()
    assert mem.peak_bytes >= during - 2**20
