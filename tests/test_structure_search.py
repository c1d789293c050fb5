"""`asft export --format structured --cost-target T --cost-search N`: every plan that meets the cost
target is exported and measured on WikiText-2 valid in Ray Tune trials, and the best is exported.
A hand-written cost model (weights read, as in test_structured_cost.py) gives the tiny Llama two
feasible plans: keep both KV groups and 44 MLP channels, or one group and 76 channels."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from asft_ray.cli import main
from asft_ray.data import wikitext2_ids
from asft_ray.errors import AsftError
from asft_ray.eval.cost_model import CostModel, DecoderShape
from asft_ray.eval.perplexity import perplexity
from asft_ray.export.formats.registry import ExportOptions
from asft_ray.export.structure_search import _open_work, plan_options, search_plans, work_folder
from asft_ray.export.structured import REPORT
from asft_ray.models import load_model, model_config
from asft_ray.pruning.cost_budget import feasible_plans
from tests.test_structured_cost import BYTES_ONLY, _export

SEARCH = ["--cost-target", "0.7", "--cost-knobs", "mlp,heads", "--cost-context", "64", "--nsamples", "2",
          "--seqlen", "32", "--refit"]


@pytest.fixture
def cost_model_file(tmp_path):
    path = tmp_path / "cost_model.json"
    path.write_text(json.dumps({"coefficients": BYTES_ONLY}))
    return path


def _plans(model_dir):
    dense = DecoderShape.from_config(model_config(str(model_dir)))
    return feasible_plans(dense, CostModel.from_dict({"coefficients": BYTES_ONLY}), 0.7, 64, ("mlp", "heads"))


def _weights(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_every_feasible_plan_is_measured_on_validation_and_the_best_is_exported(local_ray, tiny_model_dir,
                                                                                 cost_model_file, tmp_path, capsys):
    plans = _plans(tiny_model_dir)
    assert [(p.shape.kv_heads, p.shape.intermediate) for p in plans] == [(1, 76), (2, 44)]
    out = tmp_path / "searched"
    assert _export(tiny_model_dir, out, *SEARCH, "--cost-model", str(cost_model_file), "--cost-search", "3",
                   "--json") == 0
    report = json.loads(capsys.readouterr().out)
    search = report["cost_plan"]["search"]
    rows = search["plans"]
    assert (search["windows"], search["split"], len(rows)) == (3, "valid", 2)
    assert search["chosen"] == min(range(2), key=lambda i: rows[i]["val_ppl"])
    chosen = plans[search["chosen"]]
    assert (report["mlp_ratio"], report["head_ratio"]) == (chosen.mlp_ratio, chosen.head_ratio)
    assert not work_folder(out).exists()  # the trials' folder is gone once the chosen plan is written
    assert json.loads((out / REPORT).read_text())["cost_plan"]["search"] == search

    # each trial measured what a plain export of its plan measures (in memory, here), and the final
    # export is that plan's export, weight for weight
    options = ExportOptions(nsamples=2, seqlen=32, refit=True, show_progress=False)
    for index, plan in enumerate(plans):
        direct = tmp_path / f"direct-{index}"
        assert _export(tiny_model_dir, direct, "--mlp-ratio", str(plan.mlp_ratio), "--head-ratio",
                       str(plan.head_ratio), "--nsamples", "2", "--seqlen", "32", "--refit") == 0
        model, tokenizer = load_model(str(direct), "cpu", show_progress=False)
        ids = wikitext2_ids(tokenizer, "valid", None)[:, : 3 * 32]
        assert perplexity(model, ids, 32, 3, show_progress=False)["ppl"] == pytest.approx(rows[index]["val_ppl"], rel=1e-5)
        assert rows[index]["parameters"] == sum(p.numel() for p in model.parameters())
        assert plan_options(options, plan).mlp_ratio == plan.mlp_ratio
    final, direct = _weights(out), _weights(tmp_path / f"direct-{search['chosen']}")
    assert final.keys() == direct.keys() and all(torch.equal(final[k], direct[k]) for k in final)


@pytest.mark.slow  # 17 s (two searches on Ray Tune): `make test-slow`; the default suite runs one search (above)
def test_a_rerun_reuses_finished_trials_and_other_inputs_start_over(local_ray, tiny_model_dir, tmp_path):
    plans = _plans(tiny_model_dir)
    out = tmp_path / "resumed"
    options = ExportOptions(nsamples=2, seqlen=32, refit=True, cost_target=0.7, cost_knobs="mlp,heads",
                            cost_context=64, cost_search=2, show_progress=False)
    first, rows = search_plans(str(tiny_model_dir), options, plans, out)
    finished = work_folder(out) / "plan-1.json"
    record = json.loads(finished.read_text())
    finished.write_text(json.dumps({**record, "val_ppl": 1.0}))  # a trial that "finished" with the best ppl
    again, rows_again = search_plans(str(tiny_model_dir), options, plans, out)
    assert (again, rows_again[1]["val_ppl"]) == (1, 1.0) and rows_again[0] == rows[0]  # reused, not rerun
    # other inputs (another key): the folder of the earlier search is replaced, so every trial runs again
    work = _open_work(out, "another search's key")
    assert sorted(p.name for p in work.iterdir()) == ["search.json"]
    assert json.loads((work / "search.json").read_text()) == {"key": "another search's key"}


def test_a_search_folder_asft_did_not_write_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    work = work_folder(out)
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    options = ExportOptions(nsamples=2, seqlen=32, cost_target=0.7, cost_search=1, show_progress=False)
    with pytest.raises(AsftError, match="not an asft-ray cost search"):
        search_plans(str(tiny_model_dir), options, _plans(tiny_model_dir), out)
    assert (work / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("flags, message", [
    (["--cost-search", "2"], "go with --cost-target"),
    (["--cost-target", "0.7", "--cost-search", "-1"], "number of validation windows"),
    (["--cost-target", "0.7", "--cost-search", "2", "--search-cpus", "0"], "must be above 0"),
    (["--cost-target", "0.7", "--cost-search", "100000"], "fewer than 100000 windows of 2048 tokens"),
    (["--cost-target", "0.7", "--cost-search", "2", "--search-cpus", "64"],
     "a cost-search trial can never be placed: it asks 64 CPU each (the largest node has"),
])
def test_bad_search_flags_fail_with_one_line(tiny_model_dir, cost_model_file, tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    assert _export(tiny_model_dir, out, "--cost-model", str(cost_model_file), *flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asft: error: ") and "\n" not in err and message in err
    assert not out.exists() and not work_folder(out).exists()
