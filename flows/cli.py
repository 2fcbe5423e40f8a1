"""The `realm` command line.

    realm run [-S finetune.lr=3e-5] [--force]   the pipeline flow (dvc repro / dvc exp run)
    realm stage pretrain                        one stage's flow (what dvc.yaml's cmd runs)
    realm serve --cron "0 3 * * *"              serve the pipeline on a schedule (Prefect)
    realm ui [--tool prefect]                   MLflow (or Prefect) UI on 127.0.0.1

Heavy libraries (torch, mlflow, prefect) are imported inside the commands, so `--help`
stays fast (DESIGN.md 3b).
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from typing import Annotated

import typer

from flows.env import configure

app = typer.Typer(add_completion=False, no_args_is_help=True, help="REALM pipeline: corpus -> ict -> pretrain -> finetune -> evaluate.")


class Stage(str, Enum):
    corpus = "corpus"
    ict = "ict"
    pretrain = "pretrain"
    finetune = "finetune"
    evaluate = "evaluate"


class Tool(str, Enum):
    mlflow = "mlflow"
    prefect = "prefect"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _user_errors():
    from realm_core.config import ParamsError
    from realm_core.io import InputError

    return (ParamsError, InputError)


def _print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    stages = Table(title="stages")
    for col in ("stage", "status", "mlflow run"):
        stages.add_column(col)
    for row in result["stages"]:
        stages.add_row(row["stage"], row["status"], row["mlflow_run"][:12])
    console.print(stages)
    evaluation = Table(title="evaluation (metrics/evaluate.json)")
    evaluation.add_column("metric")
    evaluation.add_column("value", justify="right")
    for key, value in sorted(result["metrics"].get("evaluate", {}).items()):
        evaluation.add_row(key, f"{value:.4f}")
    console.print(evaluation)
    console.print(
        f"MLflow parent run {result['parent_run_id']} (experiment {result['experiment_id']}).\n"
        "Look at the runs:  realm ui                 -> http://127.0.0.1:5000\n"
        "Prefect flow runs: realm ui --tool prefect  -> http://127.0.0.1:4200\n"
        "Compare with DVC:  dvc metrics show / dvc exp show"
    )


@app.command()
def run(
    set_params: Annotated[list[str] | None, typer.Option("-S", "--set-param", help="section.key=value; makes a DVC experiment (dvc exp run -S)")] = None,
    force: Annotated[bool, typer.Option("--force", help="rerun every stage even if up to date")] = False,
    name: Annotated[str | None, typer.Option("--name", help="experiment name (implies dvc exp run)")] = None,
    temp: Annotated[bool, typer.Option("--temp", help="run the experiment in a temporary copy; the workspace stays as it is")] = False,
) -> None:
    """Run the pipeline: only stale stages run (DVC), one MLflow parent run, a nested run per stage."""
    root = configure()
    from flows.pipeline import PipelineError, check_overrides, pipeline_flow

    try:
        check_overrides(root / "params.yaml", set_params or [])  # fail before Prefect starts
        result = pipeline_flow(set_params=set_params or [], force=force, name=name, root=str(root), temp=temp)
    except (*_user_errors(), PipelineError) as exc:
        _fail(str(exc))
    _print_summary(result)


@app.command()
def stage(name: Annotated[Stage, typer.Argument(help="the stage to run")]) -> None:
    """Run one stage's Prefect flow in this directory (the `cmd` of each dvc.yaml stage)."""
    configure()
    import importlib

    flow_fn = getattr(importlib.import_module(f"flows.{name.value}"), f"{name.value}_flow")
    try:
        final = flow_fn()
    except _user_errors() as exc:
        _fail(str(exc))
    typer.echo(" ".join(f"{k}={v:.4g}" for k, v in final.items()))


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help="cron schedule, e.g. '0 3 * * *' for 03:00 every night")] = "0 3 * * *",
    deployment: Annotated[str, typer.Option(help="deployment name")] = "nightly",
) -> None:
    """Serve the pipeline flow on a schedule (Prefect flow.serve); needs a running Prefect server."""
    configure()
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        _fail("schedules need a Prefect server: run `realm ui --tool prefect` in another shell, then "
              "`export PREFECT_API_URL=http://127.0.0.1:4200/api` and retry")
    from prefect import serve as prefect_serve

    from flows.pipeline import scheduled_deployment

    prefect_serve(scheduled_deployment(cron, deployment))


@app.command()
def ui(
    tool: Annotated[Tool, typer.Option(help="which UI")] = Tool.mlflow,
    host: Annotated[str, typer.Option(help="bind address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="port (default 5000 for MLflow, 4200 for Prefect)")] = None,
) -> None:
    """Start the MLflow UI over the project's run store, or the Prefect UI over its local database."""
    configure()
    bindir = os.path.dirname(sys.executable)
    if tool is Tool.mlflow:
        # One worker and no job execution: 2 processes and 0.5 GB instead of ~15 and 3 GB (DESIGN.md 3b).
        os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        argv = [os.path.join(bindir, "mlflow"), "server", "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"],
                "--host", host, "--port", str(port or 5000), "--workers", "1"]
    else:
        argv = [os.path.join(bindir, "prefect"), "server", "start", "--host", host, "--port", str(port or 4200)]
    typer.echo(" ".join(argv))
    os.execv(argv[0], argv)


if __name__ == "__main__":
    app()
