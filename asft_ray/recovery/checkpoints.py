"""The run's state folder `.{out}.recover/` beside `--out`, and DeepSpeed checkpoints inside it.

    state.json            the run's identity (a resume must match it)
    ckpt/step-000010/     one DeepSpeed checkpoint (every worker writes its own shards)
    ckpt/latest.json      the last *complete* checkpoint: written atomically by rank 0 only after
                          every worker finished saving, so a kill mid-save resumes from the one before
    summary.json          what the workers report back to the driver (written by rank 0)
    ray/                  Ray Train's storage path

The folder must be on a filesystem every worker sees (one machine, or a shared mount).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from asft_ray.artifacts import write_json_atomic
from asft_ray.errors import AsftError

STATE = "state.json"
LATEST = "latest.json"
SUMMARY = "summary.json"


def state_dir(out: str) -> Path:
    out = Path(out).resolve()
    return out.with_name(f".{out.name}.recover")


def prepare_state(folder: Path, identity: dict, resume: bool) -> dict | None:
    """Keep the folder for `resume` (same identity, else an error); otherwise start it afresh.
    Returns the latest complete checkpoint's record, or None."""
    folder = Path(folder)
    if resume and (folder / STATE).is_file():
        saved = json.loads((folder / STATE).read_text())
        if saved.get("identity") != identity:
            raise AsftError(f"--resume: {folder} holds a different run's state; drop --resume to start over")
        (folder / SUMMARY).unlink(missing_ok=True)
        return latest_checkpoint(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_json_atomic(folder / STATE, {"identity": identity})
    return None


def latest_checkpoint(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / "ckpt" / LATEST).read_text())
    except (OSError, ValueError):
        return None


def save_checkpoint(engine, folder: Path, step: int, client_state: dict, rank: int) -> None:
    """Collective: every worker saves its shards; then rank 0 moves `latest.json` and drops older tags."""
    import torch.distributed as dist

    root = Path(folder) / "ckpt"
    tag = f"step-{step:06d}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    dist.barrier()
    if rank == 0:
        write_json_atomic(root / LATEST, {"tag": tag, "step": step})
        for old in root.glob("step-*"):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(engine, folder: Path) -> dict:
    """Collective: restore weights, fp32 master, optimizer and LR scheduler; return the client state."""
    latest = latest_checkpoint(folder)
    path, client_state = engine.load_checkpoint(str(Path(folder) / "ckpt"), tag=latest["tag"])
    if path is None:
        raise AsftError(f"could not load checkpoint {latest['tag']} from {folder}")
    return client_state
