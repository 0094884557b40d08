"""A one-line progress bar with bytes/s and ETA, for ``prepare-data`` on large corpora.

It draws on a terminal only (``\\r`` redraws would litter a log file), at most every
``interval`` seconds, and not at all for a job that ends within the first interval (a small
corpus). ``clock`` is injectable so that the rendering is testable without waiting.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


class Progress:
    """``update(n)`` after every ``n`` bytes of the ``total``; ``close()`` at the end."""

    def __init__(self, label: str, total: int, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic, interval: float = 0.5,
                 enabled: Optional[bool] = None, width: int = 24) -> None:
        self.label, self.total = label, max(1, int(total))
        self.stream = stream if stream is not None else sys.stderr
        self.clock, self.interval, self.width = clock, interval, width
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = self.last = clock()
        self.done = 0
        self.drawn = False

    def line(self) -> str:
        """``label [#####.....]  45%  9.1/20.0 MB  3.2 MB/s  ETA 3 s``."""
        elapsed = max(self.clock() - self.start, 1e-9)
        frac = min(1.0, self.done / self.total)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        eta_text = _eta(eta) if eta != float("inf") else "?"
        return (f"{self.label} [{bar}] {100 * frac:3.0f}%  {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB  "
                f"{rate / 1e6:.1f} MB/s  ETA {eta_text}")

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self.stream.write("\r" + self.line())
            self.stream.flush()
            self.drawn = True

    def close(self) -> float:
        """End the line (if one was drawn); returns the elapsed seconds."""
        if self.drawn:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()
        return self.clock() - self.start
