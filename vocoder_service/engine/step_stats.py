"""Step statistics of the vocoder engine: cumulative counters plus small recent-window histograms.

    rec = Recent(window_s=10.0, max_items=4096)
    rec.add(0.012)                      # one value (e.g. a step's wall seconds)
    rec.summary(scale=1000)             # {"n": 1, "sum": 12.0, "window_n": 1, "p50": 12.0, "p99": 12.0, "max": 12.0}

``n`` and ``sum`` count every value ever added (so two summaries taken a while apart give exact
means over the time between them: Δsum / Δn); ``p50`` / ``p99`` / ``max`` are over the values added
in the last ``window_s`` seconds (at most ``max_items`` of them), so a periodic log line shows what
happened since the line before. Not thread-safe on its own: the engine holds its lock around it.
"""

from __future__ import annotations

import math
import time
from collections import deque


class Recent:
    """Cumulative count / sum of a value, and percentiles over a bounded recent window."""

    def __init__(self, window_s: float = 10.0, max_items: int = 4096, clock=time.monotonic):
        self.window_s = window_s
        self.n = 0
        self.sum = 0.0
        self._items: deque[tuple[float, float]] = deque(maxlen=max_items)
        self._clock = clock

    def add(self, value: float) -> None:
        self.n += 1
        self.sum += value
        self._items.append((self._clock(), value))

    def summary(self, scale: float = 1.0, digits: int = 3) -> dict[str, float | int]:
        """``n``, ``sum`` (all time) and ``window_n``, ``p50``, ``p99``, ``max`` (recent window), × ``scale``."""
        cutoff = self._clock() - self.window_s
        while self._items and self._items[0][0] < cutoff:
            self._items.popleft()
        xs = sorted(v for _, v in self._items)
        out: dict[str, float | int] = {"n": self.n, "sum": round(self.sum * scale, digits), "window_n": len(xs)}
        if xs:
            out.update(p50=round(_rank(xs, 50) * scale, digits), p99=round(_rank(xs, 99) * scale, digits),
                       max=round(xs[-1] * scale, digits))
        return out


def _rank(xs: list[float], q: float) -> float:
    """Nearest-rank percentile of the sorted ``xs`` (non-empty)."""
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]
