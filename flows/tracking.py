"""MLflow tracking of stage runs: one nested run per stage under the pipeline's parent run.

DESIGN.md 2 ("MLflow owns experiment records"): the pipeline flow opens the parent run and
passes its id to the stage processes in `REALM_MLFLOW_PARENT_RUN_ID`; each stage opens a run
nested under it (a stage run alone opens a top-level run). A stage run holds the params
flattened from params.yaml, per-step metrics, the metrics JSON and a loss-curve plot, and tags
(git commit, Prefect flow-run id, DVC experiment name, the dvc.lock md5 of its outputs).
Every stage's result also holds its peak resident memory (`peak_rss_mb`, `peak_rss_children_mb`).

Everything goes through `MlflowClient` with explicit run ids: MLflow's fluent active run is
thread-local and Prefect may run task code in worker threads (DESIGN.md 2, pitfalls).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException

from flows.env import project_root
from flows.resume import close_stale_runs, link_resumed_run, process_tags
from flows.stages import stage as registered
from realm_core.config import Params, load_params
from realm_core.io import atomic_write_text, write_json
from realm_core.memory import children_peak_rss_mb, peak_rss_mb
from realm_core.paths import Paths

PARENT_RUN_ENV = "REALM_MLFLOW_PARENT_RUN_ID"
# The pipeline's Prefect flow-run id and run name, passed to the stage processes like the parent run id.
PIPELINE_FLOW_RUN_ENV, PIPELINE_NAME_ENV = "REALM_PIPELINE_FLOW_RUN_ID", "REALM_PIPELINE_RUN_NAME"
DEFAULT_EXPERIMENT = "realm-pipeline"
# System metrics (CPU, memory, disk, network; MLflow's "system/" charts) every N seconds of a run.
SYSTEM_METRICS_SECONDS = 10.0


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)


def tracking_client() -> MlflowClient:
    """An MlflowClient; on a SQLite store, made under a file lock next to the database.

    Creating a client creates or migrates a SQLite store's schema, and two processes doing it at
    once fail ("duplicate column name: step"): two pipelines started together on a new store.
    """
    import mlflow
    from filelock import FileLock

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    with FileLock(uri.removeprefix("sqlite:///") + ".lock"):
        return MlflowClient(uri)


def ensure_experiment(client: MlflowClient, root: Path, name: str | None = None) -> str:
    """Id of the project's experiment (or of `name`), created on first use with artefacts under
    <root>/mlartifacts.

    The pipeline calls this before any stage process starts, so concurrent stages never race to
    create it (or to migrate a new SQLite store).
    """
    name = name or experiment_name()
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # stores made before the tag
            client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return existing.experiment_id
    local_store = client.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in client.tracking_uri
    location = (root / "mlartifacts").resolve().as_uri() if local_store else None
    try:
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


# MLflow 3's UI opens an experiment without this tag in GenAI mode (runs shown as "Evaluations",
# a Traces/Judges sidebar); this is model training.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"

BENCH_EXPERIMENT = "realm-bench"


def log_bench_run(
    bench: str, params: dict, metrics: list[Metric], files: list[Path], *, quick: bool, root: Path
) -> str:
    """One finished run of `bench/<bench>.py` in the "realm-bench" experiment: its params, its
    metrics (a step per point of a curve, so the chart view draws it) and its report files."""
    client = tracking_client()
    exp_id = ensure_experiment(client, root, BENCH_EXPERIMENT)
    commit = git_commit(root)
    run = client.create_run(
        exp_id,
        run_name=f"{bench}{'-quick' if quick else ''}-{time.strftime('%m%d-%H%M')}",
        tags={
            "mlflow.source.git.commit": commit,
            "git.commit": commit,
            "mlflow.source.name": f"bench/{bench}.py",
            "bench": bench,
        },
    )
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run.info.run_id, metrics=metrics[i : i + 1000])
    for f in files:
        client.log_artifact(run.info.run_id, str(f))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


# Files the pipeline itself rewrites while it runs: changes to them do not make the code dirty.
PIPELINE_WRITTEN = (":(exclude)dvc.lock", ":(exclude)metrics", ":(exclude,glob)**/.gitignore")


def git_commit(root: Path) -> str:
    """HEAD's commit, with "-dirty" when tracked code or params differ from it ("" outside git)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *PIPELINE_WRITTEN]
        dirty = subprocess.run(status, cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return sha + ("-dirty" if dirty else "")


def dvc_out_md5(path: Path) -> str:
    """The md5 DVC records in dvc.lock for an output (".dir" suffix for directories).

    Computed with dvc-data, the library DVC itself hashes with, so the tag equals dvc.lock.
    """
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    staging = HashFileDB(fs, str(path.parent / f".{path.name}.dvc-staging"))
    _, _, obj = build(staging, str(path), fs, "md5", dry_run=True)
    return obj.hash_info.value


def stage_flow_labels(stage: str) -> tuple[str, list[str]]:
    """(flow-run name, tags) of a stage's Prefect flow run: `pretrain · <experiment or pipeline run
    name>`, and the tags `realm`, `stage:<stage>` and `pipeline:<the pipeline's flow-run id>`, so the
    Prefect UI filters one pipeline's stages. A stage run alone is `pretrain · alone`."""
    label = os.environ.get("DVC_EXP_NAME") or os.environ.get(PIPELINE_NAME_ENV) or "alone"
    pipeline = os.environ.get(PIPELINE_FLOW_RUN_ENV)
    return f"{stage} · {label}", ["realm", f"stage:{stage}", *([f"pipeline:{pipeline}"] if pipeline else [])]


def prefect_flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def metric_key(stage: str, key: str) -> str:
    """A stage run's MLflow name for its metric `key`: "<stage>/<key>", so MLflow's chart view puts
    each stage's metrics in a section of their own ("pretrain/loss" apart from "finetune/loss"; MLflow
    groups by the part before "/", as it does for "system/"). Final values are "<stage>/final_<key>".
    metrics/<stage>.json, the curve TSVs and the parent run keep the bare keys."""
    return f"{stage}/{key}"


class StepRecorder:
    """The StepLogger a stage hands to realm_core: buffers per-step metrics, logs them in batches.

    Thread-safe (Prefect tasks may run in worker threads). Rows are also kept by step so the
    stage can write its curve TSV (for `dvc plots`) and a loss-curve PNG at the end.
    """

    def __init__(self, client: MlflowClient, run_id: str, flush_every: int = 200, prefix: str = ""):
        self.client, self.run_id, self.flush_every = client, run_id, flush_every
        self.prefix = prefix  # MLflow's name of metric k is prefix + k (metric_key); rows and last keep k
        self.rows: dict[int, dict[str, float]] = {}
        self.last: dict[str, float] = {}
        self._pending: list[Metric] = []
        self._lock = threading.Lock()

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        with self._lock:
            self.rows.setdefault(step, {}).update(clean)
            self.last.update(clean)
            self._pending.extend(Metric(self.prefix + k, v, now, step) for k, v in clean.items())
            if len(self._pending) >= self.flush_every:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        while self._pending:  # MLflow accepts at most 1000 metrics per batch
            batch, self._pending = self._pending[:1000], self._pending[1000:]
            self.client.log_batch(self.run_id, metrics=batch)

    def preload(self, rows: dict[int, dict[str, float]]) -> None:
        """Rows an interrupted earlier attempt logged (not re-sent to MLflow): a resumed stage's curve
        and final metrics then cover all steps, as if it had never been interrupted."""
        with self._lock:
            for step in sorted(rows):
                self.rows.setdefault(step, {}).update(rows[step])
                self.last.update(rows[step])

    def columns(self) -> list[str]:
        return sorted({k for row in self.rows.values() for k in row})

    def write_tsv(self, path: Path) -> None:
        """The curve DVC plots and git tracks: timings are left out (is_resource); MLflow has them."""
        cols = [c for c in self.columns() if not is_resource(c)]
        lines = ["\t".join(["step", *cols])]
        for step in sorted(self.rows):
            row = self.rows[step]
            lines.append("\t".join([str(step), *(f"{row[c]:.6g}" if c in row else "" for c in cols)]))
        atomic_write_text(path, "\n".join(lines) + "\n")

    def plot(self, path: Path, title: str) -> None:
        """One panel per metric against the training step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = self.columns()
        fig, axes = plt.subplots(len(cols), 1, figsize=(7, 2.2 * len(cols)), sharex=True, squeeze=False)
        for ax, col in zip(axes[:, 0], cols):
            steps = [s for s in sorted(self.rows) if col in self.rows[s]]
            ax.plot(steps, [self.rows[s][col] for s in steps], marker="." if len(steps) < 30 else None)
            ax.set_ylabel(col, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)


@dataclass
class StageContext:
    """What a stage flow gets from `stage_run`: params, paths and the per-step logger."""

    stage: str
    params: Params
    paths: Paths
    run_id: str
    recorder: StepRecorder
    final: dict[str, float] = field(default_factory=dict)

    @property
    def log_fn(self) -> StepRecorder:
        return self.recorder

    def last_logged(self, keys: list[str]) -> dict[str, float]:
        """The last value logged for each of `keys` that was logged at all."""
        return {k: self.recorder.last[k] for k in keys if k in self.recorder.last}

    def set_final(self, metrics: dict[str, float]) -> None:
        """The stage's result: written to the MLflow run and to metrics/<stage>.json (DVC), with the
        stage's peak memory added on success (`peak_rss_mb`, `peak_rss_children_mb`, realm_core/memory.py);
        those and every timing go to metrics/<stage>.resources.json instead (is_resource)."""
        self.final = {k: float(v) for k, v in metrics.items()}


# Issue 13: the full-corpus default pipeline stays under 8 GB. A stage above it warns (it does not fail).
MEMORY_BUDGET_MB = 8192.0
MEMORY_KEYS = ("peak_rss_mb", "peak_rss_children_mb")


def is_resource(key: str) -> bool:
    """A measurement of cost, not of the model: peak memory and anything timed (`*_seconds`).
    It changes with the load, so it goes to MLflow and metrics/<stage>.resources.json, never to
    the tracked metrics/<stage>.json or curve TSV: the same commit, params and seed then leave
    `git status` clean (issue 16)."""
    return key in MEMORY_KEYS or key.endswith("_seconds")


def split_resources(values: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(the model's metrics, the run's resources) of a stage result."""
    return (
        {k: v for k, v in values.items() if not is_resource(k)},
        {k: v for k, v in values.items() if is_resource(k)},
    )


def _add_peak_memory(ctx: StageContext) -> None:
    """Put the stage's peak resident memory in MB into its result: its own, and the largest its
    children reported (pre-training's index builder; Dask or Ray workers report none;
    realm_core/memory.py says why not getrusage). Warn when the two exceed the budget."""
    memory = dict(zip(MEMORY_KEYS, (peak_rss_mb(), children_peak_rss_mb())))
    ctx.final = {**ctx.final, **memory}
    total = sum(memory.values())  # the builder runs beside the trainer: an upper bound of their peak together
    if total > MEMORY_BUDGET_MB:
        from tasks.training import run_logger

        run_logger().warning(
            "stage %s peaked at %.0f MB resident (%.0f MB itself + %.0f MB its largest child), over the %.0f MB budget",
            ctx.stage,
            total,
            memory["peak_rss_mb"],
            memory["peak_rss_children_mb"],
            MEMORY_BUDGET_MB,
        )


def log_params(client: MlflowClient, run_id: str, flat: dict[str, object]) -> None:
    """Flattened params ("finetune.lr": 3e-05), in batches of MLflow's 100-param limit."""
    batch = [Param(k, str(v)) for k, v in flat.items()]
    for i in range(0, len(batch), 100):
        client.log_batch(run_id, params=batch[i : i + 100])


def _log_datasets(client: MlflowClient, run_id: str, paths: Paths, names: tuple[str, ...], context: str) -> None:
    """The files `names` (Paths attributes) as MLflow datasets of the run, tagged input or output."""
    datasets = []
    for name in names:
        file = getattr(paths, name)
        if file.exists():
            digest = hashlib.md5(file.read_bytes()).hexdigest()
            datasets.append(
                DatasetInput(
                    Dataset(name, digest[:8], "local", str(file.resolve())), [InputTag("mlflow.data.context", context)]
                )
            )
    if datasets:
        client.log_inputs(run_id, datasets=datasets)


@contextmanager
def system_metrics(run_id: str, tracking_uri: str) -> Iterator[None]:
    """MLflow's system metrics (system/cpu_utilization_percentage, system/system_memory_usage_megabytes,
    ...) of the machine, sampled every SYSTEM_METRICS_SECONDS while the block runs (a daemon thread;
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides). A run shorter than one interval gets none."""
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not 4 INFO lines per stage
    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_SECONDS, tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def _finish(client: MlflowClient, ctx: StageContext, out_dir: Path) -> None:
    paths, stage = ctx.paths, ctx.stage
    _add_peak_memory(ctx)  # the stage's work, before the plot and the output hashing below
    metrics_file = paths.metrics(stage)
    model, resources = split_resources(ctx.final)
    write_json(metrics_file, model)
    write_json(paths.resources(stage), resources)
    client.log_batch(
        ctx.run_id,
        metrics=[Metric(metric_key(stage, f"final_{k}"), v, int(time.time() * 1000), 0) for k, v in ctx.final.items()],
    )
    client.log_artifact(ctx.run_id, str(metrics_file))
    client.log_artifact(ctx.run_id, str(paths.resources(stage)))
    if ctx.recorder.rows:
        curve = paths.curve(stage)
        ctx.recorder.write_tsv(curve)
        png = paths.scratch(stage) / f"{stage}_curves.png"
        ctx.recorder.plot(png, f"{stage} (run {ctx.run_id[:8]})")
        client.log_artifact(ctx.run_id, str(curve))
        client.log_artifact(ctx.run_id, str(png))
    _log_datasets(client, ctx.run_id, paths, registered(stage).writes, "output")
    if out_dir.exists():
        rel = out_dir.resolve().relative_to(paths.root.resolve())
        client.set_tag(ctx.run_id, f"dvc.out.{rel.as_posix()}.md5", dvc_out_md5(out_dir))


def stage_paths(root: Path) -> Paths:
    """The stage's paths. DVC runs a --temp or queued experiment in a temporary copy of the
    workspace that is deleted when it ends, so that experiment's resumable state (checkpoints)
    lives in the workspace it came from (DVC_ROOT): runs/exps/<key>/<stage>/, keyed by a
    fingerprint of its params.yaml and baseline commit. A killed experiment requeued with the same
    params resumes, named or not; the stage checkpointer still checks its own fingerprint
    (params and code, tasks/training.stage_fingerprint) before it resumes anything."""
    origin = os.environ.get("DVC_ROOT")
    if not origin or Path(origin).resolve() == Path(root).resolve():
        return Paths(root)
    digest = hashlib.sha256((Path(root) / "params.yaml").read_bytes())
    digest.update(os.environ.get("DVC_EXP_BASELINE_REV", "").encode())
    runs = Path(origin) / "runs" / "exps" / digest.hexdigest()[:16]
    runs.mkdir(parents=True, exist_ok=True)
    name = os.environ.get("DVC_EXP_NAME", "")
    (runs / "experiment.txt").write_text(f"last run as {name or '(unnamed)'} from {root}\n", encoding="utf-8")
    return Paths(root, runs=runs)


@contextmanager
def stage_run(stage: str, root: Path | None = None) -> Iterator[StageContext]:
    """Open the stage's MLflow run; on success write its metrics and artefacts, else mark it failed.

    A KeyboardInterrupt/SIGINT marks the run KILLED, any other exception FAILED, and the
    exception propagates so the stage process exits non-zero and DVC records nothing. A SIGKILLed
    run is marked KILLED by the stage's next attempt, which links to it (`link_resumed_run`).
    On success the stage's resumable state in runs/<stage>/ is deleted: its outputs are saved.
    """
    from tasks.training import stage_params  # torch and the models: only where a stage runs

    info = registered(stage)  # a ValueError for an unknown stage, before anything is created
    root = project_root(root)
    params = load_params(root / "params.yaml")
    paths = stage_paths(root)
    client = tracking_client()
    tags = {
        "realm.stage": stage,
        "git.commit": git_commit(root),
        "mlflow.source.git.commit": git_commit(root),
        "mlflow.note.content": info.note,
        "prefect.flow_run_id": prefect_flow_run_id(),
        "mlflow.source.name": f"realm stage {stage}",
        **process_tags(root),
    }
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    experiment_id = ensure_experiment(client, root)
    close_stale_runs(client, experiment_id)  # any run a dead process left RUNNING (this stage's are linked below)
    run = client.create_run(experiment_id, run_name=stage, tags=tags)
    run_id = run.info.run_id
    ctx = StageContext(stage, params, paths, run_id, StepRecorder(client, run_id, prefix=metric_key(stage, "")))
    status = "FAILED"
    try:
        with system_metrics(run_id, client.tracking_uri):
            ctx.recorder.preload(link_resumed_run(client, experiment_id, stage, paths, run_id, ctx.recorder.prefix))
            # its own sections (the parent has all); every param in a project without dvc.yaml
            own = stage_params(params, root, stage) if (root / "dvc.yaml").exists() else params.flat()
            log_params(client, run_id, own)
            _log_datasets(client, run_id, paths, info.reads, "input")
            yield ctx
            ctx.recorder.flush()
            _finish(client, ctx, getattr(paths, stage))
        status = "FINISHED"
        shutil.rmtree(paths.scratch(stage), ignore_errors=True)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            ctx.recorder.flush()  # keep the curve of a crashed run
        finally:
            client.set_terminated(run_id, status)
