"""Progress while work runs: rows done / total, rows/s and ETA.

A driver thread asks ``read()`` for (rows, errors) so far (in a job, encoder
actors add to a tiny counter actor; relabel counts in its own process) and
prints one updating line on a terminal, or a line every ``interval`` seconds
into a log. Nothing here imports Ray: the job makes the counter an actor.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_progress(done: int, total: int | None, errors: int, elapsed: float, rate: float, unit: str = "images",
                    shards: str = "") -> str:
    """One progress line; total None while a shard job's size is not yet known."""
    per_s = "img/s" if unit == "images" else f"{unit}/s"
    if total is None:
        return (f"clipbatch: {done:,} {unit}{shards}, {rate:,.1f} {per_s}, ETA ?, {errors:,} errors, "
                f"{_duration(elapsed)} elapsed")
    pct = 100.0 * done / total if total else 100.0
    eta = _duration((total - done) / rate) if rate > 0 else "?"
    about = "~" if shards else ""
    return (f"clipbatch: {done:,}/{about}{total:,} {unit} ({pct:.1f}%){shards}, {rate:,.1f} {per_s}, ETA {eta}, "
            f"{errors:,} errors, {_duration(elapsed)} elapsed")


class ProgressCounter:
    """Rows done so far: in a job a Ray actor (no CPU of its own) that every encoder adds to,
    in relabel a plain object in the driver. Shard readers add each shard they finish, with the
    rows it holds, which is how a shard job learns its size."""

    def __init__(self):
        self.rows = 0
        self.errors = 0
        self.shards = 0
        self.shard_rows = 0

    def add(self, rows: int, errors: int) -> None:
        self.rows += rows
        self.errors += errors

    def shard_read(self, shards: int, rows: int) -> None:
        self.shards += shards
        self.shard_rows += rows

    def read(self) -> tuple[int, int, int, int]:
        """(rows, errors, shards read, rows those shards hold)."""
        return self.rows, self.errors, self.shards, self.shard_rows


@dataclass(frozen=True)
class ShardTotal:
    """A shard job's size, known only as shards are read: the shards to do, and their rows already
    written by an earlier run (which the readers skip)."""
    shards: int
    rows_done: int

    def estimate(self, shards_read: int, shard_rows: int) -> int | None:
        if not shards_read:
            return None
        return round(self.shards * shard_rows / shards_read) - self.rows_done


class ProgressReporter:
    """Context manager: prints progress from read() -> (rows, errors[, shards, shard rows]) until the
    block ends. total is the rows to do, or a ShardTotal for a shard job."""

    def __init__(self, read: Callable[[], tuple], total: int | ShardTotal, interval: float | None = None,
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
        done, errors, shards_read, shard_rows = (*self.read(), 0, 0)[:4]
        if isinstance(self.total, ShardTotal):
            total = self.total.estimate(shards_read, shard_rows)
            shards = f", {min(shards_read, self.total.shards):,}/{self.total.shards:,} shards read"
        else:
            total, shards = self.total, ""
        # Batches that Ray ran again (their node was lost) are counted again: never show more than the total.
        if total is not None:
            done, errors = min(done, total), min(errors, total)
        now = time.time()
        if done and self.first is None:
            self.first = (now, done)
        # The rate counts from the first finished batch, so model loading does not skew the ETA.
        if self.first and done > self.first[1]:
            rate = (done - self.first[1]) / (now - self.first[0])
        else:
            rate = done / (now - self.started) if done else 0.0
        return format_progress(done, total, errors, now - self.started, rate, self.unit, shards)

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
