"""Storage that goes away for a while is waited for, not turned into error rows or a failed job.

An object store restarting or a network blip makes every read and write fail for
seconds to minutes. Such transient errors (connection refused or reset, timeouts)
are retried with backoff until ``PATIENCE_S`` have passed; then the last one is
raised, the job stops with one line, and a rerun resumes. Errors about a file
itself (missing, forbidden, undecodable, a full disk) are never retried.
"""

from __future__ import annotations

import errno
import os
import time
from typing import Callable, TypeVar

T = TypeVar("T")

PATIENCE_S = float(os.environ.get("CLIPBATCH_STORAGE_PATIENCE_S", 600))
# Transient errors of the libraries under fsspec (botocore, aiohttp, fsspec), by class name: importing
# them here would tie this module to one storage backend.
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ClientConnectorError", "ClientOSError", "ServerDisconnectedError", "ServerTimeoutError",
                    "FSTimeoutError"}


# What s3fs makes of an object store's 500 InternalError and 503 SlowDown/ServiceUnavailable: a store that
# is restarting answers these for a while (SeaweedFS while it finds its volumes again).
_TRANSIENT_ERRNOS = {errno.EREMOTEIO, errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT}


def is_transient(exc: BaseException) -> bool:
    """Whether exc says the storage could not be reached, rather than something about the file."""
    return isinstance(exc, (ConnectionError, TimeoutError)) or \
        (isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS) or \
        any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__)


class Patience:
    """Waits 1, 2, 4 ... 30 s between tries of one operation, for up to patience_s in all."""

    def __init__(self, patience_s: float | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.clock, self.sleep = clock, sleep
        self.deadline = clock() + (PATIENCE_S if patience_s is None else patience_s)
        self.delay = 1.0

    def wait_or_raise(self, exc: Exception) -> None:
        """Called with what a try raised: waits before the next try if exc is transient and time is left."""
        if not is_transient(exc) or self.clock() + self.delay > self.deadline:
            raise exc
        self.sleep(self.delay)
        self.delay = min(self.delay * 2, 30.0)


def retrying(call: Callable[[], T], patience: Patience | None = None) -> T:
    """call(), tried again while it raises a transient error (see Patience)."""
    patience = patience or Patience()
    while True:
        try:
            return call()
        except Exception as exc:
            patience.wait_or_raise(exc)
