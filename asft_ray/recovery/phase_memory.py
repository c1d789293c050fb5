"""Where in a recovery worker's life its memory peaks: the largest resident set seen in each phase
(load, train, eval, checkpoint, export), sampled from /proc/self/statm by a daemon thread.

The process's lifetime high-water mark (ru_maxrss) says how much, not when; a training step's
transients (ZeRO-3 gathers each layer's whole parameters, and the whole gradient of the one it
just ran backward through) come and go between two reads at step ends. Sampling every 10 ms sees
them; a sampling thread costs a wake-up per interval (torch releases the GIL in its kernels).
"""

from __future__ import annotations

import os
import threading

_PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_now_mib() -> float:
    """This process's resident set, MiB (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_MIB


class PhasePeaks:
    """`enter(name)` marks where the process is; `stop()` returns {phase: largest RSS MiB seen in it}.

    A phase may be part of another: a sample in "train/backward" counts for "train" as well."""

    def __init__(self, phase: str = "start", interval_s: float = 0.01):
        self.interval_s, self.peaks = interval_s, {}
        self._set(phase)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="asft-phase-memory", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        rss = rss_now_mib()
        with self._lock:
            for name in self._names:
                self.peaks[name] = max(self.peaks.get(name, 0.0), rss)

    def _set(self, phase: str) -> None:
        parts = phase.split("/")
        self.phase, self._names = phase, ["/".join(parts[: i + 1]) for i in range(len(parts))]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def enter(self, phase: str) -> None:
        self._sample()  # what the phase that ends reached
        with self._lock:
            self._set(phase)
        self._sample()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return dict(self.peaks)
