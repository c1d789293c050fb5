"""Progress output (issue 17 item 14): a bar only in a terminal; inside Ray actors and tasks, and when
stderr is not a terminal, plain lines that are printed once each, throttled, with one final line.
In this process, no Ray: the clock and the Ray check are replaced."""

from __future__ import annotations

import io
import itertools
import sys

from asft_ray import progress as progress_module
from asft_ray.progress import progress


class Clock:
    """time.monotonic that advances `step` seconds per call."""

    def __init__(self, step):
        self.now, self.step = 0.0, step

    def __call__(self):
        self.now += self.step
        return self.now


def log_file(monkeypatch):
    """stderr as a log file or a pipe looks (set in the test itself: pytest restores its own stderr after setup)."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def lines(stream):
    return stream.getvalue().splitlines()


def test_without_a_terminal_each_update_is_one_plain_line_and_the_end_one_more(monkeypatch):
    not_a_terminal = log_file(monkeypatch)
    monkeypatch.setattr(progress_module.time, "monotonic", Clock(step=12.0))  # each item takes longer than the interval
    assert list(progress(range(3), "sparsegpt layers")) == [0, 1, 2]
    out = lines(not_a_terminal)
    assert out[:2] == ["asft: sparsegpt layers 1/3 (33 %), 12.0 s", "asft: sparsegpt layers 2/3 (67 %), 24.0 s"]
    assert len(out) == 3 and out[2].startswith("asft: sparsegpt layers 3/3 (100 %), done in ")
    assert "\r" not in not_a_terminal.getvalue() and "\x1b" not in not_a_terminal.getvalue()


def test_fast_loops_are_throttled_to_one_line_per_interval(monkeypatch):
    not_a_terminal = log_file(monkeypatch)
    monkeypatch.setattr(progress_module.time, "monotonic", Clock(step=1.0))
    monkeypatch.setenv("ASFT_PROGRESS_INTERVAL_S", "5")
    list(progress(range(100), "ppl windows"))
    out = lines(not_a_terminal)
    assert 15 <= len(out) <= 25 and out[-1].startswith("asft: ppl windows 100/100 (100 %), done")
    assert len(set(out)) == len(out)  # nothing is printed twice


def test_a_loop_that_stops_early_prints_no_done_line(monkeypatch):
    not_a_terminal = log_file(monkeypatch)
    monkeypatch.setattr(progress_module.time, "monotonic", Clock(step=0.0))
    for i in progress(range(10), "layers"):
        if i == 3:
            break
    assert lines(not_a_terminal) == []


def test_an_unsized_iterable_counts_without_a_total(monkeypatch):
    not_a_terminal = log_file(monkeypatch)
    list(progress(itertools.islice(itertools.count(), 4), "batches"))
    assert lines(not_a_terminal)[-1].startswith("asft: batches 4, done in ")


def test_in_a_ray_actor_lines_even_when_the_driver_has_a_terminal(monkeypatch):
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress_module, "_in_ray_worker", lambda: True)
    assert list(progress(range(2), "wanda layers")) == [0, 1]
    assert lines(terminal) == [lines(terminal)[0]] and "2/2 (100 %), done" in lines(terminal)[0]


def test_the_driver_in_a_terminal_gets_a_bar(monkeypatch):
    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress_module, "_in_ray_worker", lambda: False)
    bar = progress(range(2), "ppl windows")
    assert type(bar).__module__.startswith("tqdm") and list(bar) == [0, 1]
    bar.close()


def test_disabled_is_the_iterable_itself():
    data = [1, 2]
    assert progress(data, "x", enabled=False) is data
