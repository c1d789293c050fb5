"""The embedded cluster's processes end with the driver (issue 17 item 11): the watcher of
asft_ray/distributed/reaper.py, on stand-in process trees (no Ray, a few seconds). The real thing -
kill -9 of `asft prune`, no Ray process of the run after 10 s - is in tests/test_fault_suite.py (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from asft_ray.distributed.reaper import launch

# A stand-in for the raylet: it starts a child that ignores SIGTERM (as an agent stuck on a dead GCS
# may), prints the child's pid and sleeps.
TREE = ("import os, signal, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print(1, flush=True); time.sleep(120)'], stdout=subprocess.PIPE)\n"
        "child.stdout.readline()\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n")


def start_tree():
    root = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    child = int(root.stdout.readline())
    return root, psutil.Process(child)


def gone(proc: psutil.Process, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def test_when_the_driver_goes_every_recorded_process_goes_within_seconds():
    root, child = start_tree()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # ours, but not the cluster's
    watcher, pipe = launch([root.pid])
    try:
        time.sleep(0.3)  # (the watcher records what runs before it reads the pipe, so no wait is needed for that)
        assert watcher.poll() is None and root.poll() is None and child.is_running()
        start = time.monotonic()
        os.close(pipe)  # what a driver's exit or kill -9 does to the pipe
        assert gone(child, within=6) and root.wait(timeout=6) is not None
        assert time.monotonic() - start < 6  # SIGTERM, and SIGKILL 2 s later for the one that ignores it
        assert watcher.wait(timeout=5) == 0
        assert bystander.poll() is None  # never a process it did not record
    finally:
        for proc in (bystander, root):
            proc.kill()
            proc.wait()
        if child.is_running():
            child.kill()


def test_after_a_normal_shutdown_the_watcher_leaves_by_itself():
    root, child = start_tree()
    watcher, pipe = launch([root.pid])
    try:
        time.sleep(0.3)
        child.kill()
        root.kill()  # what ray.shutdown() does to the cluster
        root.wait()
        assert watcher.wait(timeout=5) == 0  # nothing left to watch: it exits without waiting for the driver
    finally:
        os.close(pipe)
        if watcher.poll() is None:
            watcher.kill()


def test_a_pid_it_recorded_that_now_belongs_to_another_process_is_not_signalled():
    from asft_ray.distributed import reaper

    me = psutil.Process()
    assert reaper._alive(me.pid, me.create_time()) is not None
    assert reaper._alive(me.pid, me.create_time() - 10) is None  # same pid, other start time: not ours


def test_descendants_come_from_one_parent_map_walked_from_the_live_roots():
    from asft_ray.distributed import reaper

    children = {1: [2, 3], 2: [4], 4: [7], 5: [6]}  # 5 -> 6: someone else's tree
    assert reaper._descendants({1}, children) == {2, 3, 4, 7}
    assert reaper._descendants({2, 5}, children) == {4, 7, 6}
    assert reaper._descendants(set(), children) == set()
    me = os.getpid()  # the real map of this machine: this process is a child of its parent
    assert me in reaper._children_of_every_process()[os.getppid()]
    assert me in reaper._descendants({os.getppid()}, reaper._children_of_every_process())
