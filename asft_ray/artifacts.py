"""Artifacts are written atomically: into a temporary sibling, then renamed into place.

A crash leaves either the old output or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from asft_ray.errors import AsftError

RUN_FILE = "asft_run.json"  # the run record of `asft prune` and `asft recover`
# The record every kind of asft-ray output folder carries (prune/recover, staged run, exports).
# A folder holding one of them was written by asft-ray: only such a folder may be replaced.
RECORD_FILES = (RUN_FILE, "state.json", "compressed.json", "structured.json", "semistructured.json", "int8.json")


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


@contextmanager
def atomic_output_dir(out: Path):
    """Yield a fresh temporary folder beside `out`; on success it replaces `out` in one rename.

    The folder is `.OUT.tmp-PID-*` (PID: the writing process); what a killed writer left
    beside `out` is removed first (remove_stale_temp_dirs)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def remove_stale_temp_dirs(out: Path) -> list[Path]:
    """Remove the `.OUT.tmp-PID-*` and `.OUT.old-PID` folders beside `out` whose writing process
    is no longer running on this host (a run killed with -9, or an actor killed on an interrupt).
    A folder of a live process, or without a PID in its name, is left alone. Returns what went."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp-(\d+)-.*|old-(\d+))")
    for path in out.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not _process_alive(int(match.group(1) or match.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or unreadable (the one reader of state files)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_run(out: Path) -> dict | None:
    return read_json(Path(out) / RUN_FILE)


def check_out_location(out: Path) -> None:
    """Refuse, before any work, an `--out` that must never be written or replaced.

    Not the working directory, one of its parents or a filesystem root (replacing it would
    take everything in it along); not below a file; and the folder it goes in must accept a
    new entry (checked by making and removing one: permission bits say nothing for root or on
    a read-only mount).
    """
    out = Path(out).expanduser()
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved.parent == resolved:
        raise AsftError(f"--out {out} is a filesystem root; name a new folder for the output")
    if resolved == cwd or resolved in cwd.parents:
        where = "the current directory" if resolved == cwd else "a parent of the current directory"
        raise AsftError(f"--out {out} is {where}; name a new folder for the output")
    if resolved.exists() and not resolved.is_dir():
        raise AsftError(f"--out {out} exists and is not a directory")
    anchor = next(p for p in (resolved.parent, *resolved.parent.parents) if p.exists())
    if not anchor.is_dir():
        raise AsftError(f"--out {out} cannot be created: {anchor} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".asft-write-check-", dir=anchor))
    except OSError as err:
        raise AsftError(f"--out {out} cannot be created: {anchor} is not writable ({err.strerror})") from None


def written_by_asft(folder: Path) -> bool:
    """True when `folder` holds the record asft-ray writes into each of its outputs."""
    return any((Path(folder) / name).is_file() for name in RECORD_FILES)


def refuse_foreign_folder(out: Path) -> None:
    """An existing, non-empty `out` that asft-ray did not write is never replaced, not even with --overwrite."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not written_by_asft(out):
        raise AsftError(f"--out {out} holds files that asft-ray did not write (no asft-ray record such as {RUN_FILE}); "
                        "asft-ray never replaces them: choose a new folder or remove them yourself")


_MODEL_KEYS = ("model", "teacher")
_PATH_KEYS = ("data_dir", "mask_file", "deepspeed")


def canonical_identity(identity):
    """A run identity with every model and local path in it as config.model_identity / path_identity
    write them now (also inside nested identities such as a staged run's `prune`). Records written
    before local paths were resolved then compare equal to today's identity of the same run."""
    from asft_ray.config import model_identity, path_identity

    if not isinstance(identity, dict):
        return identity
    canonical = {}
    for key, value in identity.items():
        if isinstance(value, str) and key in _MODEL_KEYS:
            value = model_identity(value)
        elif isinstance(value, str) and key in _PATH_KEYS:
            value = path_identity(value)
        elif isinstance(value, dict):
            value = canonical_identity(value)
        canonical[key] = value
    return canonical


def same_run(saved, identity: dict) -> bool:
    """The one comparison of a saved run identity (a run record's `inputs`, a checkpoint's state) with
    this run's: equal, also when `saved` names the same model or files by another path."""
    return saved == identity or canonical_identity(saved) == canonical_identity(identity)


def check_output_dir(out: Path, identity: dict, overwrite: bool) -> bool:
    """Decide what to do with an existing `--out`. Returns True when it already holds this exact run.

    Refuses (AsftError) an unusable location (check_out_location), a folder asft-ray did not
    write (even with `overwrite`), and a different run unless `overwrite`.
    """
    out = Path(out)
    check_out_location(out)
    if not out.exists() or not any(out.iterdir()):
        return False
    refuse_foreign_folder(out)
    run = read_run(out)
    if run is not None and same_run(run.get("inputs"), identity) and not overwrite:
        return True
    if overwrite:
        return False
    raise AsftError(f"--out {out} already holds a different run; pass --overwrite to replace it")
