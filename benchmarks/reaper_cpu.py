"""CPU the embedded cluster's watcher (asft_ray/distributed/reaper.py) spends while it watches.

A stand-in cluster (one root process with 11 children, like a GCS, a raylet, agents and workers) is
watched for `--seconds`; the watcher's CPU seconds per second of watching are recorded. `--watcher`
measures another version of the file, e.g. an older commit's:

    git show 36c0389:asft_ray/distributed/reaper.py > /tmp/reaper_old.py
    python benchmarks/reaper_cpu.py --watcher /tmp/reaper_old.py --watcher asft_ray/distributed/reaper.py

One JSON line per watcher in benchmarks/results/reaper_cpu.jsonl.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

import psutil
from results_io import ROOT, append_row

TREE = ("import subprocess, sys, time\n"
        "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']) for _ in range(11)]\n"
        "time.sleep(600)\n")


def watcher_cpu(path: str, root_pid: int, seconds: float) -> float:
    """The watcher of the reaper.py at `path`, started by that file's own `launch` (so an older
    version runs as it did), watching `root_pid`'s tree: its CPU seconds per second."""
    spec = importlib.util.spec_from_file_location(f"reaper_{abs(hash(path))}", path)
    reaper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reaper)
    proc, write_end = reaper.launch([root_pid])
    try:
        time.sleep(3)  # started, first look done
        watcher = psutil.Process(proc.pid)
        before = sum(watcher.cpu_times()[:2])
        time.sleep(seconds)
        return (sum(watcher.cpu_times()[:2]) - before) / seconds
    finally:
        proc.kill()
        proc.wait()
        os.close(write_end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--watcher", action="append", help="a reaper.py to measure (repeatable; default: this one)")
    parser.add_argument("--seconds", type=float, default=30)
    opts = parser.parse_args()
    root = subprocess.Popen([sys.executable, "-c", TREE])
    try:
        time.sleep(3)
        for path in opts.watcher or [str(ROOT / "asft_ray" / "distributed" / "reaper.py")]:
            append_row("reaper_cpu", {"watcher": path, "seconds": opts.seconds,
                                      "processes_on_machine": len(psutil.pids()),
                                      "cpu_per_second": watcher_cpu(path, root.pid, opts.seconds)})
    finally:
        for child in psutil.Process(root.pid).children():
            child.kill()
        root.kill()
        root.wait()


if __name__ == "__main__":
    main()
