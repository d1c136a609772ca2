"""Storage out of reach is waited for; errors about a file are not."""

from __future__ import annotations

import errno

import pytest

from clipbatch.retry import Patience, is_transient, retrying


class EndpointConnectionError(Exception):
    """botocore's class of this name, as clipbatch sees it (by name, without importing botocore)."""


@pytest.mark.parametrize("exc, transient", [
    (ConnectionRefusedError(), True), (TimeoutError(), True), (EndpointConnectionError("down"), True),
    (FileNotFoundError("x"), False), (PermissionError("x"), False), (ValueError("bad JPEG"), False),
    (OSError(errno.EREMOTEIO, "InternalError"), True), (OSError(errno.EBUSY, "SlowDown"), True),
    (OSError(errno.ENOSPC, "No space left on device"), False)])
def test_what_is_transient(exc, transient):
    assert is_transient(exc) is transient


def _flaky(failures: list[Exception]):
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return "written"
    return call, calls


def test_transient_errors_are_tried_again_with_growing_pauses():
    call, calls = _flaky([ConnectionResetError(), EndpointConnectionError("down")])
    pauses = []
    assert retrying(call, Patience(60, sleep=pauses.append)) == "written"
    assert len(calls) == 3 and pauses == [1.0, 2.0]


def test_other_errors_are_raised_at_once():
    call, calls = _flaky([FileNotFoundError("gone")])
    with pytest.raises(FileNotFoundError):
        retrying(call, Patience(60, sleep=lambda s: None))
    assert len(calls) == 1


def test_patience_runs_out():
    """With 2.5 s of patience, pauses of 1 s then 2 s would overrun: one pause, then the error."""
    call, calls = _flaky([ConnectionRefusedError()] * 10)
    pauses = []
    with pytest.raises(ConnectionRefusedError):
        retrying(call, Patience(2.5, sleep=pauses.append, clock=lambda: sum(pauses)))
    assert pauses == [1.0] and len(calls) == 2
