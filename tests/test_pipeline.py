"""End to end: the whole pipeline through `realm run` (Prefect + DVC + MLflow) on a tiny profile.

The project is copied into a fresh git repository with a tiny random BERT and a 40-passage
subsample of the embedded corpus, so every stage does its real job in seconds. The tests run in
order and share that project: first run, nothing stale, one param change, one stage alone, an
experiment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from realm_core.config import Params
from tests.tiny import make_tiny_bert

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ["corpus", "ict", "pretrain", "finetune", "evaluate"]

TINY_PARAMS = {
    "seed": 3,
    "model": {"num_hidden_layers": None, "max_query_tokens": 32},
    "corpus": {"max_passages": 40, "max_block_tokens": 64, "qa_fraction": 0.5, "shards": 2},
    "ict": {"steps": 4, "batch_size": 4, "mlm_warmup_steps": 3, "mlm_batch_size": 4},
    "encoder_warmup": {"steps": 3, "batch_size": 4},
    "pretrain": {"steps": 6, "batch_size": 2, "top_k": 3, "refresh_every": 2, "refresh_mode": "sync", "probe_size": 4},
    "finetune": {"steps": 4, "batch_size": 2, "top_k": 2, "retriever_top_k": 10},
    "evaluate": {"recall_at": [1, 5], "top_k": 2},
}


def _sh(args: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
        )
    return proc


def _git_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of this project as its own git repo, with tiny params and isolated stores."""
    base = tmp_path_factory.mktemp("e2e")
    proj = base / "project"
    for rel in _git_files():
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, proj / rel)
    tiny = dict(TINY_PARAMS, model=dict(TINY_PARAMS["model"], backbone=str(make_tiny_bert(base / "tinybert"))))
    # DVC needs every key a stage tracks written out, so store the full validated params.
    (proj / "params.yaml").write_text(yaml.safe_dump(Params.model_validate(tiny).model_dump(), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DVC_", "REALM_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PREFECT_HOME=str(base / "prefect"),  # its own Prefect database, read back by _prefect_flow_runs
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1",  # the tiny stages last seconds, not minutes
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    for args in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "tiny"]):
        _sh(args, proj, env)
    return proj, env


def _client(proj: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlruns.db'}")


def _runs(proj: Path):
    client = _client(proj)
    exp = client.get_experiment_by_name("realm-pipeline")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _children(runs, parent_id: str) -> dict[str, object]:
    return {r.data.tags["realm.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}


def _prefect_flow_runs(env: dict[str, str], ids: list[str]) -> dict[str, dict]:
    """id -> {name, tags} of the project's Prefect flow runs, read in a process of its own (its own
    temporary API server over the project's PREFECT_HOME)."""
    code = (
        "import json, sys, uuid\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId\n"
        "with get_client(sync_client=True) as c:\n"
        "    runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(i) for i in sys.argv[1:]])))\n"
        "print(json.dumps({str(r.id): {'name': r.name, 'tags': r.tags} for r in runs}))\n"
    )
    out = _sh([sys.executable, "-c", code, *ids], ROOT, env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _lock_md5(proj: Path, stage: str) -> str:
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    return lock["stages"][stage]["outs"][0]["md5"]


def test_first_run_executes_all_five_stages_under_one_parent_run(project):
    proj, env = project
    out = _sh([str(BIN / "realm"), "run"], proj, env)
    assert "exact_match" in out.stdout and "realm ui" in out.stdout

    client, runs = _runs(proj)
    parents = [r for r in runs if r.data.tags.get("realm.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    experiment = client.get_experiment(parents[0].info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not MLflow's GenAI view
    children = _children(runs, parents[0].info.run_id)
    assert sorted(children) == sorted(STAGES)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=proj, capture_output=True, text=True).stdout.strip()
    params = Params.model_validate(yaml.safe_load((proj / "params.yaml").read_text()))
    assert len(parents[0].data.params) == len(params.flat())  # the parent run has every param
    assert any(k.startswith("system/memory") or k.startswith("system/system_memory") for k in parents[0].data.metrics)
    dvc_stages = yaml.safe_load((proj / "dvc.yaml").read_text())["stages"]
    flow_run_ids = set()
    for stage, run in children.items():
        assert run.info.status == "FINISHED", stage
        listed = dvc_stages[stage]["params"]  # a stage run logs the sections dvc.yaml lists for it, no others
        assert run.data.params and all(any(k == p or k.startswith(p + ".") for p in listed) for k in run.data.params)
        assert all(any(k == p or k.startswith(p + ".") for k in run.data.params) for p in listed), stage
        if stage in ("ict", "pretrain", "finetune"):  # MLflow's system metrics (the others end within a sample)
            assert any(k.startswith("system/cpu") for k in run.data.metrics), stage
        assert run.data.tags["git.commit"] == run.data.tags["mlflow.source.git.commit"] == head, stage
        assert run.data.tags["mlflow.note.content"], stage  # the run's description in the UI
        flow_run_ids.add(run.data.tags["prefect.flow_run_id"])
        # the out hash tagged on the run is the one DVC wrote to dvc.lock
        assert run.data.tags[f"dvc.out.data/{stage}.md5"] == _lock_md5(proj, stage), stage
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert f"{stage}.json" in artifacts, stage
        if stage in ("ict", "pretrain", "finetune"):
            assert f"{stage}_curves.png" in artifacts, stage
    assert len(flow_run_ids) == 5 and "" not in flow_run_ids
    # Prefect: each stage's flow run is named after its stage and the pipeline run, and tagged with the
    # pipeline's flow run, so the UI filters one pipeline's stages.
    pipeline_flow_run = parents[0].data.tags["prefect.flow_run_id"]
    flow_runs = _prefect_flow_runs(env, [*flow_run_ids, pipeline_flow_run])
    assert flow_runs[pipeline_flow_run]["name"] == f"pipeline · {parents[0].info.run_name}"
    for stage, run in children.items():
        flow_run = flow_runs[run.data.tags["prefect.flow_run_id"]]
        assert flow_run["name"] == f"{stage} · {parents[0].info.run_name}", flow_run
        assert {"realm", f"stage:{stage}", f"pipeline:{pipeline_flow_run}"} <= set(flow_run["tags"]), flow_run
    corpus_outputs = {d.dataset.name for d in children["corpus"].inputs.dataset_inputs}
    assert corpus_outputs == {"blocks", "qa_train", "qa_dev"}  # logged as the corpus stage's output datasets

    # per-step metrics reached MLflow, including the index refreshes of pre-training
    pre = children["pretrain"].info.run_id
    assert len(client.get_metric_history(pre, "pretrain/loss")) == TINY_PARAMS["pretrain"]["steps"]
    # each stage's metrics under its own name, so MLflow's chart view groups them by stage
    for stage, run in children.items():
        own = {k for k in run.data.metrics if not k.startswith("system/")}
        assert own and all(k.startswith(f"{stage}/") for k in own), (stage, sorted(own)[:5])
    refreshes = client.get_metric_history(pre, "pretrain/refresh_snapshot_step")
    assert sorted(m.value for m in refreshes) == [0, 2, 4]  # the initial index and the refreshes at steps 2 and 4
    assert len(client.get_metric_history(pre, "pretrain/dev_recall_at_5")) == 3  # zero-shot recall of each index
    assert len(client.get_metric_history(children["ict"].info.run_id, "ict/ict_loss")) == TINY_PARAMS["ict"]["steps"]

    evaluation = json.loads((proj / "metrics" / "evaluate.json").read_text())
    assert {"exact_match", "realm_recall_at_5", "zero_shot_recall_at_5", "bm25_recall_at_5"} <= set(evaluation)
    assert evaluation["questions"] > 0
    assert parents[0].data.metrics["exact_match"] == pytest.approx(evaluation["exact_match"])


def test_nothing_reruns_right_after_a_finished_run(project):
    proj, env = project
    out = _sh([str(BIN / "dvc"), "repro"], proj, env)
    assert "Data and pipelines are up to date" in out.stdout + out.stderr
    status = _sh([str(BIN / "dvc"), "status"], proj, env)
    assert "up to date" in status.stdout
    _, before = _runs(proj)
    start = time.monotonic()
    out = _sh([str(BIN / "realm"), "run"], proj, env)  # nothing stale: ends at once, records no run
    elapsed = time.monotonic() - start
    assert "Nothing to do" in out.stdout
    assert elapsed < 20, f"a no-op realm run took {elapsed:.1f} s"  # it took 46 s when it started a server and a run
    _, after = _runs(proj)
    assert [r.info.run_id for r in after] == [r.info.run_id for r in before]


def test_prefect_yaml_deploys_the_pipeline_to_a_process_work_pool_whose_worker_runs_it(project, tmp_path):
    """README "Running on a schedule with a work pool": a real local Prefect server, the process
    work pool, `prefect deploy --all` from prefect.yaml, a triggered run and a worker that runs it
    in the project (nothing is stale, so the run is DVC's no-op and takes seconds)."""
    proj, env = project
    port = _free_port()
    prefect = str(BIN / "prefect")
    env = dict(env, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    server = [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with _serving(server, tmp_path, env, f"http://127.0.0.1:{port}/api/health", "the Prefect server"):
        _sh([prefect, "work-pool", "create", "realm", "--type", "process"], proj, env)
        _sh([prefect, "--no-prompt", "deploy", "--all"], proj, dict(env, REALM_DEPLOY_DIR=str(proj)))
        _, before = _runs(proj)
        triggered = _sh([prefect, "deployment", "run", "realm-pipeline/nightly"], proj, env).stdout
        worker = _sh([prefect, "worker", "start", "--pool", "realm", "--run-once"], tmp_path, env)
        assert "Data and pipelines are up to date" in worker.stdout + worker.stderr
        assert "Finished in state Completed()" in worker.stdout + worker.stderr, worker.stdout[-2000:]
        _, after = _runs(proj)
        new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
        assert [r.data.tags["realm.stage"] for r in new] == ["pipeline"] and new[0].info.status == "FINISHED"
        assert new[0].data.tags["prefect.flow_run_id"] in triggered  # the triggered flow run, run by the worker


def test_a_clone_pulls_the_trained_pipeline_from_a_dvc_remote_instead_of_retraining(project, tmp_path):
    """README "Sharing a trained pipeline": a local-directory remote, `dvc push`, a fresh clone,
    `dvc pull`; the clone is then up to date, `realm run` has nothing to do and `realm ask` answers."""
    proj, env = project
    dvc = str(BIN / "dvc")
    _sh([dvc, "remote", "add", "-d", "shared", str(tmp_path / "remote")], proj, env)
    _sh(["git", "add", ".dvc/config", "dvc.lock", "metrics"], proj, env)
    _sh(["git", "commit", "-qm", "trained"], proj, env)
    _sh([dvc, "push"], proj, env)
    clone = tmp_path / "clone"
    _sh(["git", "clone", "-q", str(proj), str(clone)], tmp_path, env)
    assert not (clone / "data" / "finetune").exists()  # git holds no model: DVC's remote does
    _sh([dvc, "pull"], clone, env)
    assert "up to date" in _sh([dvc, "status"], clone, env).stdout
    assert "Nothing to do" in _sh([str(BIN / "realm"), "run"], clone, env).stdout
    answer = json.loads(_sh([str(BIN / "realm"), "ask", "--json", "where is the city?"], clone, env).stdout)
    assert answer["evidence"] and answer["block_id"] in {e["block_id"] for e in answer["evidence"]}


PREDICT = (  # a process of its own, outside the project: only the registry and the model's own artefacts
    "import json, sys, mlflow, pandas as pd\n"
    "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
    "row = model.predict(pd.DataFrame({'question': [sys.argv[2]]}), params={'top_k': 3}).iloc[0].to_dict()\n"
    "print(json.dumps(row, default=float))\n"
)


def _stage_runs(runs, stage: str) -> list:
    return [r for r in runs if r.data.tags.get("realm.stage") == stage]


def test_the_finetuned_model_is_registered_and_the_champion_answers_in_a_fresh_process(project, tmp_path):
    """Issue 15 item 1: finetune logs and registers a pyfunc model, evaluate makes it realm@champion;
    mlflow.pyfunc.load_model loads it in a fresh process and it answers as `realm ask` does."""
    proj, env = project
    client, runs = _runs(proj)
    (finetune_run,) = _stage_runs(runs, "finetune")
    (evaluate_run,) = _stage_runs(runs, "evaluate")
    champion = client.get_model_version_by_alias("realm", "champion")
    assert champion.run_id == finetune_run.info.run_id
    assert finetune_run.data.tags["realm.registered_version"] == f"realm/{champion.version}"
    evaluation = json.loads((proj / "metrics" / "evaluate.json").read_text())
    assert float(champion.tags["exact_match"]) == pytest.approx(evaluation["exact_match"])
    assert "is now realm@champion" in evaluate_run.data.tags["realm.champion_decision"]
    assert client.get_logged_model(finetune_run.outputs.model_outputs[0].model_id).name == "realm_qa"

    question = "where is the city?"
    fresh = dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{proj / 'mlruns.db'}")
    out = _sh([str(BIN / "python"), "-c", PREDICT, "models:/realm@champion", question], tmp_path, fresh)
    registered = json.loads(out.stdout.strip().splitlines()[-1])
    local = json.loads(_sh([str(BIN / "realm"), "ask", "--json", "--top-k", "3", question], proj, env).stdout)
    assert registered["answer"] == local["answer"] and registered["block_id"] == local["block_id"]
    assert [e["block_id"] for e in registered["evidence"]] == [e["block_id"] for e in local["evidence"]]
    assert {"title", "text", "score", "probability"} <= set(registered["evidence"][0])
    cli = ["ask", "--json", "--top-k", "3", "--model", "models:/realm@champion", question]
    assert json.loads(_sh([str(BIN / "realm"), *cli], proj, env).stdout) == local

    # the HTTP API over the registered model (what `realm serve-api --model models:/realm@champion` serves)
    import mlflow
    from fastapi.testclient import TestClient

    from flows.api import create_app
    from flows.registry import load_answerer

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(fresh["MLFLOW_TRACKING_URI"])
    try:
        answerer = load_answerer("models:/realm@champion")
    finally:
        mlflow.set_tracking_uri(before)
    with TestClient(create_app(answerer)) as api:
        served = api.post("/ask", json={"question": question, "top_k": 3})
    assert served.status_code == 200 and served.json() == local


def test_a_finetune_param_change_reruns_only_finetune_and_evaluate(project):
    proj, env = project
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["finetune"]["lr"] = 3e-5
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh([str(BIN / "realm"), "run"], proj, env)
    _, runs = _runs(proj)
    latest_parent = [r for r in runs if r.data.tags.get("realm.stage") == "pipeline"][-1]
    assert sorted(_children(runs, latest_parent.info.run_id)) == ["evaluate", "finetune"]
    assert latest_parent.data.params["finetune.lr"] == "3e-05"
    # a second version; the alias sits on the best EM, the newer one on a tie
    client = _client(proj)
    versions = sorted(client.search_model_versions("name = 'realm'"), key=lambda v: int(v.version))
    assert len(versions) == 2
    ems = [float(v.tags["exact_match"]) for v in versions]
    best = max(range(2), key=lambda i: (ems[i], i))
    assert client.get_model_version_by_alias("realm", "champion").version == versions[best].version


def test_one_stage_alone_gets_its_own_top_level_run(project):
    proj, env = project
    _, before = _runs(proj)
    _sh([str(BIN / "dvc"), "repro", "-s", "-f", "evaluate"], proj, env)
    _, after = _runs(proj)
    new = [r for r in after if r.info.run_id not in {b.info.run_id for b in before}]
    assert [r.data.tags["realm.stage"] for r in new] == ["evaluate"]
    assert "mlflow.parentRunId" not in new[0].data.tags


def test_an_experiment_in_a_temporary_copy_is_recorded_by_dvc_and_mlflow(project):
    proj, env = project
    workspace = {f: (proj / f).read_bytes() for f in ("params.yaml", "dvc.lock", "metrics/evaluate.json")}
    out = _sh([str(BIN / "realm"), "run", "--temp", "-S", "finetune.steps=2", "--name", "short"], proj, env)
    assert {f: (proj / f).read_bytes() for f in workspace} == workspace  # --temp leaves the workspace alone
    shown = _sh([str(BIN / "dvc"), "exp", "show", "--csv"], proj, env).stdout
    assert "short" in shown
    _, runs = _runs(proj)
    latest_parent = [r for r in runs if r.data.tags.get("realm.stage") == "pipeline"][-1]
    children = _children(runs, latest_parent.info.run_id)
    assert sorted(children) == ["evaluate", "finetune"]
    assert children["finetune"].data.tags.get("dvc.exp_name") == "short"
    assert children["finetune"].data.params["finetune.steps"] == "2"
    # the printed table is this experiment's evaluation, not the workspace's
    assert f"{children['evaluate'].data.metrics['evaluate/final_exact_match']:.4f}" in out.stdout
    assert "evaluate/final_zero_shot_recall_at_5" in children["evaluate"].data.metrics
    metrics = _sh([str(BIN / "dvc"), "metrics", "show", "--json"], proj, env).stdout
    assert "exact_match" in metrics


def test_a_bad_override_stops_with_one_clear_message(project):
    proj, env = project
    out = _sh([str(BIN / "realm"), "run", "-S", "finetune.learning_rate=1"], proj, env, check=False)
    assert out.returncode == 1
    assert "finetune.learning_rate" in out.stderr and "Traceback" not in out.stderr


@contextlib.contextmanager
def _serving(argv: list[str], cwd: Path, env: dict[str, str], health_url: str, what: str):
    """Start a server in its own session, wait until `health_url` answers 200, stop it (and its workers)."""
    server = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(health_url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, f"{what} did not come up"
            time.sleep(1)
        yield server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_commands_dag_metrics_diff_torchrun_train_dvc_commit_and_ui(project):
    """The README's remaining everyday commands, on the finished tiny project."""

    proj, env = project
    dag = _sh([str(BIN / "dvc"), "dag"], proj, env).stdout
    assert all(stage in dag for stage in STAGES)
    _sh([str(BIN / "dvc"), "metrics", "diff"], proj, env)  # workspace vs HEAD: runs, exits 0
    # Running on a cluster: torchrun N processes of `realm train`, then `dvc commit` records the outputs.
    train = _sh([str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "flows.cli", "train", "ict"], proj, env)
    assert "ict" in (train.stdout + train.stderr)
    _sh([str(BIN / "dvc"), "commit", "-f", "ict"], proj, env)
    assert (
        "changed" not in _sh([str(BIN / "dvc"), "status", "ict"], proj, env).stdout
    )  # the torchrun outputs are recorded
    _, runs = _runs(proj)
    assert [r for r in runs if r.data.tags.get("realm.stage") == "ict" and r.data.tags.get("realm.world_size") == "2"]
    # realm ui: the MLflow UI over the project's run store, on loopback
    port = _free_port()
    with _serving(
        [str(BIN / "realm"), "ui", "--port", str(port)], proj, env, f"http://127.0.0.1:{port}/health", "the MLflow UI"
    ):
        pass  # it answered /health with 200; leaving stops the server and its worker
