"""`recover --resume` loads DeepSpeed checkpoints with pickle: what it checks before loading anything
(issue 17 item 12). No Ray, no DeepSpeed: a stand-in engine writes the checkpoint files, the real
save_checkpoint writes latest.json; each test then spoils one thing and expects one refusal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from asft_ray.errors import AsftError
from asft_ray.recovery.checkpoints import (
    LATEST,
    identity_digest,
    load_checkpoint,
    prepare_state,
    save_checkpoint,
    verify_resume,
)

IDENTITY = {"model": "/models/pruned", "out": "/runs/rec", "max_steps": 4}


class FakeEngine:
    """Writes and reads files where DeepSpeed would (the content stands in for pickled tensors)."""

    def __init__(self):
        self.loaded = []

    def save_checkpoint(self, root, tag, client_state, save_latest):
        folder = Path(root) / tag
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"weights" * 100)
        (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(json.dumps(client_state).encode())

    def load_checkpoint(self, root, tag):
        self.loaded.append(tag)
        return root, json.loads((Path(root) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes())


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A state folder as a run that was stopped after step 2 leaves it (checkpoints at steps 1 and 2)."""
    import torch.distributed

    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    folder = tmp_path / ".rec.recover"
    assert prepare_state(folder, IDENTITY, resume=False) is None
    for step in (1, 2):
        save_checkpoint(FakeEngine(), folder, step, {"step": step}, rank=0, identity=identity_digest(IDENTITY))
    return folder


def refused(folder, identity=IDENTITY) -> str:
    with pytest.raises(AsftError) as err:
        prepare_state(folder, identity, resume=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--resume:"), message
    return message


def test_the_runs_own_checkpoint_is_accepted_and_loaded(state):
    latest = prepare_state(state, IDENTITY, resume=True)
    assert latest["tag"] == "step-000002" and sorted(latest["files"]) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert not (state / "ckpt" / "step-000001").exists()  # older tags dropped
    engine = FakeEngine()
    assert load_checkpoint(engine, state, latest) == {"step": 2} and engine.loaded == ["step-000002"]


def test_no_checkpoint_yet_starts_at_step_zero(tmp_path):
    folder = tmp_path / ".rec.recover"
    prepare_state(folder, IDENTITY, resume=False)
    assert prepare_state(folder, IDENTITY, resume=True) is None


def test_another_runs_state_is_refused(state):
    assert "holds a different run's state" in refused(state, {**IDENTITY, "max_steps": 5})


def test_a_checkpoint_of_another_run_copied_in_is_refused(state):
    latest = json.loads((state / "ckpt" / LATEST).read_text())
    (state / "ckpt" / LATEST).write_text(json.dumps({**latest, "identity": identity_digest({**IDENTITY, "seed": 1})}))
    assert "belongs to a different run" in refused(state)


@pytest.mark.parametrize("spoil,message", [
    (lambda f: (f / "mp_rank_00_model_states.pt").write_bytes(b"weights" * 99 + b"weightz"), "changed since it was written"),
    (lambda f: (f / "mp_rank_00_model_states.pt").unlink(), "missing mp_rank_00_model_states.pt"),
    (lambda f: (f / "extra_rank_1_optim_states.pt").write_bytes(b"x"), "not listed: extra_rank_1_optim_states.pt"),
])
def test_checkpoint_files_that_are_not_the_ones_written_are_refused(state, spoil, message):
    spoil(state / "ckpt" / "step-000002")
    assert message in refused(state)


@pytest.mark.parametrize("tag", ["../../elsewhere", "step-2", "step-000003"])
def test_a_tag_that_is_not_this_runs_step_is_refused(state, tag):
    latest = json.loads((state / "ckpt" / LATEST).read_text())
    (state / "ckpt" / LATEST).write_text(json.dumps({**latest, "tag": tag}))
    assert "not one asft-ray writes" in refused(state)


def test_a_checkpoint_record_without_identity_or_manifest_is_refused(state):
    (state / "ckpt" / LATEST).write_text(json.dumps({"tag": "step-000002", "step": 2}))  # the format before the manifest
    assert "does not name this run's checkpoint" in refused(state)


@pytest.mark.parametrize("name", ["state.json", "ckpt/latest.json"])
def test_an_unreadable_record_is_one_line(state, name):
    (state / name).write_text("{not json")
    assert "cannot read" in refused(state)


@pytest.mark.parametrize("target", [".", "ckpt", "ckpt/step-000002", "ckpt/step-000002/mp_rank_00_model_states.pt"])
def test_a_world_writable_state_is_refused(state, target):
    path = state / target
    path.chmod(path.stat().st_mode | 0o002)
    assert "is writable by every user" in refused(state)


def test_a_symlinked_checkpoint_file_is_refused(state, tmp_path):
    real = state / "ckpt" / "step-000002" / "mp_rank_00_model_states.pt"
    moved = tmp_path / "elsewhere.pt"
    real.rename(moved)
    real.symlink_to(moved)
    assert "is a symbolic link" in refused(state)


def test_a_file_of_another_user_is_refused(state, monkeypatch):
    monkeypatch.setattr(os, "getuid", lambda: os.stat(state).st_uid + 1)  # as if the folder were someone else's
    assert "belongs to another user" in refused(state)


def test_the_workers_load_nothing_when_the_record_changed_after_verification(state):
    latest = verify_resume(state, IDENTITY)
    (state / "ckpt" / LATEST).write_text(json.dumps({**latest, "step": 2, "files": {}}))
    engine = FakeEngine()
    with pytest.raises(AsftError, match="changed after it was verified"):
        load_checkpoint(engine, state, latest)
    assert engine.loaded == []
