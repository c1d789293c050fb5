"""The `asft` command end to end on a tiny model, through the embedded Ray cluster."""

import json
import os
import subprocess
import sys

import pytest
import torch

from asft_ray.eval.sparsity import model_sparsity
from asft_ray.models import load_model


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


def test_prune_then_eval_then_refuse_then_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "pruned"
    base = ["prune", "--model", str(tiny_model_dir), "--method", "wanda", "--nsamples", "2", "--seqlen", "64",
            "--out", str(out), "--no-progress"]
    proc = asft(*base, "--sparsity", "0.5")
    assert proc.returncode == 0, proc.stderr
    run = json.loads((out / "asft_run.json").read_text())
    assert run["sparsity"]["total"] == pytest.approx(0.5, abs=1e-4)
    assert len(run["layers"]) == 2 and run["calibration_tokens"] == 128
    assert {"load_s", "prune_s", "save_s", "total_s"} <= set(run["timings"])

    model, _ = load_model(str(out), device="cpu")
    assert model_sparsity(model)["total"] == pytest.approx(0.5, abs=1e-4)

    proc = asft("eval", "--model", str(out), "--seqlen", "64", "--max-windows", "3", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["windows"] == 3 and result["tokens"] == 192
    assert result["sparsity"] == pytest.approx(0.5, abs=1e-4) and result["ppl"] > 1

    # the same run again: nothing to do; a different run: refused, and nothing written is lost
    before = tree_snapshot(out)
    proc = asft(*base, "--sparsity", "0.5")
    assert proc.returncode == 0 and "already holds this run" in proc.stdout
    assert_one_line_error(asft(*base, "--sparsity", "0.6"), "already holds a different run")
    assert tree_snapshot(out) == before

    proc = asft(*base, "--sparsity", "0.6", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "asft_run.json").read_text())["sparsity"]["total"] == pytest.approx(0.6, abs=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no temporary folders left behind


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
def test_bad_prune_input_is_one_line_and_exit_2(tiny_model_dir, tmp_path, args, message):
    if "--model" not in args:
        args = ["--model", str(tiny_model_dir), *args]
    proc = asft("prune", *args, "--out", str(tmp_path / "out"), timeout=120)
    assert_one_line_error(proc, message)
    assert not (tmp_path / "out").exists()


def test_nm_that_does_not_divide_the_width_is_one_line(tiny_model_dir, tmp_path):
    proc = asft("prune", "--model", str(tiny_model_dir), "--method", "magnitude", "--pattern", "1:3",
                "--out", str(tmp_path / "out"), "--no-progress")
    assert_one_line_error(proc, "is not a multiple of 3")
    assert not (tmp_path / "out").exists()


def test_out_holding_other_files_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = asft("prune", "--model", str(tiny_model_dir), "--method", "magnitude", "--sparsity", "0.5",
                "--out", str(tmp_path))
    assert_one_line_error(proc, "holds files that asft-ray did not write")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_eval_bad_input(tiny_model_dir):
    assert_one_line_error(asft("eval", "--model", "nope/nope-nope", env={"HF_HUB_OFFLINE": "1"}), "could not load model")
    assert_one_line_error(asft("eval", "--model", str(tiny_model_dir), "--max-windows", "0"), "--max-windows")
    assert_one_line_error(asft("eval", "--model", str(tiny_model_dir), "--task", "mmlu"), "invalid choice")


def test_yaml_config_errors_are_one_line(tiny_model_dir, tmp_path):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text(f"model: {tiny_model_dir}\nmethod: wanda\nsparsity: 0.5\nout: {tmp_path / 'o'}\nlr: 3\n")
    assert_one_line_error(asft("prune", "--config", str(bad_key)), "unknown key(s) lr")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    assert_one_line_error(asft("prune", "--config", str(broken)), "is not valid YAML")
    assert_one_line_error(asft("prune", "--config", str(tmp_path / "none.yaml")), "cannot read config")


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


def test_cli_with_two_scoring_workers_matches_one(tiny_model_dir, tmp_path):
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"w{n}"
        proc = asft("prune", "--model", str(tiny_model_dir), "--method", "sparsegpt", "--sparsity", "0.5",
                    "--nsamples", "8", "--seqlen", "32", "--workers", str(n), "--out", str(out), "--no-progress")
        assert proc.returncode == 0, proc.stderr
        outs[n] = saved_tensors(out)
    for key in outs[1]:
        assert torch.equal(outs[1][key], outs[2][key]), key


def test_true_sequential_flag_reaches_the_engine_and_the_run_identity(tiny_model_dir, tmp_path):
    base = ["prune", "--model", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5",
            "--nsamples", "4", "--seqlen", "32", "--no-progress"]
    weights, inputs = {}, {}
    for flag in ([], ["--true-sequential"]):
        out = tmp_path / ("seq" if flag else "at-once")
        proc = asft(*base, *flag, "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        weights[bool(flag)] = saved_tensors(out)
        inputs[bool(flag)] = json.loads((out / "asft_run.json").read_text())["inputs"]
    assert "true_sequential" not in inputs[False]  # the default keeps the identity of earlier runs
    assert inputs[True]["true_sequential"] is True
    key = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(weights[True][key] == 0, weights[False][key] == 0)


def test_more_workers_than_cpus_is_a_clear_error(tiny_model_dir, tmp_path):
    proc = asft("prune", "--model", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--nsamples", "2",
                "--seqlen", "32", "--workers", "8", "--worker-cpus", "1", "--out", str(tmp_path / "o"), "--no-progress",
                env={"ASFT_PLACEMENT_TIMEOUT_S": "5"})
    assert_one_line_error(proc, "scoring workers could be placed")
    assert not (tmp_path / "o").exists()
