"""Progress of long loops: a tqdm bar on a terminal, plain lines everywhere else.

Without a terminal (Prefect, CI, a GPU worker's log) a bar is either hidden or a smear of carriage
returns, so the loop prints one line every ``SYNTHMED_PROGRESS_EVERY_S`` seconds (default 30;
0 = none) and one when it ends:

    train_ldm: step 120/1800 (6.7%), loss 0.0912, 4.21 step/s, ETA 6m39s

Values given with ``set_postfix`` (as to tqdm) are averaged over the updates since the previous
line, so a line's loss is its stretch of training, not one noisy step.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Iterator, TextIO

from tqdm.auto import tqdm

from synthmed.core.errors import PipelineError

ENV_EVERY_S = "SYNTHMED_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 30.0


def every_s() -> float:
    raw = os.environ.get(ENV_EVERY_S, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_EVERY_S
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise PipelineError(f"{ENV_EVERY_S}={raw!r}: give seconds between progress lines (0 = none)")
    return value


def duration(seconds: float) -> str:
    """12s, 6m39s, 2h05m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LineProgress:
    """The part of tqdm's interface our loops use (iterate, update, set_postfix, close), as lines."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str, total: int | None = None, initial: int = 0,
                 unit: str = "it", every: float = DEFAULT_EVERY_S, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.iterable, self.desc, self.unit, self.every = iterable, desc, unit, every
        self.total = total if total is not None else _len_or_none(iterable)
        self.n = self.initial = initial
        self.stream, self.clock = stream, clock
        self.start = self.last = clock()
        self.printed_n = initial
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()
        self.close()  # the closing line only when the loop ran to its end

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, refresh: bool = True, **values: float) -> None:
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
            self._counts[key] = self._counts.get(key, 0) + 1

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.every > 0 and self.clock() - self.last >= self.every:
            self._print()

    def close(self) -> None:
        if not self.closed and self.every > 0 and self.n > self.printed_n:
            self._print()
        self.closed = True

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = (self.n - self.initial) / elapsed
        parts = [f"{self.desc}: {self.unit} {self.n}" + (f"/{self.total} ({100 * self.n / self.total:.1f}%)"
                                                         if self.total else "")]
        parts += [f"{key} {self._sums[key] / self._counts[key]:.4g}" for key in self._sums]
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and self.n < self.total and rate > 0:
            parts.append(f"ETA {duration((self.total - self.n) / rate)}")
        else:
            parts.append(f"{duration(elapsed)} elapsed")
        return ", ".join(parts)

    def _print(self) -> None:
        print(self.line(), file=self.stream or sys.stdout, flush=True)
        self.last, self.printed_n = self.clock(), self.n
        self._sums.clear()
        self._counts.clear()


def _len_or_none(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, initial: int = 0,
             unit: str = "it", disable: bool = False):
    """A tqdm bar when stderr is a terminal (or SYNTHMED_PROGRESS=1), else a LineProgress; nothing
    with ``disable`` (e.g. on all but the main process)."""
    if disable:
        return tqdm(iterable, total=total, initial=initial, disable=True)
    if sys.stderr.isatty() or os.environ.get("SYNTHMED_PROGRESS") == "1":
        return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, mininterval=2.0)
    return LineProgress(iterable, desc=desc, total=total, initial=initial, unit=unit, every=every_s())
