"""`asft export --format structured --cost-target`: the ratios come from the cost-budget planner and
its prediction and cost model are recorded in structured.json. A cost model written here (not a
real calibration) keeps the test fast, deterministic and checkable by hand."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace

import pytest
from transformers import AutoModelForCausalLM

from asft_ray.cli import main
from asft_ray.eval.cost_model import FEATURES, CostModel, DecoderShape
from asft_ray.export.structured import REPORT
from asft_ray.models import model_config
from asft_ray.pruning.cost_budget import plan_for_cost

BYTES_ONLY = {name: 0.0 for name in FEATURES} | {"float_bytes": 1e-9}  # cost = float32 weights read


@pytest.fixture
def cost_model_file(tmp_path):
    path = tmp_path / "cost_model.json"
    path.write_text(json.dumps({"coefficients": BYTES_ONLY}))
    return path


def _export(model_dir, out, *flags) -> int:
    return main(["export", "--model", str(model_dir), "--format", "structured", "--out", str(out), "--no-progress", *flags])


def test_the_export_takes_the_ratio_the_planner_predicts(tiny_model_dir, cost_model_file, tmp_path, capsys):
    # the tiny Llama: 2 layers of 12288 attention weights + 3 x 64 x k MLP weights, head 512 x 64 = 32768:
    # 57344 + 384 k weights, dense (k = 128) 106496. Target 0.7: k <= 44.8 -> 44 channels, ratio 84 / 128
    dense = DecoderShape.from_config(model_config(str(tiny_model_dir)))
    assert dense.vocab == 512 and dense.linear_rows_and_elements()[1] == 106496
    out = tmp_path / "small"
    assert _export(tiny_model_dir, out, "--cost-target", "0.7", "--cost-model", str(cost_model_file),
                   "--cost-context", "64", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    planned = plan_for_cost(dense, CostModel.from_dict({"coefficients": BYTES_ONLY}), 0.7, 64)
    assert planned.shape.intermediate == 44 and report["mlp_ratio"] == planned.mlp_ratio == 84 / 128
    assert report["after"]["intermediate_size"] == 44 and report["head_ratio"] == 0.0
    plan = report["cost_plan"]
    assert plan["predicted_relative_cost"] == pytest.approx((57344 + 384 * 44) / 106496)
    assert (plan["target"], plan["context"], plan["knobs"], plan["drop_layers"]) == (0.7, 64, ["mlp"], 0)
    assert plan["cost_model"]["path"] == str(cost_model_file.resolve())
    assert plan["cost_model"]["coefficients"] == BYTES_ONLY
    on_disk = json.loads((out / REPORT).read_text())
    assert on_disk["cost_plan"] == plan and on_disk["mlp_ratio"] == 84 / 128
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 44


def test_without_a_cost_model_file_one_machine_calibrates_a_shape_once_and_plans_alike(tiny_model_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    """The calibration is a measurement: two of them differ, and a plan near the target flips with it.
    Without --cost-model, the first export calibrates into this machine's cache (one file per shape)
    and every later one reads it: one command, one plan. (The measuring is replaced here.)"""
    from asft_ray.eval import cost_calibration

    calls = []

    def calibrate(shape, whole_bytes=cost_calibration.SMALL_MODEL_BYTES):
        calls.append(shape)  # a different fit each time, as noisy timings would give
        return CostModel({**BYTES_ONLY, "token": 1e-6 * len(calls)})

    monkeypatch.setenv("ASFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cost_calibration, "calibrate", calibrate)
    reports = []
    for name in ("a", "b"):
        assert _export(tiny_model_dir, tmp_path / name, "--cost-target", "0.7", "--cost-context", "64", "--json") == 0
        reports.append(json.loads(capsys.readouterr().out)["cost_plan"])
    assert len(calls) == 1 and reports[0] == reports[1]
    saved = list((tmp_path / "cache" / "cost-models").iterdir())
    assert [str(p) for p in saved] == [reports[0]["cost_model"]["path"]]  # one file, no temp files beside it
    assert json.loads(saved[0].read_text())["calibrated_for"] == asdict(calls[0])
    other = cost_calibration.machine_cost_model_path(replace(calls[0], layers=calls[0].layers + 1))
    assert other != saved[0]  # another shape: a calibration of its own


@pytest.mark.parametrize("flags, message", [
    (["--cost-target", "0.7", "--mlp-ratio", "0.5"], "give either it or them"),
    (["--cost-target", "1.5"], "between 0 and 1"),
    (["--cost-target", "0.7", "--cost-knobs", "mlp,depth"], "name one or more of mlp, heads, layers"),
    (["--cost-target", "0.7", "--cost-knobs", "layers"], "pass --nsamples"),
    (["--mlp-ratio", "0.5"], "go with --cost-target"),  # --cost-model without --cost-target
    # the cheapest plan within the caps keeps 32 channels: (57344 + 384 x 32) / 106496 = 0.654
    (["--cost-target", "0.6"], r"cannot be met with knobs mlp: .* predicted at 0.654 x the dense cost"),
])
def test_bad_cost_budgets_fail_with_one_line_before_the_model_is_written(tiny_model_dir, cost_model_file, tmp_path,
                                                                          capsys, flags, message):
    out = tmp_path / "bad"
    assert _export(tiny_model_dir, out, "--cost-model", str(cost_model_file), *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asft: error: ") and "\n" not in err
    assert re.search(message, err), err
    assert not out.exists()
