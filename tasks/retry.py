"""Which task failures Prefect retries: transient I/O only.

A retry is worth its wait when the failure can pass by itself: a dropped connection to the MLflow
server or the tracking database locked by a second pipeline, a flaky network file system under a
cluster's shared directory. Bad input, a missing file or a bug fails the same way every time, so it
ends the task at once with its one clear message instead of repeating it three times.
Training tasks are never retried here: they resume from their checkpoints on the next run.
"""

from __future__ import annotations

import errno
import sqlite3
from typing import Any

from realm_core.io import InputError

# OSErrors that retrying cannot fix. OSError(errno.ENOENT, ...) is already a FileNotFoundError (Python
# picks the subclass from the errno), so the classes cover those errnos; a full disk has no subclass.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def is_transient(exc: BaseException | None) -> bool:
    """True for failures that may pass on their own (see the module docstring)."""
    if exc is None or isinstance(exc, (InputError, *_PERMANENT)):
        return False
    if isinstance(exc, sqlite3.OperationalError):
        return "locked" in str(exc) or "busy" in str(exc)
    from mlflow.exceptions import MlflowException  # here: the corpus tasks need not import mlflow

    if isinstance(exc, MlflowException):
        text = str(exc).lower()
        return any(s in text for s in ("database is locked", "connection", "timed out", "temporarily unavailable"))
    if isinstance(exc, OSError):  # ConnectionError, TimeoutError, requests' ConnectionError, EIO, ESTALE...
        return exc.errno != errno.ENOSPC
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry_condition_fn: retry only when the failed state holds a transient exception."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    return is_transient(exc)


# Options for the @task of an I/O task: two retries, after 2 s and 10 s, of transient failures only.
IO_RETRIES: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": retry_transient}
