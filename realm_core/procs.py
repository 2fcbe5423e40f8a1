"""Child processes that do not outlive their parent (issue 16, item 2).

SIGKILL cannot be caught, so a parent cannot clean up after itself: each child must notice.
On Linux the kernel does it: prctl(PR_SET_PDEATHSIG, sig) asks it to send `sig` to this
process when the thread that forked it exits. Two uses:

    die_with_parent(signal.SIGTERM, parent=expected_ppid)   # at the start of a child (the index builder)
    subprocess.Popen(cmd, preexec_fn=parent_death_preexec())   # for a child we start (DVC, Prefect's server)

The death signal survives exec, not fork: every generation asks for itself. Elsewhere than
Linux both are no-ops (the children's own polling, e.g. the builder's getppid check, remains).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# Resolved here, in the parent: a preexec_fn runs between fork and exec, where loading a library
# could deadlock on a lock another thread held at fork.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> bool:
    """Have the kernel send `sig` to this process when its parent dies; False where it cannot.

    `parent` is the pid the caller expects as its parent: if that one died before this call
    (this process was already handed to a reaper), `sig` is sent now, as it would have been.
    """
    if _prctl is None or _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def parent_death_preexec(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A subprocess preexec_fn: the child gets `sig` when the calling thread of this process exits."""
    parent = os.getpid()

    def preexec() -> None:
        die_with_parent(sig, parent)

    return preexec


@contextmanager
def children_ignore_sigint() -> Iterator[None]:
    """Processes started inside the block ignore SIGINT (an ignored disposition survives fork and
    exec, and Python keeps it). For a child its parent stops, e.g. the index builder: a Ctrl-C
    reaches the whole foreground group, and would kill it mid-import with a traceback of its own."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal dispositions can only be changed from the main thread
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
