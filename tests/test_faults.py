"""Interrupts and leftovers (issue 17 items 9, 10), in this process: no Ray, well under a second each."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import asft_ray.cli as cli
from asft_ray.artifacts import atomic_output_dir, remove_stale_temp_dirs


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has this id now (until the kernel reuses it)


def test_a_killed_writers_temp_folders_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "model"
    gone = dead_pid()
    stale = [tmp_path / f".model.tmp-{gone}-abc123", tmp_path / f".model.old-{gone}"]
    live = tmp_path / f".model.tmp-{os.getpid()}-xyz"  # a writer that is still running
    foreign = [tmp_path / ".model.tmp-notapid", tmp_path / f".other.tmp-{gone}-q"]  # not ours to judge
    for folder in [*stale, live, *foreign]:
        folder.mkdir()
        (folder / "layer-0.safetensors").write_bytes(b"x" * 10)
    with atomic_output_dir(out) as tmp:
        (tmp / "done").write_text("1")
    assert not any(p.exists() for p in stale)
    assert live.exists() and all(p.exists() for p in foreign)
    assert (out / "done").read_text() == "1"


def test_remove_stale_temp_dirs_leaves_a_live_writer_alone(tmp_path):
    live = tmp_path / f".out.tmp-{os.getpid()}-x"
    live.mkdir()
    assert remove_stale_temp_dirs(tmp_path / "out") == [] and live.exists()


def _handler_that_signals(sig, out):
    """A command handler that starts writing an output and then receives `sig` from outside."""
    def handler(args):
        with atomic_output_dir(out) as tmp:
            (tmp / "half-a-model.safetensors").write_bytes(b"x" * 100)
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the signal arrives here
            raise AssertionError("the signal did not stop the command")
    return handler


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
@pytest.mark.parametrize("command", ["prune", "recover", "export", "staged", "eval"])
def test_sigint_and_sigterm_are_one_line_and_leave_no_temp_folder(tmp_path, capsys, monkeypatch, sig, code, word, command):
    out = tmp_path / "out"
    handler_name = {"prune": "_prune", "recover": "_recover", "export": "_export", "staged": "_staged", "eval": "_eval"}[command]
    monkeypatch.setattr(cli, handler_name, _handler_that_signals(sig, out))
    argv = {"prune": ["prune"], "recover": ["recover"], "eval": ["eval", "--model", "m"], "staged": ["staged", "c.yaml"],
            "export": ["export", "--model", "m", "--format", "compressed", "--out", str(out)]}[command]
    # as in a terminal: a process started in the background by a non-interactive shell inherits an
    # ignored SIGINT (bash does that), and Python then leaves Ctrl-C ignored
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGTERM)
    start = time.perf_counter()
    try:
        code_seen = cli.main(argv)
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    assert code_seen == code
    assert time.perf_counter() - start < 4
    err = capsys.readouterr().err
    assert err.strip() == f"asft: {word}", err
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary folder
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI's handler does not outlive the command


def test_sigterm_in_a_real_process_is_one_line(tmp_path):
    """The subprocess smoke test: SIGTERM while a command waits, no traceback, exit 143."""
    script = ("import sys, time, asft_ray.cli as c\n"
              "c._eval = lambda args: (print('ready', flush=True), time.sleep(30))\n"
              "sys.exit(c.main(['eval', '--model', 'm']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143 and err.strip() == "asft: terminated", err


def test_init_ray_keeps_the_clis_sigterm_handling(monkeypatch):
    """ray.init installs `sys.exit(15)` for SIGTERM (no message, a C++ stack dump on the way out); init_ray puts
    back the handler that was there. Ray itself is replaced by a stand-in that does just that."""
    import ray

    from asft_ray.distributed import runner

    def fake_init(**_):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, cli._raise_terminated)
    try:
        assert runner.init_ray() is True
        assert signal.getsignal(signal.SIGTERM) is cli._raise_terminated
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_inside_ray_get_is_still_terminated(capsys, monkeypatch):
    """ray.get turns the KeyboardInterrupt our SIGTERM handler raises into a plain KeyboardInterrupt (found by the
    fault suite: a SIGTERM during a real prune said 'interrupted', 130); a stand-in for ray.get does just that."""
    def handler(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            raise KeyboardInterrupt() from None  # as ray._raylet's check_status does for an interrupted wait
    monkeypatch.setattr(cli, "_eval", handler)
    assert cli.main(["eval", "--model", "m"]) == 143
    assert capsys.readouterr().err.strip() == "asft: terminated"
    monkeypatch.setattr(cli, "_eval", lambda args: (_ for _ in ()).throw(KeyboardInterrupt()))  # a later Ctrl-C
    assert cli.main(["eval", "--model", "m"]) == 130
