"""The Ray Tune schedule sweep, end to end on a tiny model: trials, ASHA, resumable, reusable best schedule."""

import json

import pandas as pd
import pytest

from asft_ray.config import PruneConfig
from asft_ray.errors import AsftError
from asft_ray.schedules import ScheduleSpec, build_schedule
from asft_ray.tune import SweepConfig, run_sweep


def _values(tiny_model_dir, out, **extra):
    return {"model": str(tiny_model_dir), "method": "wanda", "sparsity": 0.6, "nsamples": 2, "seqlen": 64,
            "out": str(out), "trials": 6, "concurrency": 2, "val_windows": 4, "groups": 2, "device": "cpu", **extra}


def test_sweep_runs_trials_stops_some_early_and_writes_a_reusable_schedule(local_ray, tiny_model_dir, tmp_path,
                                                                           capsys):
    cfg = SweepConfig.from_dict(_values(tiny_model_dir, tmp_path / "sweep"))
    summary = run_sweep(cfg, show_progress=False)
    out = tmp_path / "sweep"
    table = pd.read_parquet(out / "trials.parquet")
    assert len(table) == 6 and summary["errors"] == 0
    assert summary["stopped_early"] == int(table["stopped_early"].sum())
    assert (table["windows"] <= 4).all() and (table["windows"] == 4).any()
    best = summary["best"]
    assert best["windows"] == 4 and best["val_ppl"] == table[table["windows"] == 4]["val_ppl"].min()
    # the best schedule is a custom schedule the pruner accepts, and it meets the budget
    spec = ScheduleSpec.parse(str(out / "best_schedule.yaml"))
    assert spec.name == "custom" and len(spec.attention) == 2
    cfg2 = PruneConfig(model=str(tiny_model_dir), method="wanda", sparsity=0.6, out=str(tmp_path / "p"),
                       schedule=str(out / "best_schedule.yaml"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plan = build_schedule(cfg2.schedule_spec, model, 0.6)
    sizes = {(i, n): lin.weight.numel() for i, layer in enumerate(model.model.layers)
             for n, lin in layer.named_modules() if lin.__class__.__name__ == "Linear"}
    pruned = sum(round(sizes[(i, n)] * s) for i, row in plan.items() for n, s in row.items())
    assert abs(pruned / sum(sizes.values()) - 0.6) <= 1e-3
    assert json.loads((out / "sweep.json").read_text())["trials"] == 6
    # the model directory streamed: the best trial's reported ppl is what an in-memory prune with its
    # schedule measures, and no trial folder is left behind
    assert not (out / "trials").exists()
    from asft_ray.eval.perplexity import perplexity
    from asft_ray.prune import run_prune
    from asft_ray.tune import spec_from_trial

    params = {k[len("param_"):]: v for k, v in best.items() if k.startswith("param_")}
    outliers = {float(m): r for m, r in summary["outliers"].items()}
    check = PruneConfig(model=str(tiny_model_dir), method="wanda", sparsity=0.6, nsamples=2, seqlen=64, device="cpu",
                        out=str(tmp_path / "check"), schedule=spec_from_trial(params, cfg).to_dict(), stream=False)
    run_prune(check, show_progress=False, outliers=outliers)
    from asft_ray.data import wikitext2_ids
    from asft_ray.models import load_model

    pruned, tokenizer = load_model(str(tmp_path / "check"), "cpu", show_progress=False)
    ids = wikitext2_ids(tokenizer, "valid", None)[:, : 4 * 64]
    assert perplexity(pruned, ids, 64, 4, show_progress=False)["ppl"] == pytest.approx(best["val_ppl"], rel=1e-5)
    # resuming a finished sweep restores it instead of starting over; `asft sweep --json` prints the summary
    import yaml

    from asft_ray.cli import main

    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(_values(tiny_model_dir, out)))
    capsys.readouterr()
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--json", "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["trials"] == 6 and again["best"]["val_ppl"] == best["val_ppl"]


@pytest.mark.parametrize("change, message", [
    ({"schedule": "owl"}, "remove `schedule`"),
    ({"pattern": "2:4", "sparsity": 0.5}, "unstructured"),
    ({"trials": 0}, "at least 1"),
    ({"colour": 1}, "unknown key"),
])
def test_bad_sweep_configs_fail_at_once(change, message, tmp_path):
    values = {"model": "smollm2-135m", "method": "wanda", "sparsity": 0.6, "out": str(tmp_path / "s"), **change}
    with pytest.raises(AsftError, match=message):
        SweepConfig.from_dict(values)


def test_a_trial_no_node_can_hold_fails_before_any_work(local_ray, tmp_path):
    from asft_ray.tune import run_sweep

    cfg = SweepConfig.from_dict({"model": "smollm2-135m", "method": "wanda", "sparsity": 0.6,
                                 "out": str(tmp_path / "s"), "cpus_per_trial": 64})
    with pytest.raises(AsftError, match=r"a sweep trial can never be placed: it asks 64 CPU each"):
        run_sweep(cfg, show_progress=False)
    assert not (tmp_path / "s").exists()


def test_the_repo_sweep_config_parses():
    from asft_ray.config import load_yaml
    from tests.conftest import REPO

    cfg = SweepConfig.from_dict(load_yaml(str(REPO / "configs" / "sweep-wanda70.yaml")))
    assert cfg.trials == 16 and cfg.prune.sparsity == 0.7
    wide = SweepConfig.from_dict(load_yaml(str(REPO / "configs" / "sweep-wanda60-linear.yaml")))
    assert wide.prune.sparsity == 0.6 and "mlp.down_proj" in wide.linear_offsets


def test_a_best_schedule_with_linear_offsets_reproduces_the_trials_plan(tmp_path):
    """best_schedule.yaml (per-linear lists) applied with --schedule gives the plan the winning trial pruned with."""
    import yaml

    from asft_ray.tune import best_schedule_yaml, linear_knob, spec_from_trial
    from tests.conftest import build_tiny_llama

    model = build_tiny_llama(num_hidden_layers=3)
    cfg = SweepConfig.from_dict({"model": "m", "method": "magnitude", "sparsity": 0.6, "out": str(tmp_path / "s"),
                                 "groups": 3, "linear_offsets": ["mlp.down_proj", "self_attn.v_proj"]})
    params = {"owl_lambda": 0.0, "owl_m": 5, "attn_offset": 0.05, "group_0": -0.05, "group_1": 0.0, "group_2": 0.05,
              linear_knob("mlp.down_proj"): 0.1, linear_knob("self_attn.v_proj"): -0.1}
    outliers = {5.0: [0.01, 0.01, 0.01]}
    written = best_schedule_yaml(cfg, params, model, outliers, 12.3)
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(written, sort_keys=False))
    trial_plan = build_schedule(spec_from_trial(params, cfg), model, 0.6, outliers)
    applied = build_schedule(ScheduleSpec.parse(str(path)), model, 0.6)
    assert set(written["linears"]) == set(trial_plan[0])
    for i, row in trial_plan.items():
        assert row["mlp.down_proj"] > row["mlp.up_proj"] and row["self_attn.v_proj"] < row["self_attn.k_proj"]
        for name, s in row.items():
            assert applied[i][name] == pytest.approx(s, abs=1e-5)


def test_sweep_linear_offsets_must_be_names():
    with pytest.raises(AsftError, match="key .linear_offsets. must be a list of strings"):
        SweepConfig.from_dict({"model": "m", "method": "wanda", "sparsity": 0.6, "out": "o", "linear_offsets": "mlp"})


def test_a_sweep_naming_a_linear_the_model_lacks_fails_before_any_trial(tiny_model_dir, tmp_path):
    cfg = SweepConfig.from_dict(_values(tiny_model_dir, tmp_path / "sweep", linear_offsets=["mlp.fc9"]))
    with pytest.raises(AsftError, match="no linear mlp.fc9"):
        run_sweep(cfg, show_progress=False)
    assert not (tmp_path / "sweep" / "tune").exists()


def test_a_sweep_takes_any_method_string_the_registry_resolves(tmp_path):
    cfg = SweepConfig.from_dict(_values("model", tmp_path / "s", method="ria+dsnot:5"))
    assert cfg.prune.recipe.layerwise
    with pytest.raises(AsftError, match="method"):
        SweepConfig.from_dict(_values("model", tmp_path / "s", method="wandaa"))
