"""Safe file formats and atomic outputs.

A stage writes into a temporary sibling directory and renames it into place only on
success, so a killed stage never leaves a half-written artefact that DVC would cache
(DESIGN.md 2). Nothing here uses pickle.

A full disk is bad input too: every writer here (and the model and checkpoint savers, through
`report_disk_full`) turns ENOSPC into one InputError naming the file, instead of a traceback
without a path. Text inputs may start with a UTF-8 byte order mark; `decode_line` drops it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad user input; the message names the file (and line) and says how to fix it."""


NO_SPACE = "no space left on device"
NO_SPACE_FIX = "free space on that disk, or move the project (its data/ and runs/) to a disk with room"
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = (
    "No space left on device",
    "StorageFull",
    "code: 28,",
    "Disk quota exceeded",
)  # safetensors: IoError(Os { code: 28, kind: StorageFull, .. })


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT as an OSError, or wrapped in a library's own error (safetensors, faiss)."""
    if isinstance(exc, InputError):
        return False
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _NO_SPACE_ERRNOS
    return any(text in str(exc) for text in _NO_SPACE_TEXT)


@contextmanager
def report_disk_full(path: Path, fix: str = NO_SPACE_FIX) -> Iterator[None]:
    """Around a write of `path`: a full disk becomes one InputError naming `path` and the fix."""
    try:
        yield
    except Exception as exc:
        if is_disk_full(exc):
            raise InputError(f"{path}: {NO_SPACE} while writing it; {fix}") from None
        raise


def fsync(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a directory: the names in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_dir(final: Path, *, durable: bool = False, disk_full_fix: str = NO_SPACE_FIX) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success replace `final` with it, on error delete it.

    The old `final` is renamed aside before the new one is renamed in, so a kill at any moment
    leaves either the old output whole, or none; never a half-deleted one. Temporary siblings
    left by killed processes (`.<name>.tmp-<pid>`, `.<name>.old-<pid>`) are removed first.
    `durable` also flushes the directory before and its parent after the rename (a power cut
    then cannot leave a renamed directory with missing entries; checkpoints fsync their files too).
    """
    final = Path(final)
    with report_disk_full(final, disk_full_fix):
        final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_siblings(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with report_disk_full(final, disk_full_fix):  # whatever the caller wrote inside, named by its output
            yield tmp
            if durable:
                fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if durable:
        fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def _remove_dead_siblings(final: Path) -> None:
    """Delete `.<name>.tmp-<pid>` / `.<name>.old-<pid>` next to `final` whose process is gone."""
    for sibling in final.parent.glob(f".{final.name}.*-*"):
        kind, _, pid = sibling.name[len(final.name) + 2 :].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit():
            continue
        if pid_alive(int(pid)):
            continue  # another process is writing it
        shutil.rmtree(sibling, ignore_errors=True) if sibling.is_dir() else sibling.unlink(missing_ok=True)


@contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path`, on error it is deleted."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with report_disk_full(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    with _atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON lines (atomically); return the number written."""
    n = 0
    with _atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def decode_line(raw: bytes, path: Path, lineno: int) -> str:
    """One line of a UTF-8 text file; bad bytes raise InputError naming file:line. A byte order
    mark at the start of line 1 (Excel, Notepad) is dropped: it is not part of the first field."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8"
        ) from None


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; errors name file:line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_line(raw, path, lineno)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                # exc.pos, not exc.colno: an error at the end of the line is reported past its newline
                raise InputError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.pos + 1}); write one JSON object per line"
                ) from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            yield lineno, obj
