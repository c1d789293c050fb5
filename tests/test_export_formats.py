"""The export-format registry: a format declared in one place reaches `asft export`, its help,
a run config's `export:` list and the pipeline's export step."""

import json

import pytest

from asft_ray.artifacts import atomic_output_dir, read_json, write_json_atomic
from asft_ray.cli import main
from asft_ray.errors import AsftError
from asft_ray.export.formats import ExportFormat, format_names, register, run_format_names, unregister


def _write(model_spec, out, options):
    report = {"model": model_spec, "dtype": options.dtype, "weights_file_bytes": 7}
    with atomic_output_dir(out) as tmp:
        write_json_atomic(tmp / "toy.json", report)
    return report


@pytest.fixture
def toy():
    fmt = register(ExportFormat(
        "toy", summary="a JSON note about the model", write=_write,
        describe=lambda model, out, report: f"{model} -> {out}: a toy of {report['weights_file_bytes']} bytes",
        read_report=lambda out: read_json(out / "toy.json"),
        run_summary=lambda report, out: f"{report['weights_file_bytes']} bytes of toy"))
    yield fmt
    unregister("toy")


def test_the_built_in_formats_in_their_order():
    assert format_names() == ("compressed", "structured", "semistructured", "int8")
    assert run_format_names() == ("compressed", "int8")  # the others need options or a GPU


def test_a_format_registered_in_one_place_reaches_the_cli(toy, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "toy: a JSON note about the model" in " ".join(capsys.readouterr().out.split())
    out = tmp_path / "toy-out"
    assert main(["export", "--model", "m", "--format", "toy", "--dtype", "bfloat16", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"m -> {out}: a toy of 7 bytes"
    assert json.loads((out / "toy.json").read_text()) == {"model": "m", "dtype": "bfloat16", "weights_file_bytes": 7}


def test_a_format_with_a_run_summary_is_offered_to_runs_and_exported_once(toy, tmp_path):
    from asft_ray.pipeline import RunConfig, _export

    values = {"model": "smollm2-135m", "out": str(tmp_path / "r"),
              "prune": {"method": "wanda", "stages": [0.5], "gate": {"max_ppl_ratio": 2}}, "export": ["toy"]}
    assert RunConfig.from_dict(values).export == ("toy",)
    out = tmp_path / "export" / "toy"
    report = _export("toy", tmp_path / "model", out, "cpu")
    assert report["summary"] == "7 bytes of toy" and report["model"] == str(tmp_path / "model")
    written = (out / "toy.json").stat().st_mtime_ns
    assert _export("toy", tmp_path / "model", out, "cpu")["summary"] == "7 bytes of toy"
    assert (out / "toy.json").stat().st_mtime_ns == written  # written once


def test_a_format_without_a_run_summary_is_not_offered_to_runs(tmp_path):
    from asft_ray.pipeline import RunConfig

    values = {"model": "smollm2-135m", "out": str(tmp_path / "r"),
              "prune": {"method": "wanda", "stages": [0.5], "gate": {"max_ppl_ratio": 2}}, "export": ["structured"]}
    with pytest.raises(AsftError, match="unknown export format.s. structured: choose from compressed"):
        RunConfig.from_dict(values)


def test_structured_only_options_name_the_formats_that_take_them(tmp_path, capsys):
    code = main(["export", "--model", "m", "--format", "compressed", "--drop-layers", "1", "--out", str(tmp_path / "o")])
    assert code == 2 and "--drop-layers, --refit and --reconstruct-epochs belong to --format structured" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_declaration_must_be_complete():
    with pytest.raises(ValueError, match="give both read_report and run_summary"):
        ExportFormat("half", summary="s", write=_write, describe=str, read_report=lambda out: None)
    with pytest.raises(ValueError, match="unknown options"):
        ExportFormat("odd", summary="s", write=_write, describe=str, options={"colour"})
    with pytest.raises(ValueError, match="already registered"):
        register(ExportFormat("compressed", summary="s", write=_write, describe=str))
