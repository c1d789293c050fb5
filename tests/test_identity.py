"""The run identity names a local model (and data dir, mask file, teacher) by its real path (issue 17
item 8): the same model by another path - relative or absolute, through a symbolic link, with a
trailing slash - is the same run for prune, staged, sweep, recover and the pipeline; an alias and a
hub id stay as they are. In this process, no Ray, no weights loaded."""

from __future__ import annotations

import json
import os

import pytest

from torch import nn

from asft_ray.artifacts import RUN_FILE, check_output_dir, same_run
from asft_ray.config import PruneConfig, model_identity
from asft_ray.errors import AsftError
from asft_ray.pruning.checkpoint import LayerCheckpoint
from asft_ray.recovery.checkpoints import prepare_state
from asft_ray.recovery.config import RecoverConfig
from asft_ray.staged import StagedConfig


@pytest.fixture
def spellings(tmp_path, monkeypatch):
    """One model directory named five ways, from a working directory beside it."""
    real = tmp_path / "models" / "tiny"
    real.mkdir(parents=True)
    (real / "config.json").write_text("{}")
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return real, ["models/tiny", "./models/tiny/", str(real), str(real) + "/", "link", "link/",
                  os.path.join("models", "..", "models", "tiny")]


def test_model_identity_is_the_real_path_for_local_models_only(spellings):
    real, names = spellings
    assert {model_identity(name) for name in names} == {str(real.resolve())}
    assert model_identity("smollm2-135m") == "smollm2-135m"  # an alias, even if a folder had that name
    assert model_identity("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_identity("models/other") == "models/other"  # nothing there: kept as written (and refused later)


def prune(model, **kw):
    return PruneConfig(model=model, method="wanda", sparsity=0.5, out="out", **kw)


def test_prune_and_staged_identities_do_not_depend_on_the_spelling(spellings):
    real, names = spellings
    assert len({json.dumps(prune(n, data_dir=d).identity(), sort_keys=True) for n in names for d in ("data", "./data/")}) == 1
    staged = [StagedConfig.from_dict({"model": n, "method": "magnitude", "out": "o", "stages": [0.3, 0.5],
                                      "gate": {"max_ppl_ratio": 2.0}}).identity() for n in names]
    assert all(s == staged[0] for s in staged) and staged[0]["prune"]["model"] == str(real.resolve())
    other = real.parent / "other"
    other.mkdir()
    assert prune(str(other)).identity() != prune(names[0]).identity()  # another model is another run


def test_recover_identity_does_not_depend_on_the_spelling(spellings, tmp_path):
    _, names = spellings
    (tmp_path / "masks.safetensors").write_bytes(b"")
    ids = [RecoverConfig(model=n, out="rec", teacher=names[-1 - i], mask_file=m, data_dir="data/").identity()
           for i, n in enumerate(names) for m in ("./masks.safetensors", str(tmp_path / "masks.safetensors"))]
    assert all(i == ids[0] for i in ids)


def test_an_output_written_by_another_spelling_is_this_run(spellings, tmp_path):
    """A record written before local paths were resolved (the literal relative path) is still this run."""
    _, names = spellings
    out = tmp_path / "out"
    out.mkdir()
    old_identity = {**prune(names[0]).identity(), "model": names[0]}  # the record as asft-ray wrote it until now
    (out / RUN_FILE).write_text(json.dumps({"inputs": old_identity}))
    for name in names:
        assert check_output_dir(out, prune(name).identity(), overwrite=False) is True
    with pytest.raises(AsftError, match="already holds a different run"):
        check_output_dir(out, prune(names[0], seed=1).identity(), overwrite=False)


def test_a_killed_prune_resumes_under_another_spelling(spellings, tmp_path):
    _, names = spellings
    folder = tmp_path / ".out.partial"
    first = LayerCheckpoint(folder, prune("models/tiny").identity(), resume=False)
    first.save_layer(0, nn.Linear(2, 2), {"layer": 0})
    again = LayerCheckpoint(folder, prune("link/").identity(), resume=True)
    assert again.completed() == [{"layer": 0}]
    other = LayerCheckpoint(folder, prune("link/", seed=3).identity(), resume=True)  # a different run starts afresh
    assert other.completed() == []


def test_recover_resume_accepts_the_same_run_by_another_spelling(spellings, tmp_path):
    _, names = spellings
    folder = tmp_path / ".rec.recover"
    prepare_state(folder, RecoverConfig(model="models/tiny", out="rec").identity(), resume=False)
    assert prepare_state(folder, RecoverConfig(model="link/", out="rec").identity(), resume=True) is None
    with pytest.raises(AsftError, match="different run"):
        prepare_state(folder, RecoverConfig(model="link/", out="rec", seed=2).identity(), resume=True)


def test_same_run_compares_nested_identities():
    assert same_run({"prune": {"model": "smollm2-135m"}}, {"prune": {"model": "smollm2-135m"}})
    assert not same_run({"prune": {"model": "a/b"}}, {"prune": {"model": "a/c"}})
    assert not same_run(None, {"model": "x"})


