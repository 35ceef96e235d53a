"""Progress for long jobs: a tqdm bar on a terminal, log lines everywhere else.

tqdm turns itself off when stderr is not a terminal (``nohup``, ``| tee``, CI logs), which left
long jobs silent for minutes. :func:`progress` keeps the bar on a terminal and otherwise logs
``desc: 12/40 prompts (30%), 1.8 prompts/s, ETA 0:16`` at most every
``RESIDLAB_PROGRESS_SECONDS`` (default 10) seconds, plus a last line when the job ends. Count
what a person counts (prompts, records, generations), not internal batches; pass ``initial``
when resuming so the line says how much was already done.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["LogProgress", "progress"]

log = logging.getLogger("residlab.progress")


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class LogProgress:
    """A tqdm-shaped counter that reports through logging at a fixed interval."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None,
                 desc: str = "", unit: str = "it", initial: int = 0,
                 interval: float | None = None):
        self.iterable = iterable
        self.total = total if total is not None else _length(iterable)
        self.desc, self.unit, self.n, self.initial = desc, unit, initial, initial
        env = os.environ.get("RESIDLAB_PROGRESS_SECONDS")
        self.interval = interval if interval is not None else float(env or 10.0)
        self.start = self.last = time.monotonic()
        self.closed = False
        if initial:
            log.info("%s: resuming, %s already done", desc, self._count())

    def _count(self) -> str:
        if self.total:
            return f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        return f"{self.n} {self.unit}"

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = (self.n - self.initial) / elapsed
        text = f"{self.desc}: {self._count()}, {rate:.2f} {self.unit}/s"
        if self.total and rate > 0 and self.n < self.total:
            text += f", ETA {_clock((self.total - self.n) / rate)}"
        return text + f", elapsed {_clock(elapsed)}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            log.info("%s", self.line())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            log.info("%s (done)", self.line())

    def __iter__(self) -> Iterator:
        assert self.iterable is not None, "iterate over a progress made from an iterable"
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def set_postfix_str(self, text: str) -> None:  # tqdm compatibility
        return None


def _length(iterable: Iterable | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", initial: int = 0, stream=None):
    """A tqdm bar when ``stream`` (stderr) is a terminal, else a :class:`LogProgress`."""
    stream = stream if stream is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial,
                    file=stream, dynamic_ncols=True)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)
