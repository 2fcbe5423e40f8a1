"""The pipeline flow: run what is stale through DVC, under one MLflow parent run.

    realm run                            # dvc repro: only stale stages run
    realm run -S finetune.lr=3e-5        # dvc exp run -S ...: an experiment
    realm serve --cron "0 3 * * *"       # the same flow on a schedule (needs a Prefect server)

DVC is the only DAG (DESIGN.md 2): this flow never lists the stages itself. It opens the
MLflow parent run, hands its id to the stage processes through the environment, runs
`dvc repro` (or `dvc exp run`), then publishes which stages ran as a Prefect table artefact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric
from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, ValidationError

from flows.env import project_root
from flows.procs import run_child
from flows.resume import close_stale_runs, process_tags
from flows.stages import PIPELINE_NOTE, STAGES
from flows.tracking import (
    MEMORY_KEYS,
    PARENT_RUN_ENV,
    PIPELINE_FLOW_RUN_ENV,
    PIPELINE_NAME_ENV,
    ensure_experiment,
    git_commit,
    log_params,
    metric_key,
    prefect_flow_run_id,
    system_metrics,
    tracking_client,
)
from realm_core.config import Params, ParamsError, flatten, load_params
from realm_core.paths import Paths, backbone_dir


class PipelineError(RuntimeError):
    """DVC exited non-zero; the stage's own error is printed above."""


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _expected(annotation, metadata=()) -> str:
    """What a params field takes, in words: "a number (float) > 0", "one of 'a', 'b'", "..., or null"."""
    from types import NoneType, UnionType
    from typing import Literal, Union, get_args, get_origin

    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType) and NoneType in args:
        inner = [a for a in args if a is not NoneType]
        return f"{_expected(inner[0] if len(inner) == 1 else Union[tuple(inner)], metadata)}, or null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a section of keys (a mapping)"
    words = {bool: "true or false (bool)", int: "an integer (int)", float: "a number (float)", str: "a string (str)"}
    text = words.get(annotation) or (f"a list ({annotation})" if origin is list else str(annotation))
    bounds = [f"{op} {getattr(m, k)}" for m in metadata for k, op in _BOUNDS.items() if getattr(m, k, None) is not None]
    return " ".join([text, " and ".join(bounds)]) if bounds else text


def _override_errors(exc, overrides: list[str]) -> str:
    """A pydantic ValidationError of params + overrides as one line: each bad -S with what its key takes."""
    keys = [item.partition("=")[0].split(".") for item in overrides]
    found = {}
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        model, info = Params, None  # the deepest params field on the error's path
        for part in loc:
            if not (isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields):
                break
            info = model.model_fields[part]
            model = info.annotation
        matches = [i for i, key in enumerate(keys) if key == loc[: len(key)]]
        if err["type"] == "value_error":  # a validator's own message says what is wrong
            detail = err["msg"].removeprefix("Value error, ")
        elif info is not None:
            detail = f"expected {_expected(info.annotation, info.metadata)}"
        else:
            detail = f"{'.'.join(loc)}: {err['msg']}"
        where = matches[-1] if matches else len(overrides)  # the last -S of a key wins
        label = f"-S {overrides[where]}" if matches else "-S " + " -S ".join(overrides)
        found.setdefault((where, label), []).append(detail)
    return "; ".join(f"{label}: {', '.join(dict.fromkeys(details))}" for (_, label), details in sorted(found.items()))


def check_overrides(params_file: Path, overrides: list[str]) -> Params:
    """Validate params.yaml and the `-S key=value` overrides on it before DVC sees them, and the
    backbone they name (its config.json must be a BERT's); return the params a run would use.

    A bad value is one line naming the override and what its key takes, e.g.
    `-S finetune.lr=abc: expected a number (float) > 0`."""
    load_params(params_file)
    raw = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    known = set(flatten(Params().model_dump()))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ParamsError(
                f"-S {item!r}: expected section.key=value with a key of params.yaml, e.g. -S finetune.lr=3e-5"
            )
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ParamsError(f"-S {item}: the value is not valid YAML") from None
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_override_errors(exc, overrides)) from None
    backbone_dir(params.model.backbone, params_file.parent)  # InputError before any stage runs
    return params


PROFILES_DIR = "profiles"


def profile_overrides(root: Path, name: str) -> list[str]:
    """`profiles/<name>.yaml` (the sections of params.yaml, only the keys that differ) as
    `section.key=value` overrides: a profile runs as a DVC experiment, versioned like any -S."""
    path = root / PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (root / PROFILES_DIR).glob("*.yaml"))
        raise ParamsError(
            f"{path}: no such profile; the profiles are {', '.join(known) or 'none'} (files in {root / PROFILES_DIR})"
        )
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ParamsError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML ({exc})") from None
    if not isinstance(tree, dict):
        raise ParamsError(f"{path}:1: a profile is a mapping of params.yaml sections, got {type(tree).__name__}")
    return [
        f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
        for key, value in flatten(tree).items()
    ]


def dvc_command(overrides: list[str], force: bool, name: str | None, temp: bool = False) -> list[str]:
    """argv for DVC (never a shell string: params values reach DVC as separate arguments).

    `temp` runs the experiment in a temporary copy of the repo (`dvc exp run --temp`), leaving
    the workspace's params, outputs and dvc.lock untouched.
    """
    dvc = [sys.executable, "-m", "dvc"]
    if overrides or name or temp:
        cmd = [*dvc, "exp", "run", *(["--temp"] if temp else []), *(a for o in overrides for a in ("-S", o))]
        if name:
            cmd += ["--name", name]
    else:
        cmd = [*dvc, "repro"]
    return cmd + (["--force"] if force else [])


def up_to_date(root: Path) -> bool:
    """True when `dvc status` finds no stale stage (its exit code; 2-3 s): a `realm run` with
    nothing to do then ends at once and records nothing. Any DVC error counts as stale, so the
    run goes on and reports it."""
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--quiet"], cwd=root, capture_output=True)
    return status.returncode == 0


def stage_environment(parent_run_id: str, run_name: str) -> dict[str, str]:
    """Environment of the DVC process: the parent run id, the pipeline's Prefect flow-run id and
    run name (stage_flow_labels), this venv first on PATH, and the Prefect API of this process (so
    stage flows join the same local server instead of each starting its own)."""
    env = dict(os.environ)
    env[PARENT_RUN_ENV] = parent_run_id
    env[PIPELINE_FLOW_RUN_ENV], env[PIPELINE_NAME_ENV] = prefect_flow_run_id(), run_name
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        if server.running:
            env["PREFECT_API_URL"] = server.api_url
    return env


def stage_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, tuple[str, str]]:
    """stage -> (run id, status) of the runs nested under the parent."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.data.tags.get("realm.stage", "?"): (r.info.run_id, r.info.status) for r in runs}


def read_metrics(root: Path) -> dict[str, dict[str, float]]:
    """Each stage's metrics/<stage>.json, with what its last run cost (metrics/<stage>.resources.json)."""
    out, paths = {}, Paths(root)
    for stage in STAGES:
        if paths.metrics(stage).exists():
            cost = paths.resources(stage)
            out[stage] = {
                **json.loads(paths.metrics(stage).read_text()),
                **(json.loads(cost.read_text()) if cost.exists() else {}),
            }
    return out


def parent_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """What the parent run shows: the evaluation, and the pipeline's peak memory (the stages run one
    after another, so the largest stage's own plus its builder's) instead of evaluate's alone."""
    out = {k: v for k, v in metrics.get("evaluate", {}).items() if k not in MEMORY_KEYS}
    peaks = [m["peak_rss_mb"] + m.get("peak_rss_children_mb", 0.0) for m in metrics.values() if "peak_rss_mb" in m]
    return {**out, **({"pipeline_peak_rss_mb": max(peaks)} if peaks else {})}


def run_label(name: str | None) -> str:
    """A pipeline run's name in MLflow and Prefect: the experiment's name, else pipeline-<time>."""
    return name or f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}"


@flow(name="realm-pipeline", log_prints=True)
def pipeline_flow(
    set_params: list[str] | None = None,
    force: bool = False,
    name: str | None = None,
    root: str | None = None,
    temp: bool = False,
    run_name: str | None = None,
) -> dict:
    """Run the stale stages (or an experiment) through DVC under one MLflow parent run named
    `run_name` (default: the experiment name, else pipeline-<time>; see run_label)."""
    logger = get_run_logger()
    root_dir = project_root(Path(root) if root else None)
    overrides = list(set_params or [])
    check_overrides(root_dir / "params.yaml", overrides)

    client = tracking_client()  # a new SQLite store is created under a lock (two pipelines at once)
    experiment_id = ensure_experiment(client, root_dir)
    for run in close_stale_runs(client, experiment_id):  # runs whose process died (SIGKILL) stay RUNNING otherwise
        logger.warning("marked MLflow run %s (%s) KILLED: its process is gone", run.info.run_id, run.info.run_name)
    tags = {
        "realm.stage": "pipeline",
        "git.commit": git_commit(root_dir),
        "mlflow.source.git.commit": git_commit(root_dir),
        "mlflow.note.content": PIPELINE_NOTE,
        "prefect.flow_run_id": prefect_flow_run_id(),
        "mlflow.source.name": "realm run",
        **process_tags(root_dir),  # so a later command can tell this run's process is gone
    }
    run_name = run_name or run_label(name)
    parent = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    cmd = dvc_command(overrides, force, name, temp)
    client.set_tag(parent, "dvc.command", " ".join(cmd[2:]))
    logger.info("MLflow parent run %s; running: %s", parent, " ".join(cmd[2:]))
    status = "FAILED"
    try:
        # DVC's and the stages' output goes straight to the terminal (live progress bars).
        with system_metrics(parent, client.tracking_uri):  # the whole run's CPU and memory
            returncode = run_child(cmd, root_dir, stage_environment(parent, run_name))  # dies with us (flows/procs.py)
        log_params(client, parent, load_params(root_dir / "params.yaml").flat())  # after `exp run -S`: its values
        children = stage_runs(client, experiment_id, parent)
        table = [
            {
                "stage": s,
                "status": "ran" if s in children else "skipped (up to date)",
                "mlflow_run": children.get(s, ("", ""))[0],
                "mlflow_status": children.get(s, ("", ""))[1],
            }
            for s in STAGES
        ]
        create_table_artifact(
            key="stages", table=table, description=f"Stages of this pipeline run; MLflow parent run {parent}"
        )
        if returncode != 0:
            raise PipelineError(
                f"`{' '.join(cmd[2:])}` exited with {returncode}; the failing stage's error is printed above"
            )
        metrics = read_metrics(root_dir)
        if "evaluate" in children:  # this run's own evaluation (the workspace files predate a --temp run)
            final = client.get_run(children["evaluate"][0]).data.metrics
            own = metric_key("evaluate", "final_")
            metrics["evaluate"] = {k.removeprefix(own): v for k, v in final.items() if k.startswith(own)}
        now = int(time.time() * 1000)
        client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in parent_metrics(metrics).items()])
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        client.set_terminated(parent, status)
    return {"parent_run_id": parent, "experiment_id": experiment_id, "stages": table, "metrics": metrics}


def scheduled_deployment(cron: str, name: str = "nightly"):
    """The pipeline as a Prefect deployment on a cron schedule (what `realm serve` serves)."""
    return pipeline_flow.to_deployment(
        name=name, cron=cron, description="realm run on a schedule: only stale stages run"
    )
