"""The `asft` command end to end on a tiny model, through the embedded Ray cluster."""

import json
import os
import subprocess
import sys

import pytest
import torch

from asft_ray.eval.sparsity import model_sparsity
from asft_ray.models import load_model
from tests.test_bad_input import assert_one_line_error as assert_refused
from tests.test_bad_input import run_cli


def asft(*args, env=None, timeout=600):
    full_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "asft_ray.cli", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def assert_one_line_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("asft: error:") and pattern in lines[-1], proc.stderr
    assert sum(line.startswith("asft: error:") for line in lines) == 1


def tree_snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_prune_then_eval_then_refuse_then_overwrite(tiny_model_dir, tmp_path, capsys):
    """One prune through the installed entry point (a subprocess, its own embedded Ray cluster); the
    eval, the repeat, the refusal and the overwrite in this process (a second subprocess would only
    pay the imports again, ~10 s): the refusals are decided before any work, and the overwrite (a
    --true-sequential run) shows that the flag reaches the engine and the run identity."""
    out = tmp_path / "pruned"
    base = ["prune", "--model", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--nsamples", "2",
            "--seqlen", "64", "--out", str(out), "--no-progress"]
    proc = asft(*base)
    assert proc.returncode == 0, proc.stderr
    run = json.loads((out / "asft_run.json").read_text())
    assert run["sparsity"]["total"] == pytest.approx(0.5, abs=1e-4)
    assert len(run["layers"]) == 2 and run["calibration_tokens"] == 128
    assert {"load_s", "prune_s", "save_s", "total_s"} <= set(run["timings"])
    assert "true_sequential" not in run["inputs"]  # the default keeps the identity of earlier runs

    model, _ = load_model(str(out), device="cpu")
    assert model_sparsity(model)["total"] == pytest.approx(0.5, abs=1e-4)

    code, stdout, stderr = run_cli(capsys, "eval", "--model", str(out), "--seqlen", "64", "--max-windows", "3", "--json",
                                   "--no-progress")
    assert code == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["windows"] == 3 and result["tokens"] == 192
    assert result["sparsity"] == pytest.approx(0.5, abs=1e-4) and result["ppl"] > 1

    # the same run again: nothing to do; a different run: refused, and nothing written is lost
    at_once, before = saved_tensors(out), tree_snapshot(out)
    code, stdout, _ = run_cli(capsys, *base)
    assert code == 0 and "already holds this run" in stdout
    assert_refused(run_cli(capsys, *base, "--true-sequential"), "already holds a different run")
    assert tree_snapshot(out) == before

    code, _, stderr = run_cli(capsys, *base, "--true-sequential", "--overwrite")
    assert code == 0, stderr
    run = json.loads((out / "asft_run.json").read_text())
    assert run["inputs"]["true_sequential"] is True and run["sparsity"]["total"] == pytest.approx(0.5, abs=1e-4)
    key = "model.layers.1.mlp.down_proj.weight"  # layer 1 saw layer 0's pruned outputs
    assert not torch.equal(saved_tensors(out)[key] == 0, at_once[key] == 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no temporary folders left behind


def test_the_installed_entry_point_reports_bad_input_in_one_line():
    # a subprocess: huggingface_hub reads HF_HUB_OFFLINE when it is imported
    assert_one_line_error(asft("eval", "--model", "nope/nope-nope", env={"HF_HUB_OFFLINE": "1"}), "could not load model")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "no-such-model", "--method", "wanda", "--sparsity", "0.5"], "unknown model"),
        (["--method", "obs-magic", "--sparsity", "0.5"], "unknown method 'obs-magic'"),
        (["--method", "wanda", "--sparsity", "1.0"], "outside [0, 1)"),
        (["--method", "wanda", "--sparsity", "-0.1"], "outside [0, 1)"),
        (["--method", "wanda", "--sparsity", "0.3", "--pattern", "2:4"], "implies sparsity 0.5"),
        (["--method", "wanda", "--pattern", "5:4"], "need 0 < N < M"),
        (["--method", "wanda", "--sparsity", "0.5", "--data-dir", "/no/such/dir"], "data dir '/no/such/dir' does not exist"),
        (["--method", "wanda"], "sparsity is required"),
        (["--method", "magnitude", "--sparsity", "0.5", "--true-sequential"], "true_sequential works with wanda and sparsegpt"),
    ],
)
def test_bad_prune_input_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, args, message):
    if "--model" not in args:
        args = ["--model", str(tiny_model_dir), *args]
    assert_refused(run_cli(capsys, "prune", *args, "--out", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_eval_bad_input(tiny_model_dir, capsys):
    assert_refused(run_cli(capsys, "eval", "--model", tiny_model_dir, "--max-windows", "0"), "--max-windows")
    assert_refused(run_cli(capsys, "eval", "--model", tiny_model_dir, "--task", "mmlu"), "invalid choice")


def test_yaml_config_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text(f"model: {tiny_model_dir}\nmethod: wanda\nsparsity: 0.5\nout: {tmp_path / 'o'}\nlr: 3\n")
    assert_refused(run_cli(capsys, "prune", "--config", bad_key), "unknown key(s) lr")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    assert_refused(run_cli(capsys, "prune", "--config", broken), "is not valid YAML")
    assert_refused(run_cli(capsys, "prune", "--config", tmp_path / "none.yaml"), "cannot read config")


def test_demo_config_is_valid():
    from asft_ray.config import PruneConfig, load_yaml

    from tests.conftest import REPO

    cfg = PruneConfig.from_dict(load_yaml(str(REPO / "configs" / "demo.yaml")))
    assert cfg.model == "smollm2-135m" and cfg.method == "wanda" and cfg.sparsity == 0.5
    for name in ("smollm2-sparsegpt-2of4.yaml", "smollm2-wanda-2of4-true-sequential.yaml"):
        cfg = PruneConfig.from_dict(load_yaml(str(REPO / "configs" / name)))
        assert cfg.pattern == "2:4" and cfg.sparsity == 0.5
        assert cfg.true_sequential == ("true-sequential" in name)


def saved_tensors(folder):
    """Every tensor of a saved model, whatever its shards (a streamed prune writes one per layer)."""
    from safetensors.torch import load_file

    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}


def test_more_workers_than_cpus_is_a_clear_error(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ASFT_PLACEMENT_TIMEOUT_S", "600")  # an impossible request must not wait for it
    code, _, err = run_cli(capsys, "prune", "--model", tiny_model_dir, "--method", "wanda", "--sparsity", "0.5",
                           "--nsamples", "2", "--seqlen", "32", "--workers", "8", "--worker-cpus", "1",
                           "--out", tmp_path / "o", "--no-progress")
    assert_one_line_error(subprocess.CompletedProcess([], code, "", err),
                          "8 scoring workers can never be placed: they ask 1 CPU each (the largest node has")
    assert not (tmp_path / "o").exists()
