"""The progress line: a shard job's size is learned from the shards read so far."""

from __future__ import annotations

import io

from clipbatch.pipeline.progress import ProgressReporter, ShardTotal


def _line(read, total) -> str:
    log = io.StringIO()
    with ProgressReporter(read, total, interval=60, stream=log):
        pass
    return log.getvalue()


def test_a_shard_job_has_no_total_until_a_shard_is_read():
    line = _line(lambda: (640, 0, 0, 0), ShardTotal(shards=100, rows_done=0))
    assert line.startswith("clipbatch: 640 images, 0/100 shards read,") and "ETA ?" in line


def test_a_shard_job_estimates_its_rows_from_the_shards_read():
    """4 of 100 shards read, 10,000 rows each: about 1,000,000 rows, less 5,000 written by an earlier run."""
    line = _line(lambda: (99_500, 12, 4, 40_000), ShardTotal(shards=100, rows_done=5_000))
    assert line.startswith("clipbatch: 99,500/~995,000 images (10.0%), 4/100 shards read,")
    assert ", 12 errors," in line


def test_an_image_job_shows_its_exact_total():
    assert _line(lambda: (50, 1), 200).startswith("clipbatch: 50/200 images (25.0%), ")
