"""Progress while work runs: rows done / total, rows/s and ETA.

A driver thread asks ``read()`` for (rows, errors) so far (in a job, encoder
actors add to a tiny counter actor; relabel counts in its own process) and
prints one updating line on a terminal, or a line every ``interval`` seconds
into a log.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Callable


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_progress(done: int, total: int, errors: int, elapsed: float, rate: float, unit: str = "images") -> str:
    pct = 100.0 * done / total if total else 100.0
    eta = _duration((total - done) / rate) if rate > 0 else "?"
    per_s = "img/s" if unit == "images" else f"{unit}/s"
    return (f"clipbatch: {done:,}/{total:,} {unit} ({pct:.1f}%), {rate:,.1f} {per_s}, ETA {eta}, "
            f"{errors:,} errors, {_duration(elapsed)} elapsed")


STEADY_MIN_BATCHES = 5


class ProgressCounter:
    """Rows done so far: in relabel a plain object in the driver, in a job the JobCounter actor
    (no CPU of its own) that every encoder adds to."""

    def __init__(self):
        self.rows = 0
        self.errors = 0
        self.first: tuple[float, int] | None = None  # (time, rows) of the first batch counted
        self.last_at: float | None = None
        self.batches = 0

    def add(self, rows: int, errors: int) -> None:
        self.rows += rows
        self.errors += errors
        self.last_at = time.time()
        self.batches += 1
        if self.first is None:
            self.first = (self.last_at, self.rows)

    def read(self) -> tuple[int, int]:
        return self.rows, self.errors

    def steady_rate(self) -> tuple[float | None, float]:
        """(when the first batch was counted, rows/s from then to the last one): the rate once
        start-up (Ray, model loading) is over, which is what a long job runs at; 0.0 when there were
        too few batches to tell."""
        if self.first is None or self.batches < STEADY_MIN_BATCHES or self.last_at <= self.first[0]:
            return (self.first[0] if self.first else None), 0.0
        return self.first[0], (self.rows - self.first[1]) / (self.last_at - self.first[0])


class JobCounter(ProgressCounter):
    """A job's counter (a Ray actor on the driver's node), which also carries the text heads the
    driver builds to the encoders: they hold the refs text_heads() returns at once, and those
    resolve when the driver hands the heads over, so the encoders start (and load their models)
    without waiting for them. Kept in this module, free of torch, because its process imports it."""

    def __init__(self):
        super().__init__()
        self._handed = asyncio.Event()
        self._heads: tuple = (None, None, "no text head was handed over")

    def hand_over(self, prepared: dict | None, schema, error: str | None = None) -> None:
        self._heads = (prepared, schema, error)
        self._handed.set()

    async def text_heads(self) -> tuple:
        await self._handed.wait()
        prepared, schema, error = self._heads
        if error:
            raise RuntimeError(error)
        return prepared, schema


class ProgressReporter:
    """Context manager: prints progress from read() -> (rows, errors) until the block ends."""

    def __init__(self, read: Callable[[], tuple[int, int]], total: int, interval: float | None = None,
                 stream=None, unit: str = "images"):
        self.read, self.total, self.unit = read, total, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (1.0 if self.tty else 15.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.started = time.time()
        self.first: tuple[float, int] | None = None  # (time, rows) when rows were first seen

    def _line(self) -> str:
        done, errors = self.read()
        # Batches that Ray ran again (their node was lost) are counted again: never show more than the total.
        done, errors = min(done, self.total), min(errors, self.total)
        now = time.time()
        if done and self.first is None:
            self.first = (now, done)
        # The rate counts from the first finished batch, so model loading does not skew the ETA.
        if self.first and done > self.first[1]:
            rate = (done - self.first[1]) / (now - self.first[0])
        else:
            rate = done / (now - self.started) if done else 0.0
        return format_progress(done, self.total, errors, now - self.started, rate, self.unit)

    def _print(self, final: bool = False) -> None:
        """One progress line: rewritten in place on a terminal, appended in a log."""
        try:
            line = self._line()
        except Exception:  # progress must never break a job
            return
        if self.tty:
            self.stream.write("\r" + line.ljust(100) + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._print()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._print(final=True)
