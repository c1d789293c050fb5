"""Progress of long loops: a tqdm bar in a terminal, plain lines everywhere else.

Inside a Ray actor or task, and whenever stderr is not a terminal (a log file, a Ray job's log, a
pipe), progress is printed as plain lines - `asft: sparsegpt layers 3/30 (10%), 12.0 s` - at most
one line per `$ASFT_PROGRESS_INTERVAL_S` seconds (default 10) and one final line when the loop is
done. Ray forwards each line of an actor to the driver's terminal once, with the actor's prefix.
(Ray's own tqdm_ray, used before, re-draws every bar each time any actor prints a line, so a
finished bar came back with a growing elapsed time, interleaved with the next stage's.)
"""

from __future__ import annotations

import os
import sys
import time

INTERVAL_ENV = "ASFT_PROGRESS_INTERVAL_S"
DEFAULT_INTERVAL_S = 10.0


def _in_ray_worker() -> bool:
    if "ray" not in sys.modules:  # pure library use never imports Ray
        return False
    import ray

    if not ray.is_initialized():
        return False
    mode = getattr(getattr(ray.get_runtime_context(), "worker", None), "mode", ray.SCRIPT_MODE)
    return mode == ray.WORKER_MODE  # an actor or a task, not the driver


def _interval_s() -> float:
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value >= 0 else DEFAULT_INTERVAL_S


def progress(iterable, desc: str, enabled: bool = True, total: int | None = None):
    if not enabled:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if not _in_ray_worker() and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True)
    return _lines(iterable, desc, total, _interval_s())


def _lines(iterable, desc: str, total: int | None, interval: float):
    """Yield from `iterable`, printing a line per update at most every `interval` seconds, and one when done."""
    start = last = time.monotonic()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= interval and (total is None or done < total):
            _print(desc, done, total, now - start)
            last = now
    _print(desc, done, total, time.monotonic() - start, finished=True)


def _print(desc: str, done: int, total: int | None, seconds: float, finished: bool = False) -> None:
    count = f"{done}/{total} ({100 * done / total:.0f} %)" if total else str(done)
    state = f"done in {seconds:.1f} s" if finished else f"{seconds:.1f} s"
    print(f"asft: {desc} {count}, {state}", file=sys.stderr, flush=True)
