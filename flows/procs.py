"""The process tree of a `realm` command: nothing outlives it (issue 16, item 2).

    realm run ── dvc repro ── realm stage <name> ── index builder (realm_core/refresh.py)
       └── Prefect's temporary API server (one, shared by every stage through PREFECT_API_URL)

Each child dies with its parent, even when the parent is SIGKILLed: DVC and the server are
started with a parent-death signal (realm_core/procs.py), a stage started by DVC asks for one
itself (`realm stage`, end_with_dvc: SIGKILL, since its API server may be gone too; DVC's shell
may stand between them), and so does the index builder. The multiprocessing resource tracker ends by itself once its writers are gone.

SIGTERM is turned into the KeyboardInterrupt of Ctrl-C (inside a flow Prefect's own handler
raises its TerminationSignal instead), so both end the same way: the children are stopped and
waited for, the logs still queued for the API are sent, and the API server stops last.

The server runs in a session of its own, so a Ctrl-C in the terminal (SIGINT to the whole
foreground process group) no longer stops it before the flows it serves: they would retry
against a dead API for minutes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from realm_core.procs import die_with_parent, parent_death_preexec

GRACE_SECONDS = 3.0  # after Ctrl-C, what the tree gets to stop by itself (it had the same SIGINT)
TERM_SECONDS = 15.0  # after SIGTERM, before SIGKILL


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does, so `finally` blocks run
    (children stopped, MLflow runs closed, the server stopped last) instead of dying on the spot."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)


SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "ash", "busybox"})
WATCH_SECONDS = 0.5  # how often end_with_dvc looks for DVC


def end_with_dvc() -> None:
    """For a stage started by DVC: SIGKILL this process as soon as DVC is gone, even SIGKILLed.

    DVC runs a stage's `cmd` through a shell. bash execs a lone command, dash (/bin/sh on Debian
    when SHELL is unset, as in CI) does not, so the parent is often the shell, which outlives DVC:
    a parent-death signal alone would never fire. So the nearest ancestor that is not a shell is
    watched by a daemon thread, and the parent-death signal covers the direct case at once.
    SIGKILL: with DVC gone nothing can record this stage's result, and the Prefect server that
    died with the run would keep a caught signal's cleanup retrying the API for minutes."""
    import psutil

    die_with_parent(signal.SIGKILL)
    try:
        dvc = psutil.Process(os.getppid())
        while dvc.name() in SHELLS and dvc.ppid() > 1:
            dvc = dvc.parent()
    except (psutil.NoSuchProcess, AttributeError):  # already gone: parent() gave None or the pid vanished
        os.kill(os.getpid(), signal.SIGKILL)
        return

    def watch() -> None:
        while dvc.is_running():  # compares the start time too: a reused pid is not DVC
            time.sleep(WATCH_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="end-with-dvc", daemon=True).start()


def stop_tree(pid: int, grace: float = GRACE_SECONDS, term: float = TERM_SECONDS) -> None:
    """Stop `pid` and every descendant: let them end by themselves for `grace` seconds, then
    SIGTERM the descendants, the root after `term` seconds, and SIGKILL what is left. The tree is read first: a child
    whose parent died is reparented and could not be found through it any more."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    alive = tree
    # The descendants are terminated before the root: DVC then sees its stage end and exits by
    # itself, releasing .dvc/tmp/rwlock; a DVC terminated at once could die while rewriting it
    # and leave it empty, failing the next run ("JSON structure is corrupted").
    steps = (  # (who, signal method, then wait up to)
        (lambda procs: [], None, grace),
        (lambda procs: [p for p in procs if p.pid != pid], "terminate", term),  # the descendants
        (lambda procs: procs, "terminate", 5.0),  # the root too
        (lambda procs: procs, "kill", 5.0),
    )
    for who, send, timeout in steps:
        for proc in who(alive):
            with contextlib.suppress(psutil.NoSuchProcess):
                getattr(proc, send)()
        _, alive = psutil.wait_procs(alive, timeout=timeout)


def run_child(cmd: list[str], cwd: Path, env: dict[str, str]) -> int:
    """subprocess.run for a long child (DVC): it dies with this process; on KeyboardInterrupt
    (Ctrl-C, or SIGTERM after interrupt_on_sigterm) it and its descendants are stopped and
    waited for before the interrupt goes on. (subprocess.run would SIGKILL the child alone and
    leave its stage training.)"""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, preexec_fn=parent_death_preexec())
    try:
        return proc.wait()
    except BaseException:  # KeyboardInterrupt, or Prefect's TerminationSignal: its flow engine takes SIGTERM over
        stop_tree(proc.pid)
        proc.wait()
        raise


def _linked_server_class():
    """Prefect's SubprocessASGIServer whose uvicorn process dies with this process and sits in a
    session of its own. Prefect builds the command line; only the Popen options are added."""
    import prefect.server.api.server as server_module

    class LinkedServer(server_module.SubprocessASGIServer):
        _instances: dict = {}  # its own: Prefect's class keeps one instance per port

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            def popen(**kwargs: Any) -> subprocess.Popen[Any]:  # Prefect passes everything by keyword (args=[...])
                return subprocess.Popen(**kwargs, start_new_session=True, preexec_fn=parent_death_preexec())

            original = server_module.subprocess
            server_module.subprocess = SimpleNamespace(Popen=popen)  # for this one call
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = original

    return LinkedServer


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """The Prefect API of this command and of its children: PREFECT_API_URL when it is set, else a
    temporary local server started here (linked to this process), stopped when the block exits,
    after everything in it. Yields the API URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    server = _linked_server_class()()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url  # DVC's stages join it instead of each starting one
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        _drain_to_api()
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _drain_to_api() -> None:
    """Send the logs and events still queued for the API while it is up: at interpreter exit
    Prefect would send them to a stopped server and retry for over a minute."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler

    try:
        APILogHandler().flush()  # blocks until sent (at most 5 s)
        EventsWorker.drain_all(timeout=5)
    except Exception:  # noqa: BLE001 - best effort: the run's result does not depend on it
        pass
