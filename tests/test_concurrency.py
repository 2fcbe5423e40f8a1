"""Two pipeline runs at once (issue 6, part 4): separate, complete MLflow runs; an intact SQLite store.

Two processes, each a workspace of its own with other params (as two `realm run` in separate
checkouts, or two `dvc exp run --queue` workers), open a parent run and nested stage runs through
flows/tracking.py on the same, new SQLite store at the same moment and log per-step metrics.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STEPS = 250  # more than StepRecorder.flush_every: each stage logs in several batches
STAGES = ("ict", "finetune")

PIPELINE = f"""
import sys, time
from pathlib import Path
from flows import tracking

root = Path(sys.argv[1])
client = tracking.tracking_client()  # what pipeline_flow does
experiment_id = tracking.ensure_experiment(client, root)
parent = client.create_run(experiment_id, run_name="pipeline-" + root.name, tags={{"realm.stage": "pipeline"}}).info.run_id
import os
os.environ[tracking.PARENT_RUN_ENV] = parent
for stage in {STAGES!r}:
    with tracking.stage_run(stage, root) as ctx:
        for step in range({STEPS}):
            ctx.log_fn({{"loss": 1.0 / (step + 1), "seed": float(ctx.params.seed)}}, step)
        ctx.set_final({{"seed": ctx.params.seed}})
client.set_terminated(parent, "FINISHED")
print(parent)
"""


def _workspace(tmp_path: Path, name: str, seed: int) -> Path:
    root = tmp_path / name
    root.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seed"] = seed
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_two_pipelines_at_once_keep_separate_complete_runs_in_one_sqlite_store(tmp_path):
    store = tmp_path / "mlruns.db"  # new: both processes also race to create its schema
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "MLFLOW_EXPERIMENT_NAME": "concurrent"}
    env.pop("REALM_MLFLOW_PARENT_RUN_ID", None)
    seeds = {"workspace-a": 101, "workspace-b": 202}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", PIPELINE, str(_workspace(tmp_path, name, seed))],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, seed in seeds.items()
    }
    outputs = {name: p.communicate(timeout=300) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} failed:\n{outputs[name][1][-3000:]}"

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = {outputs[name][0].strip().splitlines()[-1]: name for name in seeds}
    assert len(runs) == len(seeds) * (1 + len(STAGES)) and set(parents) <= {r.info.run_id for r in runs}
    for parent_id, name in parents.items():
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
        assert sorted(r.data.tags["realm.stage"] for r in children) == sorted(STAGES)
        assert client.get_run(parent_id).info.status == "FINISHED"
        for child in children:
            assert child.info.status == "FINISHED"
            assert child.data.params["seed"] == str(seeds[name])  # its own workspace's params, not the other's
            for key in ("loss", "seed"):
                history = client.get_metric_history(child.info.run_id, f"{child.data.tags['realm.stage']}/{key}")
                assert sorted(m.step for m in history) == list(range(STEPS)), (
                    f"{name}/{child.data.tags['realm.stage']}/{key}"
                )
            seed_key = f"{child.data.tags['realm.stage']}/seed"
            assert {m.value for m in client.get_metric_history(child.info.run_id, seed_key)} == {float(seeds[name])}
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from flows.lock import workspace_lock
with workspace_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_realm_run_in_a_held_workspace_refuses_at_once_and_touches_nothing(tmp_path):
    import signal

    from flows.lock import WorkspaceBusy, workspace_lock

    root = _workspace(tmp_path, "workspace", 13)
    before = (root / "params.yaml").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # the first run holds the workspace
        env = {k: v for k, v in os.environ.items() if k != "REALM_MLFLOW_PARENT_RUN_ID"}
        second = subprocess.run(
            [str(Path(sys.executable).with_name("realm")), "run", "-S", "finetune.lr=8e-5"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode != 0
        assert f"pid {holder.pid}" in second.stderr + second.stdout and "--temp" in second.stderr + second.stdout
        assert "Traceback" not in second.stderr
        assert (root / "params.yaml").read_bytes() == before  # the holder's params are intact
        assert not (root / "mlruns.db").exists()  # refused before any run was recorded
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops an flock with its holder, even on SIGKILL
        holder.wait()
    with workspace_lock(root):  # free again: no stale lock after a crash
        with pytest.raises(WorkspaceBusy, match=f"pid {os.getpid()}"):
            with workspace_lock(root):
                pass
