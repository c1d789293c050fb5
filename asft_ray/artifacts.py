"""Artifacts are written atomically: into a temporary sibling, then renamed into place.

A crash leaves either the old output or the new one, never half of either.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from asft_ray.errors import AsftError

RUN_FILE = "asft_run.json"


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


@contextmanager
def atomic_output_dir(out: Path):
    """Yield a fresh temporary folder beside `out`; on success it replaces `out` in one rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
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


def read_run(out: Path) -> dict | None:
    try:
        return json.loads((Path(out) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def check_output_dir(out: Path, identity: dict, overwrite: bool) -> bool:
    """Decide what to do with an existing `--out`. Returns True when it already holds this exact run.

    Refuses (AsftError) when it holds anything else, unless `overwrite`.
    """
    out = Path(out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise AsftError(f"--out {out} exists and is not a directory")
    if not any(out.iterdir()):
        return False
    run = read_run(out)
    if run is not None and run.get("inputs") == identity and not overwrite:
        return True
    if overwrite:
        return False
    what = "a different run" if run is not None else "other files"
    raise AsftError(f"--out {out} already holds {what}; pass --overwrite to replace it")
