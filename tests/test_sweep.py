"""The Ray Tune schedule sweep, end to end on a tiny model: trials, ASHA, resumable, reusable best schedule."""

import json

import pandas as pd
import pytest
import ray

from asft_ray.config import PruneConfig
from asft_ray.errors import AsftError
from asft_ray.schedules import ScheduleSpec, build_schedule
from asft_ray.tune import SweepConfig, run_sweep


def _values(tiny_model_dir, out, **extra):
    return {"model": str(tiny_model_dir), "method": "wanda", "sparsity": 0.6, "nsamples": 2, "seqlen": 64,
            "out": str(out), "trials": 6, "concurrency": 2, "val_windows": 4, "device": "cpu", **extra}


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_sweep_runs_trials_stops_some_early_and_writes_a_reusable_schedule(ray_local, tiny_model_dir, tmp_path):
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
    # resuming a finished sweep restores it instead of starting over
    again = run_sweep(cfg, show_progress=False)
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


def test_the_repo_sweep_config_parses():
    from asft_ray.config import load_yaml
    from tests.conftest import REPO

    cfg = SweepConfig.from_dict(load_yaml(str(REPO / "configs" / "sweep-wanda70.yaml")))
    assert cfg.trials == 16 and cfg.prune.sparsity == 0.7
