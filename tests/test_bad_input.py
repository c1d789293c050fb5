"""Bad input and unsafe outputs, through `asft_ray.cli.main` in this process (no Ray, no model load).

Every case: exit code 2, exactly one line `asft: error: ...` on stderr, no traceback, and
nothing on disk changed that asft-ray did not write.
"""

from __future__ import annotations

import os
import time

import pytest
import yaml

from asft_ray.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:  # argparse errors
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(result, pattern: str) -> str:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("asft: error:"), err
    assert pattern in lines[0], err
    return lines[0]


def snapshot(folder):
    """Every file and folder under `folder` (files with their bytes): to show that nothing was touched or left."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def write_yaml(path, values) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


PRUNE = {"model": "smollm2-135m", "method": "magnitude", "sparsity": 0.5}


# ---- item 1 and 5: every typed key is checked when the config is built ----

def test_a_string_false_for_overwrite_is_refused_and_deletes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    config = write_yaml(tmp_path / "c.yaml", {**PRUNE, "out": str(out), "overwrite": "false"})
    before = snapshot(tmp_path)
    line = assert_one_line_error(run_cli(capsys, "prune", "--config", config), "key 'overwrite' must be true or false")
    assert "got 'false'" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("key,value,expected", [
    ("nsamples", 2.5, "key 'nsamples' must be an integer, got 2.5"),
    ("nsamples", True, "key 'nsamples' must be an integer, got True"),
    ("seqlen", "128", "key 'seqlen' must be an integer, got '128'"),
    ("model", ["a", "b"], "key 'model' must be a string, got ['a', 'b']"),
    ("sparsity", "0.5", "key 'sparsity' must be a number"),
    ("stream", "yes", "key 'stream' must be true or false"),
    ("worker_memory_gb", "4", "key 'worker_memory_gb' must be a number or null"),
    ("schedule", 3, "key 'schedule' must be a string or a mapping"),
])
def test_prune_config_types(tmp_path, capsys, key, value, expected):
    config = write_yaml(tmp_path / "c.yaml", {**PRUNE, "out": str(tmp_path / "out"), key: value})
    assert_one_line_error(run_cli(capsys, "prune", "--config", config), expected)
    assert not (tmp_path / "out").exists()


def test_a_top_level_list_is_refused(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", [PRUNE])
    assert_one_line_error(run_cli(capsys, "prune", "--config", config, "--out", tmp_path / "out"),
                          "expected a mapping of settings, got a list")


def test_non_numeric_custom_schedule_values(tmp_path, capsys):
    schedule = write_yaml(tmp_path / "s.yaml", {"schedule": "custom", "layers": [0.5, "half"]})
    assert_one_line_error(
        run_cli(capsys, "prune", "--model", "smollm2-135m", "--method", "magnitude", "--sparsity", "0.5",
                "--schedule", schedule, "--out", tmp_path / "out"),
        "key 'layers' must be a list of numbers or null")


STAGED = {"model": "smollm2-135m", "method": "wanda", "stages": [0.3, 0.5], "gate": {"max_ppl_ratio": 2.0}}


@pytest.mark.parametrize("change,expected", [
    ({"gate": {"max_ppl_ratio": "2"}}, "gate: key 'max_ppl_ratio' must be a number or null"),
    ({"gate": {"manual": "false"}}, "gate: key 'manual' must be true or false"),
    ({"stages": [0.3, "0.5"]}, "stages must be numbers"),
    ({"overwrite": "no"}, "key 'overwrite' must be true or false"),
])
def test_staged_config_types(tmp_path, capsys, change, expected):
    config = write_yaml(tmp_path / "c.yaml", {**STAGED, "out": str(tmp_path / "run"), **change})
    assert_one_line_error(run_cli(capsys, "staged", config), expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change,expected", [
    ({"concurrency": "2"}, "key 'concurrency' must be an integer, got '2'"),
    ({"trials": 4.0}, "key 'trials' must be an integer"),
    ({"linear_offsets": [1]}, "key 'linear_offsets' must be a list of strings, got [1]"),
])
def test_sweep_config_types(tmp_path, capsys, change, expected):
    config = write_yaml(tmp_path / "c.yaml", {**PRUNE, "method": "wanda", "out": str(tmp_path / "sweep"), **change})
    assert_one_line_error(run_cli(capsys, "sweep", config), expected)
    assert not (tmp_path / "sweep").exists()


RUN = {"model": "smollm2-135m", "prune": {"method": "wanda", "stages": [0.5], "gate": {"max_ppl_ratio": 2.0}}}


@pytest.mark.parametrize("change,expected", [
    ({"eval": {"ppl_seqlen": "128"}}, "eval: key 'ppl_seqlen' must be an integer, got '128'"),
    ({"eval": {"ppl_windows": 2.5}}, "eval: key 'ppl_windows' must be an integer or null"),
    ({"eval": {"zeroshot": [1]}}, "key 'zeroshot' must be a task name or a list of them"),
    ({"export": "compressed"}, "key 'export' must be a list of strings"),
    ({"price_per_hour": "3"}, "key 'price_per_hour' must be a number or null"),
    ({"prune": {**RUN["prune"], "nsamples": "8"}}, "prune: key 'nsamples' must be an integer"),
    ({"recover": {"lr": "1e-4"}}, "recover: key 'lr' must be a number or null"),
])
def test_run_config_types(tmp_path, capsys, change, expected):
    config = write_yaml(tmp_path / "c.yaml", {**RUN, "out": str(tmp_path / "run"), **change})
    assert_one_line_error(run_cli(capsys, "run", config), expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change,expected", [
    ({"max_steps": "10"}, "key 'max_steps' must be an integer"),
    ({"bf16": "false"}, "key 'bf16' must be true or false or null"),
    ({"overwrite": "false"}, "key 'overwrite' must be true or false"),
])
def test_recover_config_types(tmp_path, capsys, change, expected):
    config = write_yaml(tmp_path / "c.yaml", {"model": "smollm2-135m", "out": str(tmp_path / "out"), **change})
    assert_one_line_error(run_cli(capsys, "recover", "--config", config), expected)
    assert not (tmp_path / "out").exists()


# ---- item 2: --overwrite replaces only what asft-ray wrote; --out must be a safe, writable place ----

def foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "sub").mkdir()
    (out / "sub" / "data.csv").write_text("1,2")
    return out


def prune_args(out):
    return ["prune", "--model", "smollm2-135m", "--method", "magnitude", "--sparsity", "0.5", "--out", out]


def staged_config(tmp_path, out):
    return write_yaml(tmp_path / "staged.yaml", {**STAGED, "out": str(out)})


def commands_writing_to(tmp_path, out):
    """Every command that writes a folder, aimed at `out`, with --overwrite."""
    return {
        "prune": [*prune_args(out), "--overwrite"],
        "staged": ["staged", staged_config(tmp_path, out), "--overwrite"],
        "export": ["export", "--model", "smollm2-135m", "--format", "compressed", "--out", out, "--overwrite"],
        "recover": ["recover", "--model", "smollm2-135m", "--out", out, "--overwrite"],
    }


@pytest.mark.parametrize("command", ["prune", "staged", "export", "recover"])
def test_overwrite_never_replaces_a_folder_asft_did_not_write(tmp_path, capsys, command):
    out = foreign_folder(tmp_path)
    args = commands_writing_to(tmp_path, out)[command]
    before = snapshot(tmp_path)
    line = assert_one_line_error(run_cli(capsys, *args), "holds files that asft-ray did not write")
    assert "--overwrite" not in line  # the refusal must not suggest the flag that would delete them
    assert snapshot(tmp_path) == before


def test_without_overwrite_a_foreign_folder_is_refused_without_suggesting_overwrite(tmp_path, capsys):
    out = foreign_folder(tmp_path)
    line = assert_one_line_error(run_cli(capsys, *prune_args(out)), "holds files that asft-ray did not write")
    assert "--overwrite" not in line


def test_an_asft_output_may_still_be_replaced_with_overwrite(tmp_path):
    from asft_ray.artifacts import RUN_FILE, check_output_dir

    out = tmp_path / "old-run"
    out.mkdir()
    (out / RUN_FILE).write_text('{"inputs": {"model": "other"}}')
    assert check_output_dir(out, {"model": "this"}, overwrite=True) is False  # proceed and replace
    with pytest.raises(Exception, match="pass --overwrite"):
        check_output_dir(out, {"model": "this"}, overwrite=False)


def test_every_output_record_marks_a_folder_as_asft_written():
    from asft_ray.artifacts import RECORD_FILES, RUN_FILE
    from asft_ray.export.compressed import MANIFEST
    from asft_ray.export.structured import REPORT
    from asft_ray.staged import RUN_STATE

    assert {RUN_FILE, RUN_STATE, MANIFEST, REPORT} <= set(RECORD_FILES)


@pytest.mark.parametrize("command", ["prune", "staged", "export", "recover", "run", "sweep"])
@pytest.mark.parametrize("where", [".", "..", "/"])
def test_out_that_would_take_the_working_directory_along_is_refused(tmp_path, capsys, monkeypatch, command, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    args = {
        **commands_writing_to(tmp_path, where),
        "run": ["run", write_yaml(tmp_path / "run.yaml", {**RUN, "out": where})],
        "sweep": ["sweep", write_yaml(tmp_path / "sweep.yaml", {**PRUNE, "method": "wanda", "out": where})],
    }[command]
    before = snapshot(tmp_path)
    expected = {".": "is the current directory", "..": "is a parent of the current directory", "/": "is a filesystem root"}
    line = assert_one_line_error(run_cli(capsys, *args), expected[where])
    assert "--overwrite" not in line
    assert snapshot(tmp_path) == before


def test_out_below_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    assert_one_line_error(run_cli(capsys, *prune_args(tmp_path / "a-file" / "out")), "is not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder; no read-only mount to use here")
def test_out_in_a_read_only_folder_is_refused_before_any_work(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_one_line_error(run_cli(capsys, *prune_args(locked / "out")), "is not writable")
    finally:
        locked.chmod(0o755)


# ---- item 5: broken files and unknown devices are one line, not a traceback ----

@pytest.mark.parametrize("command", [
    ["prune", "--model", "smollm2-135m", "--method", "magnitude", "--sparsity", "0.5", "--out", "OUT"],
    ["eval", "--model", "smollm2-135m"],
    ["export", "--model", "smollm2-135m", "--format", "compressed", "--out", "OUT"],
    ["recover", "--model", "smollm2-135m", "--out", "OUT"],
])
def test_an_unknown_device_is_one_line(tmp_path, capsys, command):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert_one_line_error(run_cli(capsys, *args, "--device", "tpu"), "unknown device 'tpu'")
    assert not (tmp_path / "out").exists()


def test_an_unknown_device_in_a_config_is_one_line(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", {**PRUNE, "out": str(tmp_path / "out"), "device": "tpu"})
    assert_one_line_error(run_cli(capsys, "prune", "--config", config), "unknown device 'tpu'")


BROKEN_WEIGHTS = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: b"this is not a safetensors file" * 8,
    "empty": lambda data: b"",
}


@pytest.fixture
def broken_model(tiny_model_dir, tmp_path, request):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(BROKEN_WEIGHTS[request.param](weights.read_bytes()))
    return folder


@pytest.mark.parametrize("broken_model", list(BROKEN_WEIGHTS), indirect=True)
def test_broken_weights_are_one_line_when_loaded(broken_model, capsys, data_dir):
    assert_one_line_error(run_cli(capsys, "eval", "--model", broken_model, "--seqlen", "64", "--data-dir", data_dir,
                                  "--no-stream", "--no-progress"),
                          f"could not load model '{broken_model}'")


@pytest.mark.parametrize("broken_model", list(BROKEN_WEIGHTS), indirect=True)
def test_broken_weights_are_one_line_when_evaluated_streamed(broken_model, capsys, data_dir):
    line = assert_one_line_error(run_cli(capsys, "eval", "--model", broken_model, "--seqlen", "64", "--data-dir", data_dir,
                                         "--no-progress"), "model.safetensors")
    assert "not a valid safetensors file" in line or "is truncated" in line, line


@pytest.mark.parametrize("broken_model", list(BROKEN_WEIGHTS), indirect=True)
def test_broken_weights_are_one_line_when_streamed(broken_model):
    from asft_ray.errors import AsftError
    from asft_ray.pruning.streaming import SafetensorsReader

    with pytest.raises(AsftError, match="not a valid safetensors file|is truncated"):
        SafetensorsReader(broken_model)


BROKEN_C4 = {
    "empty": (b"", "is empty"),
    "truncated": (b'{"text": "a whole document"}\n{"text": "cut in the mid', "could not be read as JSON lines"),
    "garbage": (b"\x00\x01 not json at all\n", "could not be read as JSON lines"),
    "no text field": (b'{"url": "http://x", "body": "words"}\n', "has no `text` field"),
    "text not a string": (b'{"text": 5}\n', "could not be read as JSON lines|must be a string|holds no text"),
}


@pytest.mark.parametrize("case", list(BROKEN_C4))
def test_broken_c4_is_one_clear_error(tmp_path, case):
    from asft_ray.data import C4_FILE, c4_documents
    from asft_ray.errors import AsftError

    content, message = BROKEN_C4[case]
    path = tmp_path / C4_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(AsftError, match=message) as err:
        c4_documents(str(tmp_path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"\n\n \n"], ids=["empty", "blank"])
def test_empty_wikitext_is_one_line_in_eval(tmp_path, capsys, tiny_model_dir, content):
    from asft_ray.data import WIKITEXT_FILES

    path = tmp_path / WIKITEXT_FILES["test"]
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    assert_one_line_error(run_cli(capsys, "eval", "--model", tiny_model_dir, "--seqlen", "64", "--data-dir", tmp_path, "--no-progress"),
                          "test.txt")


# ---- items 6 and 7: what the model's config decides is checked before Ray starts or a weight loads ----

def fail_if_ray_starts(monkeypatch):
    import asft_ray.distributed.runner as runner

    def refuse(*_, **__):
        raise AssertionError("Ray was started before the config-only checks")

    monkeypatch.setattr(runner, "init_ray", refuse)


def fail_if_weights_load(monkeypatch):
    import asft_ray.models as models

    def refuse(*_, **__):
        raise AssertionError("weights were loaded before the config-only checks")

    monkeypatch.setattr(models, "load_model", refuse)


def test_prune_seqlen_past_the_context_is_refused_before_ray(tiny_model_dir, tmp_path, capsys, monkeypatch, data_dir):
    fail_if_ray_starts(monkeypatch)  # the tiny model has max_position_embeddings 512
    assert_one_line_error(run_cli(capsys, "prune", "--model", tiny_model_dir, "--method", "wanda", "--sparsity", "0.5",
                                  "--seqlen", "513", "--data-dir", data_dir, "--out", tmp_path / "out"),
                          "seqlen 513 is longer than the model's context: max_position_embeddings is 512")
    assert not (tmp_path / "out").exists()


def test_eval_seqlen_past_the_context_is_refused_before_loading(tiny_model_dir, capsys, monkeypatch, data_dir):
    fail_if_weights_load(monkeypatch)
    assert_one_line_error(run_cli(capsys, "eval", "--model", tiny_model_dir, "--seqlen", "4096", "--data-dir", data_dir),
                          "--seqlen 4096 is longer than the model's context")


def test_the_context_limit_itself_is_accepted(tiny_model_dir):
    from asft_ray.models import check_seqlen, model_config

    check_seqlen(512, model_config(str(tiny_model_dir)))  # exactly the context: no error


def test_nm_that_does_not_fit_the_width_is_refused_before_ray(tiny_model_dir, tmp_path, capsys, monkeypatch):
    fail_if_ray_starts(monkeypatch)  # widths 64 and 128: 7 divides neither
    assert_one_line_error(run_cli(capsys, "prune", "--model", tiny_model_dir, "--method", "magnitude",
                                  "--pattern", "2:7", "--out", tmp_path / "out"), "is not a multiple of 7")


def test_a_schedule_for_another_layer_count_is_refused_before_ray(tiny_model_dir, tmp_path, capsys, monkeypatch):
    fail_if_ray_starts(monkeypatch)  # the tiny model has 2 layers
    schedule = write_yaml(tmp_path / "s.yaml", {"schedule": "custom", "layers": [0.4, 0.5, 0.6]})
    assert_one_line_error(run_cli(capsys, "prune", "--model", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.5",
                                  "--schedule", schedule, "--out", tmp_path / "out"),
                          "custom schedule layers lists 3 layers, the model has 2")


def test_staged_checks_the_model_config_before_ray(tiny_model_dir, tmp_path, capsys, monkeypatch, data_dir):
    fail_if_ray_starts(monkeypatch)
    config = write_yaml(tmp_path / "c.yaml", {**STAGED, "model": str(tiny_model_dir), "seqlen": 1024, "data_dir": data_dir,
                                              "out": str(tmp_path / "run")})
    assert_one_line_error(run_cli(capsys, "staged", config), "seqlen 1024 is longer than the model's context")
    assert not (tmp_path / "run").exists()


def test_a_mistyped_relative_model_path_is_no_such_directory(tmp_path, capsys, monkeypatch):
    (tmp_path / "runs" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert_one_line_error(run_cli(capsys, "eval", "--model", "runs/bas"), "model 'runs/bas': no such file or directory")
    assert time.perf_counter() - start < 5  # no hub look-up


# ---- item 8: options that would silently do nothing ----

def test_resume_with_a_one_step_method_is_refused(tmp_path, capsys):
    assert_one_line_error(run_cli(capsys, *prune_args(tmp_path / "out"), "--resume"),
                          "magnitude prunes in one step and has nothing to resume")


def test_sweep_groups_beyond_the_layer_count_are_refused_before_ray(tiny_model_dir, tmp_path, capsys, monkeypatch, data_dir):
    fail_if_ray_starts(monkeypatch)  # the tiny model has 2 layers
    config = write_yaml(tmp_path / "c.yaml", {**PRUNE, "model": str(tiny_model_dir), "method": "wanda", "seqlen": 64,
                                              "data_dir": data_dir, "groups": 3, "out": str(tmp_path / "sweep")})
    assert_one_line_error(run_cli(capsys, "sweep", config), "groups 3 is more than the model's 2 layers")
    assert not (tmp_path / "sweep").exists()
