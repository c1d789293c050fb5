"""Calibrating the decode-cost model on this machine (eval/cost_calibration.py).

Real timings of tiny models on 2 shared vCPUs swing by 2x from one measurement to the next
(seen while writing this test: the same 4-layer shape at 1.4 and 2.8 ms per token), so no test
asserts a fit to real measurements: that accuracy is benchmarks/cost_model.py's held-out check
on SmolLM2-sized shapes. Here: the measuring loop's rows (real, tiny, few tokens), that the
calibration shapes determine every float coefficient (synthetic measurements from known
coefficients are fitted back exactly), and that a run folder's cost model is measured once.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict

import pytest

from asft_ray.errors import AsftError
from asft_ray.eval import cost_calibration
from asft_ray.eval.cost_calibration import (RUNTIME_BYTES, SMALL_MODEL_BYTES, calibrate, calibration_plan, float32_bytes,
                                            load_or_calibrate, measure)
from asft_ray.eval.cost_model import CostModel, DecoderShape

SMOL = DecoderShape(hidden=576, intermediate=1536, heads=9, kv_heads=3, layers=30, vocab=49152)
LLAMA_7B = DecoderShape(hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=32, vocab=32000)
LARGE_1B6 = DecoderShape(hidden=2048, intermediate=5632, heads=16, kv_heads=16, layers=28, vocab=32000)  # benchmarks
LLAMA_70B = DecoderShape(hidden=8192, intermediate=28672, heads=64, kv_heads=8, layers=80, vocab=128256)
TRUTH = CostModel({"token": 3e-4, "layer": 2e-4, "int8_layer": 0.0, "float_bytes": 6.8e-11, "int8_bytes": 0.0,
                   "kv_bytes": 1.1e-10})


def test_the_calibration_shapes_are_the_model_and_its_shrunk_variants():
    plan = calibration_plan(SMOL)
    assert plan[0] == (DecoderShape(576, 1536, 9, 3, 30, 49152, head_dim=64), (64, 256))
    assert [(s.intermediate, s.kv_heads, s.heads, s.layers) for s, _ in plan] == [
        (1536, 3, 9, 30), (768, 3, 9, 30), (384, 3, 9, 30), (1536, 3, 9, 15), (768, 3, 9, 15), (1536, 1, 3, 30),
        (384, 3, 9, 7)]
    assert all(s.dim == 64 and s.hidden == 576 and s.vocab == 49152 and not s.int8 for s, _ in plan)
    assert sum(len(prompts) for _, prompts in plan) == 8  # at least one per coefficient (cost_model.fit)
    assert calibration_plan(SMOL) == plan  # fixed by the shape


def test_a_model_bigger_than_the_bound_is_calibrated_on_shallower_models_of_its_widths():
    assert float32_bytes(SMOL) <= SMALL_MODEL_BYTES < float32_bytes(LARGE_1B6)  # 0.54 GB: measured whole; 6.3 GB
    for shape, layers in ((LARGE_1B6, 3), (LLAMA_7B, 2)):  # the process within a quarter of the model's bytes
        plan = calibration_plan(shape)
        assert max(float32_bytes(s) for s, _ in plan) + RUNTIME_BYTES <= float32_bytes(shape) / 4
        assert max(float32_bytes(s) for s, _ in plan) <= SMALL_MODEL_BYTES
        assert plan[0][0] == DecoderShape(shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, layers,
                                          shape.vocab, head_dim=shape.dim)  # every measured layer: a real layer's width
        assert {(s.hidden, s.dim) for s, _ in plan} == {(shape.hidden, shape.dim)}
    # 70B: two decoder layers alone are 6.8 GB; the vocabulary is cut to the minimum, never the widths
    base_70b = calibration_plan(LLAMA_70B)[0][0]
    assert (base_70b.layers, base_70b.vocab, base_70b.hidden, base_70b.intermediate) == (2, 1024, 8192, 28672)
    assert max(float32_bytes(s) for s, _ in calibration_plan(LLAMA_70B)) == float32_bytes(base_70b) < 7.0e9


@pytest.mark.parametrize("shape", [LARGE_1B6, LLAMA_7B, LLAMA_70B], ids=["1.6b", "7b", "70b"])
def test_a_fit_to_shallower_models_predicts_the_full_depth(monkeypatch, shape):
    """Decode cost is linear in layers and bytes: measurements on the bounded plan determine every
    float coefficient, so the prediction for the user's own shape is exact on an exactly linear machine."""
    monkeypatch.setattr(cost_calibration, "measure", _synthetic)
    model = calibrate(shape)
    assert all(s["shape"]["layers"] < shape.layers for s in model.calibration)
    assert model.predict(shape, 2048) == pytest.approx(TRUTH.predict(shape, 2048), rel=1e-6)


def test_the_measuring_loop_gives_one_row_per_prompt_and_kind():
    tiny = DecoderShape(hidden=32, intermediate=64, heads=4, kv_heads=2, layers=2, vocab=128)
    rows = measure(tiny, (8, 16), new_tokens=4, repeats=2, warmup=0, int8_too=True)
    assert [(r["shape"]["int8"], r["context"]) for r in rows] == [(False, 10), (False, 18), (True, 10), (True, 18)]
    assert all(r["shape"] == {**asdict(tiny), "int8": r["shape"]["int8"]} for r in rows)
    assert all(len(r["all"]) == 2 and r["seconds_per_token"] == statistics.median(r["all"]) > 0 for r in rows)


def _synthetic(shape, prompt_lens, new_tokens=16, repeats=3, warmup=1, int8_too=False):
    """measure() as a machine whose decode costs are exactly TRUTH's would give it."""
    contexts = [p + new_tokens // 2 for p in prompt_lens]
    return [{"shape": asdict(shape), "context": c, "seconds_per_token": TRUTH.predict(shape, c), "all": []}
            for c in contexts]


def test_the_calibration_shapes_determine_every_float_coefficient(monkeypatch):
    monkeypatch.setattr(cost_calibration, "measure", _synthetic)
    model = calibrate(SMOL)
    assert model.coefficients == pytest.approx(TRUTH.coefficients, rel=1e-6)
    assert max(abs(c["relative_error"]) for c in model.calibration) < 1e-9


def test_a_calibration_that_sees_no_size_effect_is_refused(monkeypatch):
    """Measured on busy cores, every decode can take the same time: a fit that predicts every plan at
    1.0 x dense would be kept in the run folder and steer the planner; it is one clear error instead."""
    def flat(shape, prompt_lens, new_tokens=16, repeats=3, warmup=1, int8_too=False):
        return [{"shape": asdict(shape), "context": p + new_tokens // 2, "seconds_per_token": 0.09, "all": []}
                for p in prompt_lens]

    monkeypatch.setattr(cost_calibration, "measure", flat)
    with pytest.raises(AsftError, match="no growth of cost with model size"):
        calibrate(SMOL)


def test_a_run_folders_cost_model_is_calibrated_once_and_reused(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cost_calibration, "measure", _synthetic)
    path = tmp_path / "cost_model.json"
    cached = cost_calibration.machine_cost_model_path(SMOL)
    first = load_or_calibrate(path, SMOL, show_progress=True)
    assert capsys.readouterr().err == f"asft: cost model: calibrating on this machine into {cached} and {path}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cost_model.json"]  # no temp files left (the cache is elsewhere)

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(cost_calibration, "measure", no_measuring)
    assert load_or_calibrate(path, SMOL) == first
    # another run folder on this machine: the same fit, from the machine's cache, copied into the folder
    other = tmp_path / "other" / "cost_model.json"
    assert load_or_calibrate(other, SMOL, show_progress=True) == first
    assert json.loads(other.read_text()) == json.loads(path.read_text())
    assert capsys.readouterr().err == f"asft: cost model: reading {cached}\n"  # the file it read, not the one it fills
    assert cached.is_file() and sorted(p.name for p in cached.parent.iterdir()) == [cached.name]
    path.write_text("{not json")
    with pytest.raises(AsftError, match="not a readable JSON file"):
        load_or_calibrate(path, SMOL)


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_failure(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cost_calibration, "measure", _synthetic)
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("ASFT_CACHE_DIR", str(tmp_path / "not-a-folder"))
    path = tmp_path / "run" / "cost_model.json"
    model = load_or_calibrate(path, SMOL)
    assert CostModel.from_dict(json.loads(path.read_text())) == model  # the named file is still written
    assert "could not keep the cost model" in capsys.readouterr().err
    # `asft export --cost-target` without --cost-model names the cache file itself: one warning, a model
    cached = cost_calibration.machine_cost_model_path(SMOL)
    assert load_or_calibrate(cached, SMOL) == model
    assert capsys.readouterr().err.count("could not keep the cost model") == 1


def test_a_calibration_into_the_cache_file_itself_writes_it_once(monkeypatch):
    monkeypatch.setattr(cost_calibration, "measure", _synthetic)
    written = []
    monkeypatch.setattr(cost_calibration, "_save", lambda path, record: written.append(path))
    cached = cost_calibration.machine_cost_model_path(SMOL)
    load_or_calibrate(cached, SMOL)
    assert written == [cached]


HEAD_HEAVY = """
from dataclasses import replace
from asft_ray.eval.cost_calibration import random_llama
from asft_ray.eval.cost_model import DecoderShape
shape = DecoderShape(hidden=256, intermediate=64, heads=4, kv_heads=4, layers=1, vocab=200_000)
random_llama(replace(shape, vocab=16))  # every import (compiled on a fresh install) before the baseline
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here: not the imports'
base = status("VmRSS")
model = random_llama(shape)
peak = status("VmHWM")
assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.shape == (200_000, 256)
print(peak - base, model.lm_head.weight.numel() * 4)
"""


def test_a_calibration_model_holds_one_vocabulary_matrix_at_its_peak():
    """The measured models are the calibration process's largest allocation: their tied head must not
    cost a second vocab x hidden matrix on the way (transformers allocates and initialises an untied
    lm_head before tying it: +262 MB on a 1.57 B Llama's base). A fresh process: its own peak RSS."""
    import subprocess
    import sys
    from pathlib import Path

    env = {"MALLOC_MMAP_THRESHOLD_": str(2**20), "PATH": "/usr/bin:/bin"}  # large blocks go back to the OS when freed
    done = subprocess.run([sys.executable, "-c", HEAD_HEAVY], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    grown, matrix = map(int, done.stdout.split())
    assert matrix <= grown < 1.5 * matrix, (grown, matrix)  # 2x with the untied head built first


def test_a_model_the_run_does_not_load_whole_is_not_measured_whole_either():
    """`asft run` calibrates for a model above its eval.whole_model_max_gb: the bound that keeps the
    calibration within a quarter of the model's bytes applies below SMALL_MODEL_BYTES too."""
    half_b = DecoderShape(hidden=1536, intermediate=4096, heads=12, kv_heads=12, layers=15, vocab=32000)  # 2.09 GB
    assert calibration_plan(half_b)[0][0].layers == 15  # measured whole by default: under 2 GiB
    plan = calibration_plan(half_b, whole_bytes=2**30)  # a run that streams models above 1 GiB
    assert max(float32_bytes(s) for s, _ in plan) <= max(float32_bytes(half_b) // 4 - RUNTIME_BYTES,
                                                         float32_bytes(plan[0][0]))
    assert (plan[0][0].layers, plan[0][0].vocab) == (2, 1024)  # the floor: two layers, the vocabulary cut
    assert calibration_plan(LARGE_1B6, whole_bytes=4 * 2**30) == calibration_plan(LARGE_1B6)  # already bounded
