"""What a run cost: peak resident memory while it trains, and whether it had the machine to itself.

Wall ratios are only comparable between runs that had the machine to themselves: `load_average` records the 1-minute
load before and after training beside the run's own thread count (`records.ran_alone` reads it).
"""

from __future__ import annotations

import os
import threading

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
