"""Peak resident memory of this process and of the child processes that report theirs (issue 13).

Pre-training runs REALM's index builder (section 3.3) beside the trainer, so a stage's memory is
its own peak plus its builder's. getrusage's ru_maxrss measures neither on Linux: exec keeps the
high-water mark of the image it replaces, so a child spawned (fork or vfork, then exec) by a 2 GB
trainer reports >= 2 GB however little it uses, in its own RUSAGE_SELF and in its parent's
RUSAGE_CHILDREN alike. The kernel's mark of the current image, VmHWM in /proc/self/status, is
exact; ru_maxrss is the fallback elsewhere (KiB, bytes on macOS).

So a child measures itself (`peak_rss_mb()`) and sends the value to its parent, which records it
with `note_child_peak`; `children_peak_rss_mb()` is the largest recorded, process-wide, as
getrusage is. realm_core/refresh.py's builder does this; flows/tracking.py writes both values.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

PROC_STATUS = Path("/proc/self/status")
MB = 2**20

_children_peak_mb = 0.0


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (2**20 bytes)."""
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", PROC_STATUS.read_text(), re.MULTILINE)
    except OSError:
        found = None
    if found:
        return int(found.group(1)) * 1024 / MB
    unit = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / MB


def note_child_peak(mb: float) -> None:
    """Record the peak a child process reported of itself."""
    global _children_peak_mb
    _children_peak_mb = max(_children_peak_mb, float(mb))


def children_peak_rss_mb() -> float:
    """The largest peak a child of this process reported so far (0 when none did), in MB."""
    return _children_peak_mb
