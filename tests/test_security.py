"""Security defaults (issue #6, part 5), checked on the project's own source with `ast`:
no pickle anywhere (safetensors + JSON + .npy without pickle; torch.load only with
weights_only=True), no shell strings, servers bind 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("realm_core", "tasks", "flows", "bench")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}


def _dotted(node: ast.AST) -> str:
    """'torch.load' for torch.load, 'np.load' for np.load, '' for anything not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else ""
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def _call_problem(call: ast.Call) -> str | None:
    name = _dotted(call.func)
    if name in ("torch.load",) and not _keyword_is(call, "weights_only", True):
        return "torch.load without weights_only=True (unpickles arbitrary objects)"
    if name in ("np.load", "numpy.load") and not _keyword_is(call, "allow_pickle", False):
        return "np.load without allow_pickle=False"
    if _keyword_is(call, "allow_pickle", True):
        return "allow_pickle=True"
    if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
        return f"{name} (use yaml.safe_load)"
    if _keyword_is(call, "shell", True):
        return "shell=True"
    if name in ("os.system", "os.popen"):
        return f"{name} runs a shell string"
    if name.split(".")[-1] in SUBPROCESS_CALLS and name.startswith("subprocess.") and call.args:
        if not isinstance(call.args[0], (ast.List, ast.Tuple, ast.Name)):
            return "subprocess given a command string instead of an argv list"
    if _keyword_is(call, "trust_remote_code", True):
        return "trust_remote_code=True"
    return None


def problems_in(source: str, filename: str = "<source>") -> list[str]:
    """Every unsafe construct in one Python source, as 'file:line: what'."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        problem = None
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
            problem = f"imports {', '.join(bad)}" if bad else None
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            problem = f"imports from {node.module}"
        elif isinstance(node, ast.Call):
            problem = _call_problem(node)
        elif isinstance(node, ast.Constant) and node.value == "0.0.0.0":
            problem = "binds 0.0.0.0 (all interfaces)"
        if problem:
            out.append(f"{filename}:{node.lineno}: {problem}")
    return out


def _project_sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))


def test_the_project_source_has_no_pickle_no_shell_strings_and_no_wildcard_binds():
    files = _project_sources()
    assert len(files) > 20  # the scan really covers the project
    found = [p for f in files for p in problems_in(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import joblib as jl",
        "from dill import loads",
        "import torch\nstate = torch.load('x.pt')",
        "import torch\nstate = torch.load('x.pt', weights_only=False)",
        "import numpy as np\na = np.load('x.npy')",
        "import numpy as np\na = np.load('x.npy', allow_pickle=True)",
        "import subprocess\nsubprocess.run('dvc repro', shell=True)",
        "import subprocess\nsubprocess.run(f'dvc exp run -S {x}')",
        "import os\nos.system('rm -rf data')",
        "import yaml\nyaml.load(open('params.yaml'))",
        "uvicorn.run(app, host='0.0.0.0')",
        "AutoModel.from_pretrained(p, trust_remote_code=True)",
    ],
)
def test_the_scanner_flags_each_unsafe_construct(snippet):
    assert problems_in(snippet)


@pytest.mark.parametrize(
    "snippet",
    [
        '"""Saved as safetensors, never pickle."""',
        "import torch\nstate = torch.load('x.pt', weights_only=True)",
        "import numpy as np\na = np.load('x.npy', allow_pickle=False)",
        "import subprocess\nsubprocess.run(['dvc', 'repro'], check=True)",
        "import yaml\nyaml.safe_load(text)",
        "uvicorn.run(app, host='127.0.0.1')",
    ],
)
def test_the_scanner_accepts_the_safe_forms(snippet):
    assert problems_in(snippet) == []


def test_every_cli_server_binds_loopback_by_default():
    from flows.cli import app

    hosts = {}
    for command in app.registered_commands:
        params = inspect.signature(command.callback).parameters
        if "host" in params:
            hosts[command.name or command.callback.__name__] = params["host"].default
    assert set(hosts) >= {"ui", "serve-api"}
    assert set(hosts.values()) == {"127.0.0.1"}, hosts


WILDCARD = ("0.0.0.0", "::")


def _listening_sockets() -> set[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket of this process and its children."""
    import psutil

    me = psutil.Process()
    out = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            out |= {
                (proc.pid, c.laddr.ip, c.laddr.port)
                for c in proc.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            }
        except psutil.Error:  # a child that exited meanwhile
            continue
    return out


def _sockets_opened_by(runner) -> set[tuple[int, str, int]]:
    """The listening sockets that appear while the task runner's local cluster is up."""
    before = _listening_sockets()
    with runner:
        if hasattr(type(runner), "client"):
            runner.client  # noqa: B018 - prefect-dask starts its LocalCluster on first use
        return _listening_sockets() - before


@pytest.mark.timeout(180)
def test_a_local_dask_cluster_listens_on_loopback_only():
    """runner.type: dask used to serve its dashboard on 0.0.0.0:8787 (issue #16, 7)."""
    pytest.importorskip("psutil")
    pytest.importorskip("prefect_dask")
    from flows.runners import make_task_runner
    from realm_core.config import RunnerParams

    opened = _sockets_opened_by(make_task_runner(RunnerParams(type="dask", workers=1)))
    assert len({pid for pid, _, _ in opened}) >= 2, opened  # the scheduler here, the worker in its own process
    assert not [s for s in opened if s[1] in WILDCARD], opened


@pytest.mark.timeout(300)
def test_a_local_ray_listens_on_loopback_only():
    pytest.importorskip("psutil")
    pytest.importorskip("prefect_ray")
    from flows.runners import make_task_runner
    from realm_core.config import RunnerParams

    opened = _sockets_opened_by(make_task_runner(RunnerParams(type="ray", workers=1)))
    assert opened and not [s for s in opened if s[1] in WILDCARD], opened
