"""What a run cost: peak resident memory while it trains, and whether it had the machine to itself.

Wall ratios are only comparable between runs that had the machine to themselves: `load_average` records the 1-minute
load before and after training beside the run's own thread count (`records.ran_alone` reads it), and `OtherCPU`
measures how many cores the machine's other processes used while a run trained (the load average cannot tell the run's
own threads from another process's).
"""

from __future__ import annotations

import os
import threading
import time

import torch


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 10 ms."""

    def __enter__(self):
        import psutil

        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def load_average(before: float) -> dict:
    """A run's `load_average` record: the 1-minute load `before` training (`os.getloadavg()[0]`) and now."""
    return {"before": before, "after": os.getloadavg()[0], "threads": torch.get_num_threads()}


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine have spent running since boot (`/proc/stat`'s first line, idle and
    iowait left out); None where there is no `/proc/stat`."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal (guest time is inside user and nice already)
    ticks = [int(value) for value in fields[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process (all its threads) and of its children it has waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class OtherCPU:
    """
    The cores the machine's other processes kept busy while the block ran: the machine's busy CPU time less this
    process's own (children included), over the block's wall time. `cores` is None where `/proc/stat` is missing.
    """

    def __enter__(self):
        self._busy, self._own, self._started = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        self.cores = None
        return self

    def __exit__(self, *exc):
        busy, own, wall = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter() - self._started
        if busy is not None and self._busy is not None and wall > 0:
            # Clock ticks round both counts: a few hundredths of a core either way is noise.
            self.cores = max(0.0, (busy - self._busy) - (own - self._own)) / wall
