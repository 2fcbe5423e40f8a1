"""The code's shape (issue 14): one training loop, and no import cycles between our modules.

Both are read from the source with `ast`, so they cost milliseconds and name the line at fault.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("realm_core", "flows", "tasks")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    return out


def _imports(path: Path, known: set[str]) -> dict[str, int]:
    """Our modules that `path` imports anywhere (module level, inside functions, under
    TYPE_CHECKING: a cycle through any of them is still a cycle), with the first line."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            if name in known:
                found.setdefault(name, node.lineno)
    return found


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_cycle_through_a_function_level_import():
    graph = {"a": {"b": 1}, "b": {"c": 3}, "c": {"a": 9}, "d": {"a": 2}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles_between_realm_core_flows_and_tasks():
    modules = _modules()
    known = set(modules)
    graph = {
        m: {t: line for t, line in _imports(p, known).items() if t != m and t != m.rpartition(".")[0]}
        for m, p in modules.items()
    }
    where = [  # every import inside each cycle, with its line
        ", ".join(f"{modules[m].relative_to(ROOT)}:{graph[m][n]} imports {n}" for m in c for n in c if n in graph[m])
        for c in _cycles(graph)
    ]
    assert not where, "import cycles:\n" + "\n".join(where)


def _optimiser_steps(path: Path) -> list[int]:
    """Lines calling `<x>.backward()` or `<opt>.step()` on an optimiser-like name."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = ast.unparse(node.func.value)
            if node.func.attr == "backward" or (
                node.func.attr == "step" and target.split(".")[-1] in {"opt", "optimizer"}
            ):
                lines.append(node.lineno)
    return lines


def test_only_the_training_loop_runs_backward_and_optimiser_steps():
    """Every training stage goes through realm_core/loop.py, so parameter groups, schedules,
    clipping, DDP, resuming and step logging are written once (optim.py holds the step itself)."""
    allowed = {ROOT / "realm_core" / "loop.py", ROOT / "realm_core" / "optim.py"}
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in _modules().values()
        if path not in allowed
        for line in _optimiser_steps(path)
    ]
    assert not offenders, f"a training loop outside realm_core/loop.py: {offenders}"
    assert _optimiser_steps(ROOT / "realm_core" / "loop.py"), "the finder no longer sees the loop's own steps"


def test_dvc_yaml_runs_the_registered_stages_in_their_order():
    """flows/stages.py is the one stage list (CLI, tracking, pipeline, realm train); dvc.yaml must agree."""
    import yaml

    from flows.stages import STAGES

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert tuple(dvc["stages"]) == STAGES


def test_realm_train_has_a_training_function_for_exactly_the_registered_training_stages():
    from flows.stages import TRAINING_STAGES, stage
    from flows.train import STAGE_TRAINING

    assert tuple(STAGE_TRAINING) == TRAINING_STAGES
    assert all(stage(name).trains for name in TRAINING_STAGES)


def test_an_unknown_stage_is_refused_with_the_stage_list():
    import pytest

    from flows.stages import stage

    with pytest.raises(ValueError, match="stages are corpus, ict, pretrain, finetune, evaluate"):
        stage("pretraining")


def _defined_names(path: Path) -> set[str]:
    """Names a module defines or imports at its top level (inside top-level if/try blocks too)."""
    names: set[str] = set()
    body = list(ast.parse(path.read_text(), filename=str(path)).body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            body += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", [])]
            body += [n for h in getattr(node, "handlers", []) for n in h.body]
    return names


def test_every_name_imported_from_our_modules_exists_there():
    """A name moved or removed (say flows.tracking.STAGES, now in flows/stages.py) must not survive
    in a function-level import that only fails when that code path runs: in realm_core, flows,
    tasks, bench and tests, every `from <our module> import name` names a definition or a submodule."""
    modules = _modules()
    defined = {m: _defined_names(p) for m, p in modules.items()}
    files = [*modules.values(), *sorted((ROOT / "bench").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py"))]
    missing = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in defined:
                for alias in node.names:
                    if alias.name != "*" and alias.name not in defined[node.module]:
                        if f"{node.module}.{alias.name}" not in modules:
                            missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{alias.name}")
    assert not missing, f"imports of names that do not exist: {missing}"
