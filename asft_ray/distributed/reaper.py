"""Fate-sharing for the embedded Ray cluster: when the driver dies, its cluster's processes go too.

`ray.init()` starts the embedded cluster's GCS, raylet, monitor and log monitor with
PR_SET_PDEATHSIG, so they die with a driver killed by SIGKILL. The raylet's own children do not:
the DashboardAgent and RuntimeEnvAgent notice that the raylet is gone, then try to report it to
the GCS, which is dead too, and give up only after Ray's fixed 60 s RPC timeout (each), so they
outlived a `kill -9` of the driver by one to two minutes. Ray 2.60 has no setting that avoids
this: `include_dashboard=False` (already used) still starts the DashboardAgent, and the raylet
needs its RuntimeEnvAgent.

So `start_reaper` launches this module as a small watcher process in its own session (a Ctrl-C
in the terminal does not reach it), reading a pipe whose only writer is the driver. It records
the cluster processes Ray reports for this driver (`all_processes`: GCS, raylet, dashboard,
monitors) and their descendants (agents and workers), each by pid and start time: every half
second, and twice as long after each look that found no new process, up to every 4 s (one pass
over /proc per look: a parent map of every process, walked from the live recorded ones; asking
each process for its children would read all of /proc once per process, 4 % of a core against 1 %
at one look per half second; with the back-off, under 1 s of CPU in a 140 s evaluation of a
1.57 B model, 2.1 s before). Worker processes started after the last look need no record: they
exit when the raylet does. When the pipe reaches end-of-file - the driver exited or was killed, however -
it sends SIGTERM to every recorded process still running, then SIGKILL after 2 s. It never signals a
process it did not record (a pid reused by another process has another start time), and it
exits by itself once every recorded process is gone (after a normal `ray.shutdown()`).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import psutil

POLL_S = 0.5  # the first looks for new processes; doubled after each look that found none
MAX_POLL_S = 4.0
GRACE_S = 2.0

_writer: int | None = None  # the driver's end of the pipe: open while the driver lives


def start_reaper() -> int | None:
    """In the driver, right after ray.init started an embedded cluster. Returns the watcher's pid."""
    global _writer
    try:
        import ray

        node = ray._private.worker._global_node
        roots = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
    except Exception:  # noqa: BLE001 - Ray internals differ across versions: no watcher, as before
        return None
    if not roots:
        return None
    proc, write_end = launch(roots)
    if _writer is not None:
        os.close(_writer)  # a previous cluster's watcher: that cluster is gone (ray.shutdown), let it finish
    _writer = write_end
    return proc.pid


def launch(roots: list[int]) -> tuple[subprocess.Popen, int]:
    """Start the watcher for the processes `roots` (and their descendants); returns it and the pipe's
    write end, which only this process holds (os.pipe descriptors are not inherited by later children):
    closing it, or exiting, lets the watcher act."""
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-I", __file__, json.dumps(roots)], stdin=read_end,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return proc, write_end


def _key(proc: psutil.Process):
    return proc.pid, proc.create_time()


def _alive(pid: int, created: float) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
        if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.Error:
        pass
    return None


def _children_of_every_process() -> dict[int, list[int]]:
    """{parent pid: its children's pids} of every process now: one pass over /proc."""
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter():
        try:
            children.setdefault(proc.ppid(), []).append(proc.pid)
        except psutil.Error:  # gone since the listing
            pass
    return children


def _descendants(pids, children: dict[int, list[int]]) -> set[int]:
    found, todo = set(), list(pids)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _record(known: dict[int, float], pids) -> None:
    for pid in pids:
        try:
            known.update([_key(psutil.Process(pid))])
        except psutil.Error:
            pass


def watch(roots: list[int], pipe_fd: int = 0) -> None:
    known: dict[int, float] = {}
    _record(known, roots)
    wait = POLL_S
    while known:
        live = {pid for pid, created in known.items() if _alive(pid, created) is not None}
        before = len(known)
        _record(known, _descendants(live, _children_of_every_process()) - live)  # new ones (or a pid reused)
        wait = POLL_S if len(known) > before else min(MAX_POLL_S, 2 * wait)
        ready, _, _ = select.select([pipe_fd], [], [], wait)  # returns at once when the driver goes
        if ready and not os.read(pipe_fd, 1 << 12):  # end of file: the driver is gone
            break
        if not any(_alive(pid, created) for pid, created in known.items()):
            return  # a normal shutdown took everything down
    left = [p for p in (_alive(pid, created) for pid, created in known.items()) if p is not None and p.pid != os.getpid()]
    for proc in left:
        _signal(proc, signal.SIGTERM)
    _, still = psutil.wait_procs(left, timeout=GRACE_S)
    for proc in still:
        _signal(proc, signal.SIGKILL)


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(json.loads(sys.argv[1]))
