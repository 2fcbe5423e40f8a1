"""Resuming a killed stage, on the MLflow side.

A SIGKILLed stage process cannot mark its own MLflow run: the run stays RUNNING forever. The
next attempt of the stage finds such runs (same stage, RUNNING, their process gone), marks them
KILLED and, when its own workspace holds checkpoints of the killed attempt (runs/<stage>/,
realm_core/checkpoint.py), links to it with the tags `resumed_from` and `resumed_at_step`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import psutil
from mlflow import MlflowClient
from mlflow.entities import Run

from realm_core.paths import Paths

RESUMED_BY = "realm.resumed_by"  # on a killed run: the attempt that took it up


def process_tags(root: Path) -> dict[str, str]:
    """Who runs this stage, where: a later attempt uses them to tell a killed run from a live one."""
    return {
        "realm.host": socket.gethostname(),
        "realm.pid": str(os.getpid()),
        "realm.pid_started": repr(psutil.Process().create_time()),
        "realm.root": str(root.resolve()),
    }


def process_gone(tags: dict[str, str]) -> bool:
    """True when the run's process (same host) no longer exists, is a zombie or its pid was reused."""
    if tags.get("realm.host") != socket.gethostname() or not tags.get("realm.pid", "").isdigit():
        return False  # another machine, or a run from before these tags: cannot tell
    try:
        proc = psutil.Process(int(tags["realm.pid"]))
        return (
            proc.status() == psutil.STATUS_ZOMBIE
            or abs(proc.create_time() - float(tags.get("realm.pid_started", "0"))) > 1.0
        )
    except psutil.NoSuchProcess:
        return True


def stale_runs(client: MlflowClient, experiment_id: str, stage: str | None = None) -> list[Run]:
    """Runs (of `stage`, or any: pipeline parents and stages) still RUNNING whose process is gone, newest first."""
    query = "attributes.status = 'RUNNING'" + (f" and tags.`realm.stage` = '{stage}'" if stage else "")
    runs = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])
    return [r for r in runs if process_gone(r.data.tags)]


def close_stale_runs(client: MlflowClient, experiment_id: str, stage: str | None = None) -> list[Run]:
    """Mark KILLED the runs still RUNNING whose process is gone (stale_runs), newest first.

    A SIGKILLed process cannot mark its own run, so whatever `realm` command opens the store next
    does it (`realm run`, `realm stage`, `realm runs --stale`); the stage's next attempt then links
    to it (link_resumed_run), whoever closed it.
    """
    gone = stale_runs(client, experiment_id, stage)
    for r in gone:
        client.set_terminated(r.info.run_id, "KILLED")
    return gone


def earlier_rows(
    client: MlflowClient, run_id: str, prefix: str = "", max_links: int = 20
) -> dict[int, dict[str, float]]:
    """Per-step metrics of `run_id` and the attempts it resumed from, oldest overwritten by newest:
    the metrics named `prefix` + key (the stage's own, flows/tracking.metric_key), as bare keys;
    system metrics and final values are not steps of the curve."""
    chain: list[Run] = []
    while run_id and len(chain) < max_links:
        chain.append(client.get_run(run_id))
        run_id = chain[-1].data.tags.get("resumed_from", "")
    rows: dict[int, dict[str, float]] = {}
    for run in reversed(chain):
        for key in run.data.metrics:
            bare = key.removeprefix(prefix)
            if not key.startswith(prefix) or bare.startswith("final_") or "/" in bare:
                continue
            for m in client.get_metric_history(run.info.run_id, key):
                rows.setdefault(m.step, {})[bare] = m.value
    return rows


def link_resumed_run(
    client: MlflowClient, experiment_id: str, stage: str, paths: Paths, run_id: str, prefix: str
) -> dict[int, dict[str, float]]:
    """Close the runs of killed attempts of `stage` and link its run `run_id` to the newest one.

    Tags `resumed_from` (that run's id) and `resumed_at_step`: the step of the newest checkpoint in
    runs/<stage>/ ("<loop>:<step>,..." for a stage with several loops; 0 = nothing to resume; the
    loop still discards a checkpoint made with other params or inputs). When resuming, the
    earlier attempts' per-step rows (metric names under `prefix`) are returned, for the caller's
    recorder to preload so the curve and final metrics are complete; {} when nothing resumes.
    """
    root = str(paths.root.resolve())
    close_stale_runs(client, experiment_id, stage)
    mine = [  # this stage's earlier attempts in this workspace, newest first
        r
        for r in client.search_runs(
            [experiment_id],
            filter_string=f"tags.`realm.stage` = '{stage}' and attributes.status != 'RUNNING'",
            order_by=["attributes.start_time DESC"],
        )
        if r.data.tags.get("realm.root") == root and r.info.run_id != run_id
    ]
    last_done = next((i for i, r in enumerate(mine) if r.info.status == "FINISHED"), len(mine))
    # the killed attempts since the last finished one that no later attempt has taken up yet
    killed = [r for r in mine[:last_done] if r.info.status == "KILLED" and RESUMED_BY not in r.data.tags]
    if not killed:  # checkpoints live in the workspace: only an attempt in this one is resumed
        return {}
    for r in killed:  # taken up once: a later attempt never links to it again
        client.set_tag(r.info.run_id, RESUMED_BY, run_id)
    from realm_core.checkpoint import resume_points  # imports torch: only when there is something to resume

    points = resume_points(paths.scratch(stage))
    at = (
        str(next(iter(points.values())))
        if len(points) == 1
        else ",".join(f"{k}:{v}" for k, v in sorted(points.items())) or "0"
    )
    client.set_tag(run_id, "resumed_from", killed[0].info.run_id)
    client.set_tag(run_id, "resumed_at_step", at)
    return earlier_rows(client, killed[0].info.run_id, prefix) if points else {}
