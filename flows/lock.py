"""One `realm run` per workspace at a time.

`dvc exp run -S` writes params.yaml in the workspace before DVC takes its own lock, so a second
run started beside a first one rewrote the first one's params (it then trained with them) and
failed on DVC's lock. `realm run` therefore takes this lock before it touches anything, and a
second run refuses at once, naming the holder. `--temp` runs in a copy of the workspace and does
not need it.

The lock is an flock(2) on runs/workspace.lock: the kernel drops it when its holder dies, even by
SIGKILL, so a crash never leaves a stale lock. The file holds the holder's pid for the message.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from realm_core.paths import Paths

LOCK_NAME = "workspace.lock"


class WorkspaceBusy(RuntimeError):
    """Another process holds the workspace lock."""


def lock_path(root: Path) -> Path:
    return Paths(Path(root)).root / "runs" / LOCK_NAME


@contextmanager
def workspace_lock(root: Path) -> Iterator[Path]:
    """Hold the workspace's run lock for the block; WorkspaceBusy at once if another process holds it."""
    path = lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children (O_CLOEXEC by default)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise WorkspaceBusy(
            f"another `realm run` (pid {holder}) is running in {Path(root).resolve()}; wait for it to finish, "
            "or run beside it in a temporary copy with `realm run --temp ...` (or queue it: `dvc exp run --queue ...`)"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
