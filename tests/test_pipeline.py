"""`asft run`: the pipeline on a tiny model leaves a resumable run folder and a report with its plots."""

import json

import pytest

from asft_ray.errors import AsftError
from asft_ray.pipeline import RunConfig, run_pipeline
from asft_ray.report.cost import cost_lines, cost_per_million

SPEED = {"decode_tok_s": 100.0}


def test_cost_per_million_tokens_and_the_saving_are_plain_arithmetic():
    assert cost_per_million(3.6, 1000.0) == pytest.approx(1.0)  # 3.6 M tokens per hour for 3.6 per hour
    dense = {"decode_tok_s": 1000.0, "decode_tok_s_all": [990.0, 1000.0, 1010.0]}
    fast = {"decode_tok_s": 2000.0, "decode_tok_s_all": [1950.0, 2000.0, 2050.0]}
    lines = cost_lines(3.6, dense, fast)
    assert "saves 50.0 %" in lines["headline"] and "0.50 vs 1.00" in lines["headline"]


def test_overlapping_speed_measurements_are_reported_as_no_change():
    dense = {"decode_tok_s": 21.1, "decode_tok_s_all": [20.5, 21.1, 22.3]}
    same = {"decode_tok_s": 22.0, "decode_tok_s_all": [21.0, 22.0, 22.4]}
    lines = cost_lines(0.1, dense, same)
    assert lines["headline"].startswith("No measurable change") and "saving: none measured" in lines["lines"]


def test_without_a_price_the_report_says_cost_not_computed():
    lines = cost_lines(None, SPEED, SPEED)
    assert lines["headline"].startswith("Cost not computed") and not any("saving" in x for x in lines["lines"])


def test_a_predicted_speed_says_so_in_the_cost_lines_the_candidates_and_the_verdict():
    """A model too large to load whole has its decode speed predicted (pipeline.evaluate_model)."""
    from asft_ray.report.recommend import Tolerance, candidate_row, recommend

    dense = {"ppl": 10.0, "speed": {"decode_tok_s": 10.0, "predicted": True}}
    small = {"ppl": 11.0, "speed": {"decode_tok_s": 20.0, "predicted": True}}
    line = cost_lines(1.0, dense["speed"], small["speed"])["lines"][0]
    assert "decode speed 10.0 (predicted) → 20.0 (predicted) tokens/s" in line
    rows = [candidate_row(name, None, m, dense, Tolerance(), None) for name, m in (("dense", dense), ("small", small))]
    assert all(row["speed_predicted"] for row in rows)
    verdict = recommend(rows, Tolerance(), 10.0)["verdict"]
    assert "lower cost per generated token than dense (predicted by the decode-cost model)" in verdict
    close = cost_lines(1.0, dense["speed"], {"decode_tok_s": 10.4, "predicted": True})
    assert "not both were measured, so the difference is not counted" in close["headline"]
    plain = {"ppl": 10.0, "speed": SPEED}
    measured = candidate_row("dense", None, plain, plain, Tolerance(), None)
    assert "speed_predicted" not in measured and "(predicted)" not in cost_lines(1.0, SPEED, SPEED)["lines"][0]


def _values(model_dir, out, **extra):
    return {"model": str(model_dir), "out": str(out), "device": "cpu",
            "prune": {"method": "wanda", "schedule": "owl", "nsamples": 2, "seqlen": 64, "stages": [0.3, 0.6],
                      "gate": {"max_ppl_ratio": 10.0, "windows": 2}},
            "export": ["compressed"],
            "eval": {"ppl_windows": 2, "ppl_seqlen": 64, "zeroshot": ["arc_easy"], "zeroshot_limit": 3,
                     "speed_prompt": 16, "speed_new_tokens": 4, "speed_repeats": 1}, **extra}


@pytest.fixture(scope="module")
def pruned_run(tiny_model_dir, tmp_path_factory):
    """A sparse run without recovery, with int8 copies of dense and of the final model, then the
    same command again with a price: what the first run finished must be kept. (One run shared by
    the two tests below: a pipeline run costs ~30 s on 2 cores.) Its prune runs on 2 scoring actors,
    all the CPUs of a 2-core machine: the coordinator on the pipeline's embedded cluster reserves none."""
    out = tmp_path_factory.mktemp("pruned") / "run"
    values = _values(tiny_model_dir, out, int8=["dense", "final"])
    values["prune"] = {**values["prune"], "workers": 2}
    result = run_pipeline(RunConfig.from_dict(values), show_progress=False)
    first_html = (out / "report.html").read_text()
    finished = [out / "eval" / "dense.json", out / "int8" / "dense" / "int8.json", out / "int8" / "pruned" / "int8.json",
                out / "eval" / "dense+int8.json", out / "eval" / "pruned+int8.json"]
    before = [f.stat().st_mtime_ns for f in finished]
    run_pipeline(RunConfig.from_dict({**values, "price_per_hour": 1.0}), show_progress=False)
    return {"out": out, "result": result, "first_html": first_html,
            "kept": [f.stat().st_mtime_ns for f in finished] == before}


def test_pipeline_without_recovery_writes_every_artifact_and_resumes(pruned_run):
    out, result = pruned_run["out"], pruned_run["result"]
    assert result["status"] == "finished" and result["final"] == "pruned"
    html = pruned_run["first_html"]
    assert html.count("data:image/png;base64,") >= 3  # stage curve, zero-shot, per-layer sparsity
    assert "Cost not computed" in html
    facts = json.loads((out / "report.json").read_text())
    assert facts["models"]["pruned"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert facts["models"]["dense"]["sparsity"] == 0.0
    assert facts["exports"]["compressed"]["pruned_ratio"] == pytest.approx(0.4 + 1 / 32, abs=2e-3)  # 60 % zeros
    assert (out / "prune" / "decisions.parquet").exists() and (out / "eval" / "pruned.json").exists()
    assert pruned_run["kept"]  # finished stages are not redone
    assert "per million tokens" in (out / "report.html").read_text()


# int8 weights (one scale per output channel) move the tiny model's logits by under 2 % of their
# range (tests/test_int8.py); its test ppl moves by far less (measured: 0.02 %).
INT8_PPL_TOLERANCE = 0.02


def test_int8_copies_are_candidates_with_their_own_quality_and_cost_and_are_not_redone(pruned_run):
    out = pruned_run["out"]
    facts = json.loads((out / "report.json").read_text())
    models, rows = facts["models"], {c["name"]: c for c in facts["recommendation"]["candidates"]}
    assert list(rows) == ["dense", "pruned", "dense+int8", "pruned+int8"]
    for source in ("dense", "pruned"):
        int8, float_model = models[f"{source}+int8"], models[source]
        assert int8["ppl"] == pytest.approx(float_model["ppl"], rel=INT8_PPL_TOLERANCE) and int8["ppl"] != float_model["ppl"]
        assert int8["ppl_windows"] == float_model["ppl_windows"] == 2 and "mean_acc" in int8["zeroshot"]
        assert int8["threads"] == float_model["threads"] and int8["speed"]["new_tokens"] == 4
        # measured on the int8 modules: their weights in memory are int8 (the float embedding stays)
        assert int8["speed"]["weights_mb"] < 0.7 * float_model["speed"]["weights_mb"]
        row = rows[f"{source}+int8"]
        assert row["int8"] and not rows[source]["int8"] and row["path"] == f"int8/{source}"
        assert row["cost_per_million"] == pytest.approx(cost_per_million(1.0, int8["speed"]["decode_tok_s"]))
        assert row["relative_cost"] == pytest.approx(models["dense"]["speed"]["decode_tok_s"] / int8["speed"]["decode_tok_s"])
        assert facts["int8"][source]["file_format"] == "asft-int8-v1"
    assert models["pruned+int8"]["sparsity"] >= models["pruned"]["sparsity"]  # zeros stay zeros in int8
    assert "dense+int8" in (out / "report.html").read_text()
    assert pruned_run["kept"]  # a finished int8 copy and its evaluation are kept on the second run
    assert sorted(p.name for p in (out / "int8").iterdir()) == ["dense", "pruned"]  # no temp folders left


@pytest.mark.parametrize("change, message", [
    ({"export": ["onnx"]}, "unknown export format"),
    ({"price_per_hour": -1}, "positive number"),
    ({"eval": {"zeroshot": ["nope"]}}, "unknown task"),
    ({"eval": {"whole_model_max_gb": -1}}, "whole_model_max_gb must be >= 0"),
    ({"colour": 1}, "unknown key"),
    ({"recover": {"model": "x"}}, "set by the pipeline"),
    ({"structure": {"mlp_ratio": 0.3}}, "exactly one of prune"),
    ({"prune": None}, "exactly one of prune"),
    ({"prune": None, "structure": {"mlp_ratio": 1.0}}, "mlp_ratio must be in"),
    ({"prune": None, "structure": {"mlp_ratio": 0}}, "nothing to remove"),
    ({"prune": None, "structure": {"mlp_ratio": 0.5, "reconstruct_epochs": 1, "reconstruct_lr": 0}}, "reconstruct_lr > 0"),
    ({"prune": None, "structure": {"mlp_ratio": 0.3, "refit": "yes"}}, "refit"),
    ({"prune": None, "structure": {"mlp_ratio": 0.3}, "recover": {"dense": False}}, "set by the pipeline"),
    ({"prune": None, "structure": {"cost_target": 0.7, "mlp_ratio": 0.3}}, "give either cost_target .* or those"),
    ({"prune": None, "structure": {"cost_target": 0.7, "drop_layers": 2}}, "give either cost_target"),
    ({"prune": None, "structure": {"cost_target": 1.2}}, "cost_target is a share .* between 0 and 1"),
    ({"prune": None, "structure": {"cost_target": 0.7, "cost_knobs": ["mlp", "depth"]}}, "name one or more of mlp"),
    ({"prune": None, "structure": {"cost_target": 0.7, "cost_knobs": "mlp"}}, "key 'cost_knobs' must be"),
    ({"prune": None, "structure": {"cost_target": 0.7, "cost_context": 0}}, "at least 1 token"),
    ({"prune": None, "structure": {"cost_target": "0.7"}}, "key 'cost_target' must be"),
    ({"prune": None, "structure": {"mlp_ratio": 0.3, "cost_knobs": ["heads"]}}, "go with cost_target"),
    ({"prune": None, "structure": {"mlp_ratio": 0.3, "cost_search": 4}}, "go with cost_target"),
    ({"prune": None, "structure": {"cost_target": 0.7, "cost_search": -1}}, "number of validation windows"),
    ({"tolerance": {"max_ppl_ratio": 0.5}}, "at least 1"),
    ({"tolerance": {"ppl": 2}}, "unknown tolerance key"),
    ({"int8": "dense"}, "key 'int8' must be a list of strings"),
    ({"int8": ["dense", "fast"]}, "int8: unknown model.s. fast: choose from dense, pruned, recovered, final"),
    ({"int8": ["recovered"]}, "no recover: section"),
    ({"int8": ["dense"], "device": "cuda"}, "set device: cpu"),
])
def test_bad_run_configs_fail_before_any_work(change, message, tmp_path):
    values = {"model": "smollm2-135m", "out": str(tmp_path / "r"),
              "prune": {"method": "wanda", "stages": [0.5], "gate": {"max_ppl_ratio": 2}}, **change}
    with pytest.raises(AsftError, match=message):
        RunConfig.from_dict(values)


def test_int8_final_names_the_recovered_model_when_recovery_runs_else_the_pruned_one(tmp_path):
    values = {"model": "smollm2-135m", "out": str(tmp_path / "r"), "int8": ["final", "dense", "pruned"],
              "prune": {"method": "wanda", "stages": [0.5], "gate": {"max_ppl_ratio": 2}}}
    assert RunConfig.from_dict(values).int8_sources == ("pruned", "dense")
    assert RunConfig.from_dict({**values, "recover": {"max_steps": 1}}).int8_sources == ("recovered", "dense", "pruned")
    assert RunConfig.from_dict({k: v for k, v in values.items() if k != "int8"}).int8_sources == ()


def test_the_repo_demo_run_config_parses():
    from asft_ray.config import load_yaml
    from tests.conftest import REPO

    cfg = RunConfig.from_dict(load_yaml(str(REPO / "configs" / "run-demo.yaml")))
    assert cfg.recover_config().teacher == "smollm2-135m" and cfg.price_per_hour == 0.10
    assert cfg.structure.mlp_ratio > 0 and cfg.recover_config().dense  # the demo ends in a smaller model
    sparse = RunConfig.from_dict(load_yaml(str(REPO / "configs" / "run-wanda50.yaml")))
    assert sparse.staged_config().stages == (0.3, 0.5) and not sparse.recover_config().dense


def test_a_searched_structure_says_which_plan_was_measured_best():
    from asft_ray.pipeline import StructureSpec, structure_summary

    rows = [{"val_ppl": 31.5}, {"val_ppl": 29.25}]
    plan = {"mlp_ratio": 0.25, "head_ratio": 0.5, "drop_layers": 1, "knobs": ["mlp", "heads", "layers"], "target": 0.75,
            "context": 144, "predicted_relative_cost": 0.7499, "cost_model": {"path": "/c.json"},
            "search": {"windows": 4, "chosen": 1, "plans": rows}}
    report = {"before": {"parameters": 100_000_000}, "after": {"parameters": 80_000_000}, "cost_plan": plan}
    summary = structure_summary(StructureSpec(cost_target=0.75, cost_search=4), report)
    assert "MLP channels -25 %, KV groups -50 %, 1 decoder layers removed" in summary["method"]
    assert ("of the 2 plans predicted to meet it, the one with the lowest WikiText-2 valid ppl over 4 windows "
            "(29.250) (knobs: mlp, heads, layers)") in summary["step"]


def test_a_structured_run_ends_in_a_smaller_model_and_a_recommendation(tiny_model_dir, tmp_path):
    """`structure:` instead of `prune:`: a smaller dense model in RUN/structure/model, evaluated
    beside dense, every candidate in report.json's recommendation, the chart in the report. The
    amount is given as a cost budget, with the run folder's cost model already there (as a resumed
    run finds it): it is used, not measured again, by the plan and by the evaluation, which goes
    layer by layer here (a threshold of 0 GiB), as for a model too large to load whole."""
    from transformers import AutoModelForCausalLM

    from asft_ray.eval.cost_model import FEATURES

    out = tmp_path / "run"
    values = _values(tiny_model_dir, out, price_per_hour=1.0, tolerance={"max_ppl_ratio": 100.0})
    values.pop("prune")
    # the cost of weights read alone: 57344 + 384 k weights for k MLP channels (test_structured_cost.py), so
    # 64 of 128 channels cost (57344 + 24576) / 106496 = 0.769 of dense and 65 cost 0.773: target 0.77 -> half
    values["structure"] = {"cost_target": 0.77, "nsamples": 2, "seqlen": 64, "reconstruct_epochs": 1}
    values["eval"] = {**values["eval"], "zeroshot": [], "speed_repeats": 3, "whole_model_max_gb": 0.0}
    cost_model = out / "structure" / "cost_model.json"
    cost_model.parent.mkdir(parents=True)
    cost_model.write_text(json.dumps({"coefficients": {name: 0.0 for name in FEATURES} | {"float_bytes": 1e-9}}))
    written = cost_model.read_text()
    result = run_pipeline(RunConfig.from_dict(values), show_progress=False)
    assert result["status"] == "finished" and result["final"] == "pruned"
    assert cost_model.read_text() == written
    facts = json.loads((out / "report.json").read_text())
    small = AutoModelForCausalLM.from_pretrained(out / facts["recommendation"]["candidates"][1]["path"])
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert small.config.intermediate_size == dense.config.intermediate_size // 2
    assert facts["method"] == "structured pruning (MLP channels -50 %, least-squares refit, block reconstruction (1 epoch))"
    assert (f"predicted to cost at most 0.77 x the dense model per generated token at 18 tokens of context, "
            f"predicted at 0.769 x by the decode-cost model {cost_model}.") in facts["steps"][0]
    written_report = json.loads((out / "structure" / "model" / "structured.json").read_text())
    assert written_report["streamed"]  # a safetensors folder
    assert [row["layer"] for row in written_report["reconstruction_layers"]] == [0, 1]
    assert [c["name"] for c in facts["recommendation"]["candidates"]] == ["dense", "pruned"]
    assert all(m["streamed"] and m["speed"]["cost_model"] == str(cost_model) for m in facts["models"].values())
    pruned = facts["recommendation"]["candidates"][1]
    assert pruned["meets_tolerance"] == (pruned["ppl"] <= 100.0 * facts["models"]["dense"]["ppl"])
    chosen = facts["recommended"]
    assert (chosen is None) == (not (pruned["meets_tolerance"] and pruned["measurably_cheaper"]))
    html = (out / "report.html").read_text()
    assert "Recommendation" in html and facts["recommendation"]["verdict"] in html.replace("&#x27;", "'")
    assert '<img alt="cost against quality" src="data:image/png;base64,' in html
    assert not (out / "prune").exists() and facts["decisions"] == []


def test_the_cost_model_is_calibrated_once_into_the_run_folder_before_any_evaluation(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    """A model the run streams (over whole_model_max_gb) gets its speed from RUN/eval/cost_model.json,
    calibrated before the first evaluation (the folder does not exist yet), with the run's threshold
    capping what is measured whole; not again when it is there, and not at all when nothing streams.
    (In this process: the stage's fresh worker and the calibration's measurements are replaced.)"""
    from asft_ray import pipeline
    from asft_ray.eval import cost_calibration
    from asft_ray.eval.cost_model import FEATURES, CostModel

    calls = []

    def calibrate(shape, whole_bytes):
        calls.append(whole_bytes)
        return CostModel({name: 0.0 for name in FEATURES} | {"token": 1e-3})

    monkeypatch.setattr(pipeline, "_in_fresh_worker", lambda fn, *args, **kwargs: fn(*args, **kwargs))
    monkeypatch.setattr(cost_calibration, "calibrate", calibrate)
    values = _values(tiny_model_dir, tmp_path / "run")
    kept_whole = RunConfig.from_dict(values)
    pipeline._calibrate_cost_model(kept_whole, [str(tiny_model_dir)])
    assert calls == [] and not (tmp_path / "run").exists()  # evaluated whole: its speed is measured
    streams = RunConfig.from_dict({**values, "eval": {**values["eval"], "whole_model_max_gb": 0.0}})
    pipeline._calibrate_cost_model(streams, [str(tiny_model_dir)])
    pipeline._calibrate_cost_model(streams, [str(tiny_model_dir)])
    assert calls == [0] and (tmp_path / "run" / "eval" / "cost_model.json").is_file()
