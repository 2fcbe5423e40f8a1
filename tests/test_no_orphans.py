"""Nothing outlives a killed `realm` command (issue 16, item 2; flows/procs.py).

On a tiny project that has run once, pre-training is made stale again and its index builder is
slowed down, so the whole tree is alive at once: `realm run`, `dvc repro`, `realm stage
pretrain`, the index builder and Prefect's temporary server. The command is then killed each
way, and every process of the tree read just before must be gone a few seconds later.
`realm serve-api`, a process without children, is killed each way in tests/test_api_load.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from realm_core.refresh import BUILDER_DELAY_ENV
from tests.test_pipeline import BIN, _sh, project  # noqa: F401 (project: the tiny project fixture)

pytestmark = pytest.mark.skipif(not Path("/proc/self").exists(), reason="parent-death signals are Linux's")

SETTLE_SECONDS = 20.0  # "a few seconds": the stage's SIGTERM cleanup, then SIGKILL of what is left (flows/procs.py)


@pytest.fixture(scope="module")
def ran(project):  # noqa: F811
    """The tiny project with corpus and ict done: each test below only starts pre-training."""
    proj, env = project
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["pretrain"]["refresh_mode"] = "async"  # the builder is a process of its own
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh([str(BIN / "dvc"), "repro", "ict"], proj, env)
    # Every index build now outlasts the test. No SHELL, as in CI: DVC then runs each cmd through
    # /bin/sh, which (dash) does not exec it, so the stage's parent is a shell that outlives DVC.
    return proj, {**{k: v for k, v in env.items() if k != "SHELL"}, BUILDER_DELAY_ENV: "120"}


def _stale_pretrain(proj: Path, steps: int) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["pretrain"]["steps"] = steps
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _is_builder(proc: psutil.Process) -> bool:
    """The index builder, up for a few seconds (past its imports: a process killed while Python
    starts prints its own fatal-error traceback, which says nothing about this code)."""
    cmd = " ".join(proc.cmdline())
    return "multiprocessing.spawn" in cmd and "resource_tracker" not in cmd and time.time() - proc.create_time() > 5


def _is_server(proc: psutil.Process) -> bool:
    return "uvicorn" in " ".join(proc.cmdline())


def _tree_when(root: subprocess.Popen, ready, timeout: float = 240.0) -> list[psutil.Process]:
    """root and all its descendants, once `ready(tree)` holds (the builder is up, waiting on its delay).
    The Prefect server sits in a session of its own but is still a child of the command."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert root.poll() is None, f"exited early with {root.returncode}: {root.stderr.read()[-3000:]}"
        try:
            tree = [psutil.Process(root.pid), *psutil.Process(root.pid).children(recursive=True)]
            if ready(tree):
                return tree
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.5)
    raise AssertionError("the process tree never got ready")


def _left_alive(tree: list[psutil.Process], root: subprocess.Popen) -> list[str]:
    """What of `tree` is still alive SETTLE_SECONDS after the signal; killed, so a failure here
    cannot leave a run holding the workspace for the next case."""
    with contextlib.suppress(subprocess.TimeoutExpired):  # a root still alive is reported below
        root.wait(timeout=SETTLE_SECONDS)
    gone, alive = psutil.wait_procs(tree, timeout=1.0 if root.poll() is None else SETTLE_SECONDS)
    names = []
    for proc in alive:
        try:
            names.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()  # leave nothing behind for the next test either
        except psutil.NoSuchProcess:
            pass
    return names


def _as_in_a_terminal() -> None:
    """SIGINT back to its default, as for a command typed in a terminal. A shell starts a background
    job (`cmd &`, nohup) with SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
    a test suite started that way would see every SIGINT case fail for a reason that is not ours."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], proj: Path, env: dict[str, str]) -> subprocess.Popen:
    # a session of its own: a test's "Ctrl-C" goes to this group, not to pytest's
    return subprocess.Popen(
        args,
        cwd=proj,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_as_in_a_terminal,
    )


def _full_tree(tree: list[psutil.Process]) -> bool:
    cmds = [" ".join(p.cmdline()) for p in tree]
    return (
        any("dvc" in c and "repro" in c for c in cmds)
        and any("stage pretrain" in c for c in cmds)
        and any(map(_is_builder, tree))
        and any(map(_is_server, tree))
    )


@pytest.mark.parametrize(
    ("how", "steps"),
    [("SIGKILL", 7), ("SIGTERM", 8), ("SIGINT to the process alone", 9), ("Ctrl-C (SIGINT to the group)", 10)],
)
def test_killing_realm_run_leaves_no_dvc_stage_builder_or_server(ran, how, steps):
    proj, env = ran
    _stale_pretrain(proj, steps)
    run = _start([str(BIN / "realm"), "run"], proj, env)
    tree = _tree_when(run, _full_tree)
    if how.startswith("Ctrl-C"):
        os.killpg(run.pid, signal.SIGINT)
    else:
        run.send_signal(getattr(signal, how.split()[0]))
    assert _left_alive(tree, run) == [], f"after {how} of realm run"
    if how != "SIGKILL":  # caught: one clear line, not a wall of tracebacks
        err = run.stderr.read()
        assert "error: interrupted" in err and err.count("Traceback") == 0, err[-3000:]


def test_killing_a_stage_under_plain_dvc_repro_takes_its_server_and_builder_with_it(ran):
    proj, env = ran
    _stale_pretrain(proj, 11)
    repro = _start([str(BIN / "dvc"), "repro", "pretrain"], proj, env)
    tree = _tree_when(repro, lambda t: any(map(_is_builder, t)) and any(map(_is_server, t)))
    stage = next(p for p in tree if "stage pretrain" in " ".join(p.cmdline()))
    stage.kill()
    assert _left_alive(tree, repro) == [], "after SIGKILL of the stage"
    assert repro.returncode != 0  # DVC reports the stage's failure; dvc.lock keeps the old pretrain


def test_killing_realm_train_takes_its_builder_with_it(ran):
    proj, env = ran
    _stale_pretrain(proj, 12)
    train = _start([str(BIN / "realm"), "train", "pretrain"], proj, env)
    tree = _tree_when(train, lambda t: any(map(_is_builder, t)))
    train.kill()
    assert _left_alive(tree, train) == []
