"""The `realm` command line.

    realm run [-S finetune.lr=3e-5] [--force]   the pipeline flow (dvc repro / dvc exp run)
    realm stage pretrain                        one stage's flow (what dvc.yaml's cmd runs)
    torchrun --nproc_per_node 2 -m flows.cli train pretrain   a training stage on 2 processes (DDP)
    realm serve --cron "0 3 * * *"              serve the pipeline on a schedule (Prefect)
    realm ui [--tool prefect]                   MLflow (or Prefect) UI on 127.0.0.1
    realm plots                                 dvc.yaml's plots as PNGs + dvc_plots/offline.html (no internet)
    realm ask "who wrote hamlet?" [--json]      answer + retrieved evidence (latest fine-tuned model)
    realm ask "..." --model models:/realm@champion   the same from the MLflow registry (evaluate's best model)
    realm serve-api [--port 8000]               the same over HTTP (POST /ask) on 127.0.0.1
    realm index add new.jsonl | remove --ids X  add / remove passages without retraining (data/knowledge)

Heavy libraries (torch, mlflow, prefect) are imported inside the commands, so `--help`
stays fast (DESIGN.md 3b).
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from flows.env import configure
from flows.stages import STAGES, TRAINING_STAGES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=f"REALM pipeline: {' -> '.join(STAGES)}.",
)


Stage = Enum("Stage", {name: name for name in STAGES}, type=str)  # the registry's (flows/stages.py)


class Tool(str, Enum):
    mlflow = "mlflow"
    prefect = "prefect"


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _interrupted(exc: KeyboardInterrupt) -> None:
    """Ctrl-C or SIGTERM (flows/procs.interrupt_on_sigterm): one line, exit 130 as a shell would."""
    typer.secho(f"error: interrupted ({str(exc) or 'Ctrl-C'}); children stopped", fg=typer.colors.RED, err=True)
    raise typer.Exit(130)


def _user_errors():
    from realm_core.config import ParamsError
    from realm_core.io import InputError

    return (ParamsError, InputError)


def _no_traceback_for_user_errors(record) -> bool:
    """Prefect logs a failed flow's exception with its traceback; for bad input (InputError,
    ParamsError) the message already names the file, line and fix, so drop the traceback."""
    if record.exc_info and isinstance(record.exc_info[1], _user_errors()):
        record.exc_info, record.exc_text = None, None
    return True


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
    set_params: Annotated[
        list[str] | None,
        typer.Option("-S", "--set-param", help="section.key=value; makes a DVC experiment (dvc exp run -S)"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="rerun every stage even if up to date")] = False,
    name: Annotated[str | None, typer.Option("--name", help="experiment name (implies dvc exp run)")] = None,
    temp: Annotated[
        bool, typer.Option("--temp", help="run the experiment in a temporary copy; the workspace stays as it is")
    ] = False,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile", help="profiles/<name>.yaml: its keys become -S overrides (a DVC experiment), e.g. quality"
        ),
    ] = None,
) -> None:
    """Run the pipeline: only stale stages run (DVC), one MLflow parent run, a nested run per stage."""
    root = configure()
    from contextlib import nullcontext

    from flows.lock import WorkspaceBusy, workspace_lock
    from flows.pipeline import (
        PipelineError,
        check_overrides,
        pipeline_flow,
        profile_overrides,
        run_label,
        up_to_date,
    )
    from flows.procs import interrupt_on_sigterm, prefect_api

    interrupt_on_sigterm()
    try:
        # before anything touches params.yaml; --temp works in a copy of the workspace
        with nullcontext() if temp else workspace_lock(root):
            set_params = [
                *(profile_overrides(root, profile) if profile else []),
                *(set_params or []),
            ]  # an explicit -S wins
            check_overrides(root / "params.yaml", set_params)  # fail before Prefect starts
            if not (set_params or name or force or temp) and up_to_date(root):
                typer.echo(
                    "Nothing to do: every stage is up to date (dvc status), so no run was recorded.\n"
                    "Results: dvc metrics show | rerun everything: realm run --force"
                )
                return
            run_name = run_label(name)
            with prefect_api():  # stops last, after DVC and its stages (flows/procs.py)
                result = pipeline_flow.with_options(flow_run_name=f"pipeline · {run_name}")(
                    set_params=set_params, force=force, name=name, root=str(root), temp=temp, run_name=run_name
                )
    except (*_user_errors(), PipelineError, WorkspaceBusy) as exc:
        _fail(str(exc))
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    _print_summary(result)


@app.command()
def stage(name: Annotated[Stage, typer.Argument(help="the stage to run")]) -> None:
    """Run one stage's Prefect flow in this directory (the `cmd` of each dvc.yaml stage)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # every torchrun process would run the whole flow
        _fail(
            f"`realm stage` runs a Prefect flow in one process; under torchrun use `torchrun ... -m flows.cli train {name.value}`"
        )
    root = configure()
    import importlib
    import logging

    from flows.procs import end_with_dvc, interrupt_on_sigterm, prefect_api
    from realm_core.config import load_params
    from realm_core.paths import backbone_dir

    if os.environ.get("DVC_STAGE"):  # started by DVC: end with it, even if it is SIGKILLed
        end_with_dvc()
    interrupt_on_sigterm()

    try:  # bad params or a non-BERT backbone: one message, before Prefect starts a server
        backbone_dir(load_params(root / "params.yaml").model.backbone, root)
    except _user_errors() as exc:
        _fail(str(exc))
    flow_fn = getattr(importlib.import_module(f"flows.{name.value}"), f"{name.value}_flow")
    for logger in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(logger).addFilter(_no_traceback_for_user_errors)
    from prefect import tags

    from flows.tracking import stage_flow_labels

    run_name, labels = stage_flow_labels(name.value)
    try:
        with prefect_api(), tags(*labels):  # this stage's own temporary server when no run shares one; stops last
            final = flow_fn.with_options(flow_run_name=run_name)()
    except _user_errors() as exc:
        _fail(str(exc))
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    typer.echo(" ".join(f"{k}={v:.4g}" for k, v in final.items()))


TrainingStage = Enum("TrainingStage", {name: name for name in TRAINING_STAGES}, type=str)


@app.command()
def train(name: Annotated[TrainingStage, typer.Argument(help="the training stage to run")]) -> None:
    """Run a training stage without Prefect, for torchrun: `torchrun --nproc_per_node 2 -m flows.cli train pretrain`.

    Same outputs, metrics and MLflow run as `realm stage <name>` (rank 0 writes them); then
    `dvc commit <name>` records them. One process without torchrun works too (flows/train.py).
    """
    root = configure()
    from flows.procs import interrupt_on_sigterm
    from flows.train import train_stage

    interrupt_on_sigterm()
    try:
        final = train_stage(name.value, root)
    except _user_errors() as exc:
        _fail(str(exc))
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    if final:
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
        _fail(
            "schedules need a Prefect server: run `realm ui --tool prefect` in another shell, then "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` and retry"
        )
    from prefect import serve as prefect_serve

    from flows.pipeline import scheduled_deployment

    prefect_serve(scheduled_deployment(cron, deployment))


@app.command()
def runs(
    stale: Annotated[
        bool, typer.Option("--stale", help="list the runs left RUNNING by a dead process and mark them KILLED")
    ] = False,
) -> None:
    """MLflow runs of this project; with --stale, close the ones whose process died (e.g. by SIGKILL)."""
    if not stale:
        _fail("say what to list: `realm runs --stale` (browse all runs with `realm ui`)")
    root = configure()
    from flows.resume import close_stale_runs
    from flows.tracking import ensure_experiment, tracking_client

    client = tracking_client()
    closed = close_stale_runs(client, ensure_experiment(client, root))
    for run in closed:
        tags = run.data.tags
        typer.echo(
            f"KILLED {run.info.run_id}  {tags.get('realm.stage', '?'):9} {run.info.run_name}  (pid {tags.get('realm.pid')} is gone)"
        )
    typer.echo(f"{len(closed)} stale run(s) closed")


def _listed(value) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def plot_definitions(root) -> list[dict]:
    """dvc.yaml's plots, top-level first, then each stage's: {id, title, x_label, y_label, series},
    each series a (file, x field, y field). The subset of DVC's plot syntax that dvc.yaml uses."""
    import yaml

    config = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    items = [*config.get("plots", [])]
    items += [item for stage in config.get("stages", {}).values() for item in stage.get("plots", [])]
    out = []
    for item in items:
        plot_id, props = (item, {}) if isinstance(item, str) else next(iter(item.items()))
        props = props or {}
        x, y = props.get("x"), props.get("y")
        files = y if isinstance(y, dict) else {plot_id: y}  # else the plot id is the file
        series = [
            (file, x.get(file) if isinstance(x, dict) else x, field)
            for file, fields in files.items()
            for field in _listed(fields)
        ]
        name = plot_id if isinstance(y, dict) else Path(plot_id).stem  # the PNG's name
        out.append(
            {
                "id": plot_id,
                "name": name,
                "series": series,
                **{k: props.get(k) for k in ("title", "x_label", "y_label")},
            }
        )
    return out


def read_series(root, file: str, x: str | None, y: str) -> tuple[list[float], list[float]] | None:
    """(xs, ys) of the rows where the y cell is not empty (None if the file or the field is missing);
    x None is the row index, as in DVC."""
    import csv

    path = root / file
    if not path.is_file():
        return None
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    if not rows or y not in rows[0] or (x is not None and x not in rows[0]):
        return None
    kept = [(i if x is None else float(r[x]), float(r[y])) for i, r in enumerate(rows) if r[y] and (x is None or r[x])]
    return [p[0] for p in kept], [p[1] for p in kept]


def render_plots(root, out) -> list:
    """One PNG per plot of dvc.yaml into `out`, and `out`/offline.html showing them all (no scripts)."""
    import html
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written, sections = [], []
    for plot in plot_definitions(root):
        drawn, missing = [], []
        for series in plot["series"]:
            data = read_series(root, *series)
            if data and data[0]:
                drawn.append((series, data))
            else:
                missing.append(f"{series[0]}:{series[2]}")
        if missing or not plot["series"]:
            typer.echo(f"{plot['id']}: no data for {', '.join(missing) or 'it (no y field declared)'}", err=True)
        if not drawn:
            continue
        files = {s[0] for s, _ in drawn}
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for (file, _, field), (xs, ys) in drawn:
            label = f"{Path(file).stem.removesuffix('_curve')}: {field}" if len(files) > 1 else field
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=4, label=label)
        ax.set_title(plot["title"] or plot["id"], fontsize=10)
        ax.set_xlabel(plot["x_label"] or drawn[0][0][1] or "index")
        ax.set_ylabel(plot["y_label"] or (drawn[0][0][2] if len(drawn) == 1 else ""))
        if len(drawn) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        png = out / (re.sub(r"[^\w.-]+", "_", plot["name"]) + ".png")
        fig.savefig(png, dpi=100)
        plt.close(fig)
        written.append(png)
        sections.append(f"<h2>{html.escape(plot['id'])}</h2>\n<img src='{png.name}' alt='{html.escape(plot['id'])}'>")
    page = "<!doctype html>\n<meta charset='utf-8'>\n<title>realm curves</title>\n" + "\n".join(sections) + "\n"
    (out / "offline.html").write_text(page, encoding="utf-8")
    return written


@app.command()
def plots(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="folder for the PNGs and offline.html (default: dvc_plots/ in the project)"),
    ] = None,
) -> None:
    """The plots of dvc.yaml (metrics/<stage>_curve.tsv) as PNGs and one offline.html, no internet needed;
    empty cells are skipped, never drawn as 0. `dvc plots show` draws the same plots with vega from a CDN."""
    from flows.env import project_root

    root = project_root()
    written = render_plots(root, out or root / "dvc_plots")
    if not written:
        _fail("no curve files to plot: the training stages write metrics/<stage>_curve.tsv (`realm run`)")
    for png in written:
        typer.echo(png)
    typer.echo(f"open {written[0].parent / 'offline.html'}")


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
        argv = [
            os.path.join(bindir, "mlflow"),
            "server",
            "--backend-store-uri",
            os.environ["MLFLOW_TRACKING_URI"],
            "--host",
            host,
            "--port",
            str(port or 5000),
            "--workers",
            "1",
        ]
    else:
        argv = [os.path.join(bindir, "prefect"), "server", "start", "--host", host, "--port", str(port or 4200)]
    typer.echo(" ".join(argv))
    os.execv(argv[0], argv)


MODEL_HELP = (
    "an MLflow model to answer with instead of data/finetune, e.g. models:/realm@champion (evaluate's best), "
    "models:/realm/3 or runs:/<run id>/realm_qa"
)


def _load_answerer(root, model_uri: str | None = None):
    """The project's latest fine-tuned model (data/finetune), or the logged model at `model_uri`."""
    from realm_core.answer import Answerer

    try:
        if model_uri is None:
            return Answerer.from_project(root)
        from mlflow.exceptions import MlflowException

        from flows.env import configure
        from flows.registry import load_answerer

        configure(
            root
        )  # models:/ URIs resolve in the project's registry (mlruns.db) unless MLFLOW_TRACKING_URI says otherwise

        try:
            return load_answerer(model_uri)
        except (MlflowException, OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _fail(
                f"--model {model_uri}: cannot load it ({first}); the finetune stage registers models:/realm/<version> "
                "and evaluate moves models:/realm@champion (`realm runs` lists the runs)"
            )
    except _user_errors() as exc:
        _fail(str(exc))


def _print_answer(answer) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{answer.answer}[/bold]  (score {answer.score:.3f}, from block {answer.block_id}: {answer.block_title})"
    )
    table = Table(title=f"top {len(answer.evidence)} retrieved blocks for: {answer.question}")
    for col, justify in (
        ("rank", "right"),
        ("block", "right"),
        ("title", "left"),
        ("f(x,z)", "right"),
        ("p(z|x)", "right"),
        ("text", "left"),
    ):
        table.add_column(col, justify=justify)
    for e in answer.evidence:
        mark = " *" if e.block_id == answer.block_id else ""
        snippet = e.text if len(e.text) <= 120 else e.text[:117] + "..."
        table.add_row(f"{e.rank}{mark}", str(e.block_id), e.title, f"{e.score:.3f}", f"{e.probability:.3f}", snippet)
    console.print(table)
    console.print("* the block the answer span comes from; p(z|x) is the softmax of f(x,z) over the blocks listed")


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="the question, e.g. 'who wrote the nutcracker ballet?'")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="how many retrieved blocks to show")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object (for scripts)")] = False,
    model: Annotated[str | None, typer.Option("--model", help=MODEL_HELP)] = None,
) -> None:
    """Answer a question with the latest fine-tuned model and show the blocks it retrieved, with their scores."""
    import json

    from flows.env import project_root
    from realm_core.answer import check_question

    try:
        check_question(question, top_k)  # before the model loads (~15 s)
    except _user_errors() as exc:
        _fail(str(exc))
    answerer = _load_answerer(project_root(), model)
    try:
        answer = answerer(question, top_k)
    except _user_errors() as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(answer.to_dict(), ensure_ascii=False))
    else:
        _print_answer(answer)


index_app = typer.Typer(
    help="Change what the fine-tuned model retrieves without retraining: add or remove passages (data/knowledge)."
)
app.add_typer(index_app, name="index")


@index_app.command("add")
def index_add(
    file: Annotated[
        Path, typer.Argument(help="passages to add: a DPR .tsv (id, text, title) or a .jsonl of {id, title, text}")
    ],
) -> None:
    """Pack FILE's passages into blocks, embed them with the frozen document tower and add them to the index."""
    from flows import knowledge
    from flows.env import project_root

    try:
        typer.echo(knowledge.add(project_root(), file))
    except _user_errors() as exc:
        _fail(str(exc))


@index_app.command("remove")
def index_remove(
    ids: Annotated[str, typer.Option("--ids", help="comma-separated passage ids (the corpus's or added ones)")],
) -> None:
    """Take passages out of what the model retrieves (their blocks leave the index)."""
    from flows import knowledge
    from flows.env import project_root

    wanted = [i.strip() for i in ids.split(",") if i.strip()]
    if not wanted:
        _fail("--ids: give at least one passage id, e.g. --ids 'Mozart,Vienna'")
    try:
        typer.echo(knowledge.remove(project_root(), wanted))
    except _user_errors() as exc:
        _fail(str(exc))


@index_app.command("list")
def index_list() -> None:
    """The passages added and removed so far."""
    from flows import knowledge
    from flows.env import project_root

    try:
        typer.echo(knowledge.describe(project_root()))
    except _user_errors() as exc:
        _fail(str(exc))


@app.command("serve-api")
def serve_api(
    host: Annotated[str, typer.Option(help="bind address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    model: Annotated[str | None, typer.Option("--model", help=MODEL_HELP)] = None,
) -> None:
    """Serve GET /health and POST /ask {"question", "top_k"} (the JSON of `realm ask --json`) over HTTP."""
    from flows.env import project_root

    answerer = _load_answerer(project_root(), model)  # once, before binding: a missing model is one clear error
    import uvicorn

    from flows.api import create_app

    uvicorn.run(create_app(answerer), host=host, port=port)


BENCHES = ("quality", "ablations", "pretrain_scan", "index", "throughput", "embed_runners", "mechanics", "api_load")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help=f"one of: {', '.join(BENCHES)}")] = None,
) -> None:
    """Run a benchmark script bench/<name>.py (extra arguments, e.g. --quick, are passed on); it prints a table and writes bench/results/.

    `realm bench NAME --help` shows that benchmark's own options."""
    import subprocess
    import sys

    from flows.env import project_root

    if name is None or name in (
        "--help",
        "-h",
    ):  # the help option is the script's, so `realm bench quality --help` reaches it
        typer.echo(ctx.get_help())
        raise typer.Exit(0 if name else 2)
    if name not in BENCHES:
        _fail(f"unknown benchmark {name!r}; choose one of: {', '.join(BENCHES)}")
    root = project_root()
    raise typer.Exit(subprocess.call([sys.executable, str(root / "bench" / f"{name}.py"), *ctx.args], cwd=root))


if __name__ == "__main__":
    app()
