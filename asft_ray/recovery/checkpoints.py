"""The run's state folder `.{out}.recover/` beside `--out`, and DeepSpeed checkpoints inside it.

    state.json            the run's identity (a resume must match it)
    ckpt/step-000010/     one DeepSpeed checkpoint (every worker writes its own shards)
    ckpt/latest.json      the last *complete* checkpoint: written atomically by rank 0 only after
                          every worker finished saving, so a kill mid-save resumes from the one before.
                          It names the run (a digest of its identity) and every file of the checkpoint
                          with its size and SHA-256.
    summary.json          what the workers report back to the driver (written by rank 0)
    ray/                  Ray Train's storage path

The folder must be on a filesystem every worker sees (one machine, or a shared mount).

Trust boundary: DeepSpeed reads its checkpoint files with pickle (`torch.load(weights_only=False)`),
and unpickling a file can run any code. `--resume` therefore loads only a checkpoint this run wrote:
before Ray starts, `verify_resume` checks that the folder and every file in it belong to this user and
are not writable by everyone, that state.json and latest.json name this run's identity, and that the
checkpoint's files are exactly the ones listed in latest.json, byte for byte (SHA-256). Anything else
is refused with one line and nothing is loaded. This guards against resuming the wrong run and against
files swapped in or corrupted since; it cannot guard against someone who can write as you.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

from asft_ray.artifacts import same_run, write_json_atomic
from asft_ray.errors import AsftError

STATE = "state.json"
LATEST = "latest.json"
SUMMARY = "summary.json"
TAG = re.compile(r"step-(\d{6})")


def state_dir(out: str) -> Path:
    out = Path(out).resolve()
    return out.with_name(f".{out.name}.recover")


def identity_digest(identity: dict) -> str:
    """The run's identity in 64 hex digits (what latest.json records)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def prepare_state(folder: Path, identity: dict, resume: bool, verified: dict | None = None) -> dict | None:
    """Keep the folder for `resume` (this run's, verified: see verify_resume; else an error); otherwise
    start it afresh. Returns the latest complete checkpoint's record, or None (start at step 0).
    `verified`: what verify_resume returned for this folder earlier in this process (not repeated)."""
    folder = Path(folder)
    if resume and (folder / STATE).is_file():
        latest = verified if verified is not None else verify_resume(folder, identity)
        (folder / SUMMARY).unlink(missing_ok=True)
        return latest
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_json_atomic(folder / STATE, {"identity": identity})
    return None


def verify_resume(folder: Path, identity: dict) -> dict | None:
    """Everything `--resume` would load, checked before anything is loaded (module docstring).
    Returns latest.json's record (None: no checkpoint yet); refuses with one AsftError line."""
    folder = Path(folder)
    _check_owned(folder, folder)
    saved = _read_json(folder, folder / STATE, "its run record")
    if not isinstance(saved, dict) or not same_run(saved.get("identity"), identity):
        raise AsftError(f"--resume: {folder} holds a different run's state; drop --resume to start over")
    root = folder / "ckpt"
    if not (root / LATEST).exists():
        return None
    _check_owned(folder, root)
    latest = _read_json(folder, root / LATEST, "its checkpoint record")
    if not isinstance(latest, dict) or not {"tag", "step", "identity", "files"} <= set(latest):
        raise AsftError(f"--resume: {root / LATEST} does not name this run's checkpoint (written by an older "
                        "asft-ray, or not by asft-ray); drop --resume to start over")
    match = TAG.fullmatch(str(latest["tag"]))
    if not match or int(match.group(1)) != latest["step"]:
        raise AsftError(f"--resume: {root / LATEST} names checkpoint {latest['tag']!r}, not one asft-ray writes "
                        "(step-NNNNNN); drop --resume to start over")
    if latest["identity"] != identity_digest(identity):
        raise AsftError(f"--resume: the checkpoint in {root} belongs to a different run; drop --resume to start over")
    found = checkpoint_files(folder, root / latest["tag"])
    if found != latest["files"]:
        listed, present = set(latest["files"]), set(found)
        what = (f"missing {sorted(listed - present)[0]}" if listed - present else
                f"not listed: {sorted(present - listed)[0]}" if present - listed else
                f"changed since it was written: {next(n for n in sorted(found) if found[n] != latest['files'][n])}")
        raise AsftError(f"--resume: checkpoint {root / latest['tag']} is not the one this run wrote ({what}); "
                        "it is not loaded: drop --resume to start over")
    return latest


def checkpoint_files(folder: Path, tag_dir: Path) -> dict[str, list]:
    """{path inside the checkpoint: [bytes, SHA-256]} of every file under `tag_dir` (ownership checked)."""
    if not tag_dir.is_dir():
        return {}
    _check_owned(folder, tag_dir)
    files = {}
    for path in sorted(tag_dir.rglob("*")):
        _check_owned(folder, path)
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
            files[path.relative_to(tag_dir).as_posix()] = [path.stat().st_size, digest.hexdigest()]
    return files


def _check_owned(folder: Path, path: Path) -> None:
    info = path.lstat()
    problem = ("is a symbolic link" if stat.S_ISLNK(info.st_mode) else
               f"belongs to another user (uid {info.st_uid})" if info.st_uid != os.getuid() else
               "is writable by every user" if info.st_mode & stat.S_IWOTH else None)
    if problem:
        raise AsftError(f"--resume: {path} {problem}; a checkpoint is loaded with pickle, so asft-ray resumes only "
                        f"from a state folder you wrote ({folder}); drop --resume to start over")


def _read_json(folder: Path, path: Path, what: str):
    _check_owned(folder, path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise AsftError(f"--resume: cannot read {what} {path}; drop --resume to start over") from None


def latest_checkpoint(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / "ckpt" / LATEST).read_text())
    except (OSError, ValueError):
        return None


def save_checkpoint(engine, folder: Path, step: int, client_state: dict, rank: int, identity: str) -> None:
    """Collective: every worker saves its shards; then rank 0 writes `latest.json` (naming the run by its
    identity digest and every file with its size and SHA-256) and drops older tags."""
    import torch.distributed as dist

    root = Path(folder) / "ckpt"
    tag = f"step-{step:06d}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if rank == 0:
        files = checkpoint_files(Path(folder), root / tag)
        write_json_atomic(root / LATEST, {"tag": tag, "step": step, "identity": identity, "files": files})
        for old in root.glob("step-*"):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(engine, folder: Path, verified: dict) -> dict:
    """Collective: restore weights, fp32 master, optimizer and LR scheduler from the checkpoint the driver
    verified (verify_resume) before the workers started; return the client state."""
    if latest_checkpoint(folder) != verified:
        raise AsftError(f"--resume: {Path(folder) / 'ckpt' / LATEST} changed after it was verified; nothing was loaded")
    path, client_state = engine.load_checkpoint(str(Path(folder) / "ckpt"), tag=verified["tag"])
    if path is None:
        raise AsftError(f"could not load checkpoint {verified['tag']} from {folder}")
    return client_state
