"""Scoring actors for the tests that compare results over worker counts.

The actors are pure (every call's result depends only on its arguments, see
asft_ray/distributed/sharded.py), so one module's tests can share them: a run on
`pool.take(n)` is a run with n workers. Starting an actor costs a process and a torch
import; a module starts each actor once instead of once per count per test.
"""

from __future__ import annotations

import torch

POOL_CPUS = 0.5  # four fit on the tests' 2-CPU cluster; each runs one torch thread, as a 1-CPU worker does


class ScoringPool:
    """Scoring actors started when first needed and kept until `stop`."""

    def __init__(self):
        self.workers: list = []

    def take(self, n: int) -> list:
        """The first n actors (starting the missing ones)."""
        from asft_ray.distributed.sharded import WorkerResources, start_workers

        if len(self.workers) < n:
            self.workers += start_workers(n - len(self.workers), WorkerResources(cpus=POOL_CPUS))
        return self.workers[:n]

    def stop(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []


def assert_same_tensors(a: dict, b: dict) -> None:
    """The same names and, for each, the same bits."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def same_with_worker_counts(pool: ScoringPool, run, counts=(1, 2)) -> dict:
    """run(workers) on the first n actors of `pool` for each n in `counts`; every run's tensors
    must equal the first's bit for bit. Returns {n: that run's tensors}."""
    results = {n: run(pool.take(n)) for n in counts}
    first = results[counts[0]]
    for n in counts[1:]:
        assert_same_tensors(first, results[n])
    return results
