"""What a user sees when something is wrong: one error type, one line, no credentials.

Every problem a user can fix (a bad spec, a missing bucket, a model that cannot be loaded, a
cluster that refuses a token) is raised as ``UserError`` and printed by the CLI as one line,
``clipbatch: error: ...``. ``one_line`` turns any other exception into such a line, and
``redact`` masks every known secret in it, so no token reaches a terminal, a log or a manifest.
"""

from __future__ import annotations

import os
import re

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN",
               "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_KEY", "HF_TOKEN")
# Query-string signatures and credentials that libraries sometimes echo back.
_SIGNED = re.compile(r"(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s'\"]+", re.IGNORECASE)
# HTTP authorization headers, as a client library may print them in an error.
_BEARER = re.compile(r"(Bearer\s+)[^\s'\",}]+", re.IGNORECASE)
# Terminal colours that Ray puts into its errors' first lines.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Secrets read from files (a Ray token in ~/.ray/auth_token) rather than from the environment.
_KNOWN: set[str] = set()


class UserError(ValueError):
    """A problem the user can fix (spec, inputs, storage, model, cluster), reported as one line."""


def add_secret(value: str) -> None:
    """Mask this value too from now on (for secrets that do not live in an environment variable)."""
    if value and len(value) >= 4:
        _KNOWN.add(value)


def redact(text: str) -> str:
    """Replace every known secret value in text by '***'."""
    values = {os.environ.get(name) or "" for name in _SECRET_ENV} | _KNOWN
    for value in sorted(values, key=len, reverse=True):
        if len(value) >= 4:
            text = text.replace(value, "***")
    return _BEARER.sub(r"\1***", _SIGNED.sub(r"\1***", text))


def one_line(exc: BaseException, limit: int = 300) -> str:
    """'Type: first line of the message', redacted and cut to limit characters."""
    lines = _ANSI.sub("", str(exc)).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else 'no detail'}"
    return redact(text)[:limit]


_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


def unexpected(exc: BaseException) -> str:
    """One line for an exception nobody expected: for an error Ray brings back from a worker, the
    'Type: message' the worker raised (Ray carries it only in its text), else the innermost cause."""
    if type(exc).__module__.startswith("ray"):
        for line in _ANSI.sub("", str(exc)).splitlines():
            raised = _RAISED.match(line.strip())
            if raised and not raised.group(1).startswith("ray."):
                return redact(f"{raised.group(1).rsplit('.', 1)[-1]}: {raised.group(2)}")[:300]
    return one_line(root_cause(exc))


def root_cause(exc: BaseException) -> BaseException:
    """The exception under the wrappers (a Ray task error wraps the one raised in a worker, as ``cause``)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc
