"""Calibrate the decode-cost model (eval/cost_model.py) on this machine, for one model's shape.

Speed does not depend on the weights' values, so the measured models are random-init Llamas
(no download): the user's own shape and a few shrunk variants of it along the knobs a
structured plan turns (fewer MLP channels, fewer layers, fewer KV groups), at two prompt
lengths so that the KV-cache term is seen. The list is fixed by the shape (`calibration_plan`),
so two calibrations measure the same models. Each cost is eval/speed.py's decode loop: a prompt
prefilled untimed, then `new_tokens` cached greedy steps, the median of `repeats` runs after
`warmup`; the same loop benchmarks/cost_model.py uses for its held-out test of the model.

The measured models are float32, as the structured export and the pipeline's evaluation run
them; `int8_too` also measures each one with int8 linears (export/int8.py). With the default
settings a calibration builds 7 models and times 8 x 4 decodes of 16 tokens: for a SmolLM2-135M
shape on 2 vCPUs about 40 s by benchmarks/results/cost_model-fit.json's coefficients (estimated,
not timed).

A model of at most `SMALL_MODEL_BYTES` of float32 weights is measured whole. A bigger one is never
built (`measured_base`): its measured models keep its widths (hidden, MLP, heads: what one decoder
layer reads) but have fewer layers, and if need be a smaller vocabulary, so that the measuring
process stays within a quarter of the model's float32 weight bytes (the bound every process of a
large-model run keeps), and no measured model holds more than 2 GiB.
Decode cost is linear in layers and in weight bytes read (eval/cost_model.py), so the fit to the
shallower models predicts the full depth. Floor: two decoder layers (6.8 GB for a 70B Llama).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

from asft_ray.artifacts import read_json, write_json_atomic
from asft_ray.errors import AsftError
from asft_ray.eval.cost_model import CostModel, DecoderShape, Measurement, fit


SMALL_MODEL_BYTES = 2 * 2**30  # float32 weight bytes up to which a model is measured whole
RUNTIME_BYTES = 2**29  # what the measuring process holds besides the weights (Python, torch, transformers: ~0.4 GiB)
MIN_MEASURED_LAYERS = 2  # the base keeps at least this many layers (its halves: 1), so the per-layer term is seen
MIN_MEASURED_VOCAB = 1024


def float32_bytes(shape: DecoderShape) -> int:
    """Weight bytes of the measured model of `shape` in float32 (tied head; norms left out)."""
    return 4 * shape.linear_rows_and_elements()[1]


def measured_bytes_bound(shape: DecoderShape, whole_bytes: int = SMALL_MODEL_BYTES) -> int:
    """Float32 weight bytes the largest measured model of `shape` may have: all of them for a small
    model (up to `whole_bytes`, at most SMALL_MODEL_BYTES: `asft run` passes its eval.whole_model_max_gb,
    the size it no longer loads whole); else what keeps the measuring process (weights + RUNTIME_BYTES)
    within a quarter of the model's bytes, and at most 2 GiB. (1.57 B Llama, 6.3 GB: 1.0 GB, 3 of its
    28 layers; measured with a quarter of its bytes for the weights alone, the process peaked at 33.7 %.)"""
    full = float32_bytes(shape)
    return full if full <= min(whole_bytes, SMALL_MODEL_BYTES) else min(SMALL_MODEL_BYTES, full // 4 - RUNTIME_BYTES)


def measured_base(shape: DecoderShape, whole_bytes: int = SMALL_MODEL_BYTES) -> DecoderShape:
    """The largest model a calibration measures: `shape` itself when it is small; else the same
    widths with as many layers as fit in `measured_bytes_bound` (at least MIN_MEASURED_LAYERS) and,
    if that is still over, a vocabulary cut to what fits (at least MIN_MEASURED_VOCAB)."""
    max_bytes = measured_bytes_bound(shape, whole_bytes)
    if float32_bytes(shape) <= max_bytes:
        return shape
    head = 4 * shape.vocab * shape.hidden
    layer = float32_bytes(replace(shape, layers=1)) - head
    layers = min(shape.layers, max(MIN_MEASURED_LAYERS, (max_bytes - head) // layer))
    vocab = min(shape.vocab, max(MIN_MEASURED_VOCAB, (max_bytes - layers * layer) // (4 * shape.hidden)))
    return replace(shape, layers=layers, vocab=vocab)


def calibration_plan(shape: DecoderShape, whole_bytes: int = SMALL_MODEL_BYTES) -> list[tuple[DecoderShape, tuple[int, ...]]]:
    """The measured models: (shape, prompt lengths), 8 measurements, fixed by `shape`: the measured
    base (`measured_base`) and shrunk variants of it along each knob of a structured plan."""
    shape = measured_base(shape, whole_bytes)
    half_layers, quarter_layers = max(1, shape.layers // 2), max(1, shape.layers // 4)
    half_mlp, quarter_mlp = max(1, shape.intermediate // 2), max(1, shape.intermediate // 4)
    rep = shape.heads // shape.kv_heads
    fewer_groups = max(1, shape.kv_heads // 2)
    base = replace(shape, head_dim=shape.dim)  # written out: fewer heads must not change it
    return [
        (base, (64, 256)),
        (replace(base, intermediate=half_mlp), (64,)),
        (replace(base, intermediate=quarter_mlp), (256,)),
        (replace(base, layers=half_layers), (64,)),
        (replace(base, layers=half_layers, intermediate=half_mlp), (256,)),
        (replace(base, kv_heads=fewer_groups, heads=fewer_groups * rep), (256,)),
        (replace(base, layers=quarter_layers, intermediate=quarter_mlp), (64,)),
    ]


def random_llama(shape: DecoderShape, max_positions: int = 4096):
    """A float32 random-init Llama of `shape` (seeded; tied head as in SmolLM2), in eval mode.

    Built with a vocabulary of 8 and then resized: built at full size, transformers allocates and
    initialises an lm_head of its own before tying it to the embedding, a vocab x hidden matrix held
    for nothing at the process's peak (262 MB: calibrating a 1.57 B Llama peaked at 1.40 GiB, now 1.16)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         num_hidden_layers=shape.layers, vocab_size=8, head_dim=shape.dim,
                         max_position_embeddings=max_positions, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.resize_token_embeddings(shape.vocab, mean_resizing=False)  # one embedding, the head tied to it
    return model.eval()


def decode_cost(model, prompt_len: int, new_tokens: int, repeats: int, warmup: int) -> dict:
    """Median seconds per cached decode step of `model`, all samples, and the mean context."""
    from asft_ray.eval.speed import decode_seconds, prompt_ids

    ids = prompt_ids(model.config.vocab_size, prompt_len)
    for _ in range(warmup):
        decode_seconds(model, ids, new_tokens)
    steps = new_tokens - 1  # the first new token comes from the prefill
    samples = [decode_seconds(model, ids, new_tokens)[0] / steps for _ in range(repeats)]
    return {"seconds_per_token": statistics.median(samples), "all": samples,
            "context": prompt_len + new_tokens // 2}  # the cache holds prompt_len + 1 ... prompt_len + steps tokens


def measure(shape: DecoderShape, prompt_lens: tuple[int, ...], new_tokens: int = 16, repeats: int = 3,
            warmup: int = 1, int8_too: bool = False) -> list[dict]:
    """Decode costs of one random-init model of `shape` (float32) at each prompt length, then, with
    `int8_too`, of the same model with int8 linears and head. Rows: {shape, context, seconds_per_token, all}."""
    import torch

    rows = []
    with torch.no_grad():
        model = random_llama(replace(shape, int8=False), max_positions=max(prompt_lens) + new_tokens)
        for int8 in (False, True) if int8_too else (False,):
            if int8:
                from asft_ray.export.int8 import quantize_model

                quantize_model(model, head=True)
            for prompt_len in prompt_lens:
                cost = decode_cost(model, prompt_len, new_tokens, repeats, warmup)
                rows.append({"shape": asdict(replace(shape, int8=int8)), **cost})
    return rows


def as_measurement(row: dict) -> Measurement:
    return Measurement(DecoderShape(**row["shape"]), row["context"], row["seconds_per_token"])


def calibrate(shape: DecoderShape, new_tokens: int = 16, repeats: int = 3, warmup: int = 1,
              whole_bytes: int = SMALL_MODEL_BYTES) -> CostModel:
    """The cost model fitted to `calibration_plan(shape, whole_bytes)`'s measurements on this machine."""
    plan = calibration_plan(shape, whole_bytes)
    rows = [row for s, prompts in plan for row in measure(s, prompts, new_tokens, repeats, warmup)]
    model = fit([as_measurement(row) for row in rows])
    smallest = min((s for s, _ in plan), key=float32_bytes)
    if model.predict(smallest, 64) >= model.predict(shape, 64):
        # e.g. every cost in the constant term: each plan would be predicted at 1.0 x dense
        raise AsftError("the decode-cost calibration measured no growth of cost with model size (measured ms/token: "
                        + ", ".join(f"{1e3 * row['seconds_per_token']:.1f}" for row in rows)
                        + "); were the cores busy? calibrate again on an otherwise idle machine")
    return model


def cache_dir() -> Path:
    """asft-ray's cache: $ASFT_CACHE_DIR, else $XDG_CACHE_HOME/asft-ray, else ~/.cache/asft-ray."""
    import os

    if os.environ.get("ASFT_CACHE_DIR"):
        return Path(os.environ["ASFT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asft-ray"


def machine_cost_model_path(shape: DecoderShape, whole_bytes: int = SMALL_MODEL_BYTES) -> Path:
    """Where this machine keeps its calibration for `shape` (`load_or_calibrate`): one file per
    shape, measured base, CPU, thread count and torch version, so that one command gives one plan
    on one machine. The calibration is
    measured (noisy on shared cores) and a plan near the target flips with it: three calibrations
    of one 1.57 B shape gave three different plans (BENCHMARKS.md, session 25)."""
    import hashlib
    import json
    import os
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    key = {"shape": asdict(shape), "measured_base": asdict(measured_base(shape, whole_bytes)), "cpu": cpu,
           "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "cost-models" / f"{digest}.json"


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def load_or_calibrate(path: Path | None, shape: DecoderShape, whole_bytes: int = SMALL_MODEL_BYTES,
                      show_progress: bool = False) -> CostModel:
    """The cost model saved in `path`; else this machine's calibration for `shape` (its cache file,
    `machine_cost_model_path`), copied into `path`; else one calibrated now and saved in both. So a
    run folder's cost model is measured once and reused on resume, and a machine measures a shape
    once: every run folder and every export of that shape plans with the same fit. `show_progress`:
    one line on stderr naming the file read, or the calibration."""
    cached = machine_cost_model_path(shape, whole_bytes)
    for source in dict.fromkeys(Path(p) for p in (path, cached) if p is not None):
        if source.exists():
            if show_progress:
                print(f"asft: cost model: reading {source}", file=sys.stderr, flush=True)
            saved = read_json(source)
            if saved is None:
                raise AsftError(f"cost model {source} is not a readable JSON file (delete it to calibrate again)")
            if path is not None and not Path(path).exists():
                _save(Path(path), saved)
            return CostModel.from_dict(saved)
    import torch

    targets = list(dict.fromkeys(Path(p) for p in (cached, path) if p is not None))  # `path` may be the cache file
    if show_progress:
        into = " and ".join(str(p) for p in targets)
        print(f"asft: cost model: calibrating on this machine into {into}", file=sys.stderr, flush=True)
    model = calibrate(shape, whole_bytes=whole_bytes)
    record = {**model.to_dict(), "calibrated_for": asdict(shape),
              "measured_base": asdict(measured_base(shape, whole_bytes)),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    for target in targets:
        try:
            _save(target, record)
        except OSError as err:
            if target != cached:
                raise
            # a read-only home, as in some containers: plan on, without the cache
            print(f"asft: warning: could not keep the cost model in {cached} ({err}); "
                  "set ASFT_CACHE_DIR to a writable folder", file=sys.stderr)
    return model


def _save(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
