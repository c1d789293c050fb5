"""Staged pruning: gates roll back exactly, manual gates survive a restart, runs resume after a crash."""

import json

import pytest
import torch
from safetensors.torch import load_file

from asft_ray import prune as prune_mod
from asft_ray.errors import AsftError
from asft_ray.staged import Gate, StagedConfig, decide, run_staged
from tests.conftest import build_tiny_llama, build_tokenizer

STAGES = [0.2, 0.4, 0.6, 0.8]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("staged-model")
    tokenizer = build_tokenizer()
    # a larger init than the default, so that pruning visibly moves the perplexity of a random model
    build_tiny_llama(vocab_size=len(tokenizer), initializer_range=0.2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(model_dir, out, gate, method="magnitude", **extra):
    values = {"model": str(model_dir), "method": method, "nsamples": 2, "seqlen": 64, "out": str(out),
              "stages": STAGES, "gate": {"windows": 4, **gate}, "device": "cpu"}
    values.update(extra)
    return StagedConfig.from_dict(values)


def _weights(folder):
    """Every tensor of a model folder, whatever its sharding (streamed stages write one shard per layer)."""
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard))
    assert weights, f"no safetensors in {folder}"
    return weights


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def permissive(model_dir, tmp_path_factory):
    """Every stage passes: the per-stage validation ppl the other tests pick their tolerances from."""
    out = tmp_path_factory.mktemp("permissive") / "run"
    result = run_staged(_config(model_dir, out, {"max_ppl": 1e9}), show_progress=False)
    return out, result


def test_permissive_gate_runs_every_stage_and_logs_it(permissive):
    out, result = permissive
    assert result["final"] == "stage-04"
    assert [r["target"] for r in result["results"].values()] == STAGES
    for name, r in result["results"].items():  # each stage saved with its measured sparsity
        zeros = sum(int((v == 0).sum()) for k, v in _weights(out / "stages" / name).items() if "layers" in k and "norm" not in k)
        assert r["achieved"] == pytest.approx(r["target"], abs=1e-3) and zeros > 0
    assert _same(_weights(out / "model"), _weights(out / "stages" / "stage-04"))
    for earlier, later in zip(["stage-01", "stage-02", "stage-03"], ["stage-02", "stage-03", "stage-04"]):
        a, b = _weights(out / "stages" / earlier), _weights(out / "stages" / later)
        for key in a:  # a stage only adds zeros: weights pruned earlier stay pruned
            if "proj" in key:
                assert bool((b[key][a[key] == 0] == 0).all()), (earlier, later, key)
    events = [json.loads(line)["event"] for line in (out / "decisions.jsonl").read_text().splitlines()]
    assert events == ["dense", "stage", "stage", "stage", "stage", "final"]
    import pyarrow.parquet as pq

    table = pq.read_table(out / "decisions.parquet")
    assert table.num_rows == 6 and "layer_sparsity" in table.column_names


def test_a_violated_tolerance_rolls_back_to_the_previous_stage_exactly(permissive, model_dir, tmp_path):
    _, result = permissive
    values = [result["dense"]] + [r["value"] for r in result["results"].values()]
    # the first stage k >= 2 whose ppl exceeds every earlier stage's: a ceiling between them fails stage k only
    k = next(k for k in range(2, len(values)) if values[k] > max(values[1:k]))
    ceiling = (values[k] + max(values[1:k])) / 2
    out = tmp_path / "run"
    assert values[0] < ceiling, "the fixture's dense ppl must pass the ceiling for this test to mean anything"
    gated = run_staged(_config(model_dir, out, {"max_ppl": ceiling}), show_progress=False)
    assert gated["final"] == f"stage-{k - 1:02d}"
    assert _same(_weights(out / "model"), _weights(permissive[0] / "stages" / f"stage-{k - 1:02d}"))
    rows = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
    failed = [r for r in rows if r["verdict"] == "fail"]
    assert len(failed) == 1 and failed[0]["stage"] == k
    assert "exceeds" in failed[0]["reason"] and f"rolled back to stage-{k - 1:02d}" in failed[0]["reason"]
    assert not (out / "stages" / f"stage-{k:02d}").exists()


def test_manual_gate_pauses_and_continues_across_restarts(model_dir, permissive, tmp_path):
    out = tmp_path / "run"
    cfg = _config(model_dir, out, {"manual": True})
    assert run_staged(cfg, show_progress=False) == {"status": "awaiting_approval", "stage": 1, "run": str(out)}
    # a new process would see the same: nothing decided yet
    assert run_staged(cfg, show_progress=False)["status"] == "awaiting_approval"
    decide(str(out), "approve", "looks fine")
    assert run_staged(cfg, show_progress=False)["stage"] == 2  # continued, paused after stage 2
    decide(str(out), "reject", "too much loss")
    final = run_staged(cfg, show_progress=False)
    assert final["status"] == "finished" and final["final"] == "stage-01"
    assert _same(_weights(out / "model"), _weights(permissive[0] / "stages" / "stage-01"))
    verdicts = [json.loads(line)["verdict"] for line in (out / "decisions.jsonl").read_text().splitlines()]
    assert verdicts == ["baseline", "pending", "approved", "pending", "rejected", "done"]
    with pytest.raises(AsftError, match="not waiting"):
        decide(str(out), "approve")


def test_a_streamed_staged_run_equals_the_in_memory_one_and_never_loads_the_whole_model(model_dir, tmp_path, monkeypatch):
    """Streaming is the default for a safetensors model directory: each stage prunes the last passing
    stage's folder one decoder layer at a time and the gate reads it the same way."""
    from asft_ray import models

    two = {"stages": [0.3, 0.6]}
    in_memory = run_staged(_config(model_dir, tmp_path / "memory", {"max_ppl": 1e9}, method="wanda", stream=False, **two),
                           show_progress=False)

    def no_whole_model(*args, **kwargs):
        raise AssertionError("a streamed staged run loaded a whole model")

    monkeypatch.setattr(models, "load_model", no_whole_model)
    streamed = run_staged(_config(model_dir, tmp_path / "streamed", {"max_ppl": 1e9}, method="wanda", **two),
                          show_progress=False)
    assert streamed["final"] == in_memory["final"] == "stage-02"
    assert streamed["dense"] == pytest.approx(in_memory["dense"], rel=1e-5)
    for name, result in in_memory["results"].items():
        assert streamed["results"][name]["value"] == pytest.approx(result["value"], rel=1e-5)
        assert streamed["results"][name]["achieved"] == result["achieved"]
        assert _same(_weights(tmp_path / "streamed" / "stages" / name), _weights(tmp_path / "memory" / "stages" / name))
    assert _same(_weights(tmp_path / "streamed" / "model"), _weights(tmp_path / "memory" / "model"))
    assert not [p.name for p in (tmp_path / "streamed").rglob(".*")]  # no temp folders or checkpoints left


def test_a_crashed_run_resumes_to_the_same_final_model(model_dir, tmp_path, monkeypatch):
    cfg_values = dict(gate={"max_ppl": 1e9}, method="wanda", schedule="owl")
    reference = tmp_path / "reference"
    run_staged(_config(model_dir, reference, **cfg_values), show_progress=False)

    out = tmp_path / "crashed"
    real_prune, calls = prune_mod.run_prune, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_prune(*args, **kwargs)

    monkeypatch.setattr(prune_mod, "run_prune", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_staged(_config(model_dir, out, **cfg_values), show_progress=False)
    monkeypatch.setattr(prune_mod, "run_prune", real_prune)
    state = json.loads((out / "state.json").read_text())
    assert state["passed"] == "stage-02" and not state["finished"]
    run_staged(_config(model_dir, out, **cfg_values), show_progress=False)
    assert _same(_weights(out / "model"), _weights(reference / "model"))


@pytest.mark.parametrize("change, message", [
    ({"stages": [0.5, 0.4]}, "increase strictly"),
    ({"stages": [0.2, 1.0]}, r"in \(0, 1\)"),
    ({"gate": {"windows": 2}}, "needs a tolerance"),
    ({"gate": {"max_ppl_ratio": 1.2, "split": "test"}}, "must not look at the test split"),
    ({"gate": {"max_ppl_ratio": 1.2, "colour": 1}}, "unknown gate key"),
    ({"schedule": {"name": "owl", "max_sparsity": 0.7}}, "unreachable"),
    ({"sparsity": 0.5}, "takes `stages`"),
    ({"pattern": "2:4"}, "unstructured"),
])
def test_bad_staged_configs_fail_before_any_work(change, message, tmp_path):
    values = {"model": "smollm2-135m", "method": "wanda", "out": str(tmp_path / "r"), "stages": STAGES,
              "gate": {"max_ppl_ratio": 1.5}, **change}
    with pytest.raises(AsftError, match=message):
        StagedConfig.from_dict(values)


def test_a_step_rule_expands_to_stages():
    cfg = StagedConfig.from_dict({"model": "m", "method": "magnitude", "out": "o", "gate": {"max_ppl_ratio": 2},
                                  "stages": {"start": 0.2, "step": 0.15, "stop": 0.65}})
    assert cfg.stages == (0.2, 0.35, 0.5, 0.65)


def test_the_repo_staged_config_parses():
    from asft_ray.config import load_yaml
    from tests.conftest import REPO

    cfg = StagedConfig.from_dict(load_yaml(str(REPO / "configs" / "staged-demo.yaml")))
    assert cfg.stages == (0.3, 0.45, 0.6, 0.7) and cfg.gate.retry_smaller_step


def test_cli_staged_runs_on_ray_and_approve_continues_it(model_dir, tmp_path, capsys, monkeypatch):
    from asft_ray.cli import main

    config = tmp_path / "staged.yaml"
    config.write_text(
        f"model: {model_dir}\nmethod: magnitude\nseqlen: 64\ndevice: cpu\nout: {tmp_path / 'run'}\n"
        "stages: [0.3]\ngate:\n  manual: true\n  windows: 2\n")  # several: test_manual_gate_pauses_and_continues_...
    assert main(["staged", str(config), "--no-progress"]) == 0
    assert "awaits a decision: asft approve" in capsys.readouterr().out
    assert main(["approve", str(tmp_path / "run"), "--note", "ok"]) == 0
    assert main(["staged", str(config), "--no-progress"]) == 0
    assert "final model = stage-01" in capsys.readouterr().out
    assert main(["reject", str(tmp_path / "run")]) == 2  # nothing is waiting any more
    capsys.readouterr()

    def no_ray(*args, **kwargs):
        raise AssertionError("a finished run asked for again started its coordinator")

    monkeypatch.setattr("asft_ray.distributed.runner._on_ray", no_ray)
    assert main(["staged", str(config), "--no-progress", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["status"] == "finished" and again["final"] == "stage-01" and again["results"]["stage-01"]["target"] == 0.3


@pytest.mark.parametrize("gate", [Gate(max_ppl_ratio=1.5), Gate(max_stage_increase=2.0), Gate(max_ppl=23.0),
                                  Gate(max_ppl_ratio=1.5, max_stage_increase=2.0, max_ppl=30.0)])
def test_a_gate_passes_exactly_up_to_its_tightest_limit(gate):
    dense, previous = 16.0, 20.0
    limit = gate.limit(dense, previous)
    assert limit == min(x for x in (1.5 * dense if gate.max_ppl_ratio else None,
                                    previous + 2.0 if gate.max_stage_increase else None,
                                    gate.max_ppl) if x is not None)
    for ppl in (limit - 0.01, limit, limit + 0.01):
        passed, reason = gate.check(ppl, dense, previous)
        assert passed == (ppl <= limit), (ppl, reason)
        assert reason.startswith("within" if passed else "exceeds")
