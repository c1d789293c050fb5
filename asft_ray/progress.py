"""Progress bars that also render properly from inside a Ray actor."""

from __future__ import annotations

import sys


def _in_ray_worker() -> bool:
    if "ray" not in sys.modules:  # pure library use never imports Ray
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def progress(iterable, desc: str, enabled: bool = True, total: int | None = None):
    if not enabled:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if _in_ray_worker():
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(iterable, desc=desc, total=total)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True)
