"""Resumable stages (issue 6, parts 1-2): SIGKILL a training loop, rerun it, get the same result.

The kill/resume tests run tests/resume_runner.py in subprocesses (ICT, pre-training and fine-tuning
side by side to save time), kill each with SIGKILL at a random step after its first checkpoint, rerun
it from its checkpoints (in this process: everything it resumes from is on disk), and compare
with an uninterrupted run of the same seed. Then: corrupt and foreign checkpoints, atomic
outputs, and the MLflow side (a killed attempt's run is closed and linked by the next one).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from realm_core.checkpoint import (
    Checkpointer,
    TrainState,
    fingerprint,
    latest_checkpoint,
    list_checkpoints,
    resume_points,
)
from realm_core.io import InputError, atomic_dir
from realm_core.modeling import KnowledgeAugmentedEncoder
from realm_core.optim import GroupedAdamW, Part
from tests import resume_runner
from tests.tiny import make_tiny_bert, write_blocks

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ict", "pretrain", "finetune")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    make_tiny_bert(root / "bert")
    write_blocks(root / "blocks.jsonl")
    return root


def _workdir(tiny_dir: Path, name: str) -> Path:
    work = tiny_dir / name
    work.mkdir()
    for item in ("bert", "blocks.jsonl"):
        (work / item).symlink_to(tiny_dir / item)
    return work


def _launch(stage: str, work: Path, delay: float, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.resume_runner", stage, str(work), "--every", "4", "--delay", str(delay)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def _kill_after_first_checkpoint(proc: subprocess.Popen, runs: Path, timeout: float = 120.0) -> None:
    """Wait for a complete checkpoint, then SIGKILL at a random moment (a random step) after it."""
    deadline = time.monotonic() + timeout
    while latest_checkpoint(runs) is None:
        assert proc.poll() is None, f"runner exited ({proc.returncode}) before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 1.2))
    assert proc.poll() is None, "the runner finished before it could be killed; raise --delay"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def _steps_logged(log: Path) -> list[int]:
    """The steps the runner printed. Not anchored at line starts: the runner's stderr shares the log,
    and a tqdm refresh ("\\r...it/s]") without a newline can precede a step's line."""
    return [int(m) for m in re.findall(r"\bstep (\d+) loss", log.read_text())]


@pytest.fixture(scope="module")
def traces(tiny_dir) -> dict[str, dict]:
    """For each stage: the uninterrupted result, the killed attempt's last step, the resumed result."""
    works = {s: _workdir(tiny_dir, f"killed-{s}") for s in STAGES}
    logs = {s: tiny_dir / f"{s}-killed.log" for s in STAGES}
    for s in STAGES:  # an earlier output: a killed run must leave it intact (atomic outputs)
        (works[s] / "result").mkdir()
        (works[s] / "result" / "previous.txt").write_text("earlier output")
    procs = {s: _launch(s, works[s], 0.15, logs[s]) for s in STAGES}
    threads = torch.get_num_threads()
    try:  # the uninterrupted references, computed while the runners import torch
        reference = {
            s: resume_runner.run(s, _workdir(tiny_dir, f"reference-{s}"), every=0, echo=lambda _: None) for s in STAGES
        }
        for s in STAGES:
            _kill_after_first_checkpoint(procs[s], works[s] / "runs" / s)
    finally:
        torch.set_num_threads(threads)
        for p in procs.values():
            p.kill() if p.poll() is None else None
    out = {}
    for s in STAGES:
        out[s] = {
            "reference": reference[s],
            "killed_at": _steps_logged(logs[s])[-1],
            "checkpoints": [p.name for p in list_checkpoints(works[s] / "runs" / s)],
            "previous_output": sorted(p.name for p in (works[s] / "result").iterdir()),
            "stray": sorted(p.name for p in works[s].iterdir() if p.name.startswith(".result")),
            "work": works[s],
            "log": tiny_dir / f"{s}-resumed.log",
        }
    try:  # the rerun, in this process (an import of torch less per stage): all state comes from disk
        for s in STAGES:
            with out[s]["log"].open("w") as log:
                resume_runner.run(s, works[s], every=4, echo=lambda line: print(line, file=log))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_sigkilled_stage_resumes_from_its_last_checkpoint_to_the_same_result(traces, stage):
    t = traces[stage]
    resumed = json.loads((t["work"] / "result" / "metrics.json").read_text())
    ref = t["reference"]
    start = resumed["start_step"]
    lines = t["log"].read_text().splitlines()
    print(
        f"\n{stage}: killed at step {t['killed_at']} (last step logged; checkpoints on disk {t['checkpoints']}); "
        f"'{next(line for line in lines if 'resumed from' in line)}'; "
        f"final loss {resumed['losses'][str(resume_runner.STEPS - 1)]:.6f} resumed vs {ref['losses'][resume_runner.STEPS - 1]:.6f} uninterrupted"
    )
    assert 0 < start <= t["killed_at"] + 1 and start % 4 == 0
    assert sorted(int(k) for k in resumed["losses"]) == list(range(start, resume_runner.STEPS))
    for step, loss in resumed["losses"].items():
        assert loss == pytest.approx(ref["losses"][int(step)], rel=1e-6, abs=1e-7), f"step {step}"
    assert resumed["summary"] == pytest.approx(
        ref["summary"], rel=1e-6, abs=1e-7
    )  # finetune's last-quarter means need the whole history
    ref_dir = t["work"].parent / f"reference-{stage}" / "result"
    files = sorted(p.name for p in (t["work"] / "result").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in ref_dir.glob("*.safetensors"))
    for name in files:
        got, want = load_file(t["work"] / "result" / name), load_file(ref_dir / name)
        assert got.keys() == want.keys()
        for key in got:
            assert torch.allclose(got[key], want[key], rtol=1e-6, atol=1e-7), f"{name}:{key}"


@pytest.mark.parametrize("stage", STAGES)
def test_a_killed_stage_leaves_its_previous_output_intact_and_the_rerun_replaces_it(traces, stage):
    t = traces[stage]
    assert t["previous_output"] == ["previous.txt"] and t["stray"] == []  # the old output, whole, and nothing else
    assert "previous.txt" not in {p.name for p in (t["work"] / "result").iterdir()}  # replaced by the rerun's


# ------------------------------------------------------------------ checkpoint files


def _toy_state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))
    opt = GroupedAdamW({"toy": Part.of(model, 1e-2)}, 12)
    return TrainState(
        {"toy": model},
        opt.optimizer,
        opt.schedule,
        {"batches": random.Random(seed), "noise": torch.Generator().manual_seed(seed)},
    )


def _toy_train(
    state: TrainState, ckpt: Checkpointer | None, steps: int = 12, crash_at: int | None = None
) -> list[float]:
    """A loop whose randomness is its named RNGs plus the global ones (dropout, `random`)."""
    start = ckpt.restore(state) if ckpt else 0
    model, losses = state.modules["toy"], []
    for step in range(start, steps):
        if step == crash_at:
            raise RuntimeError("simulated crash")
        x = torch.randn(5, 4, generator=state.rngs["noise"]) * state.rngs["batches"].random() + random.random()
        loss = model(x).pow(2).mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        losses.append(loss.item())
        if ckpt:
            ckpt.maybe_save(step + 1, state, final=step + 1 == steps)
    return losses


def _seed_globals() -> None:
    random.seed(1)
    torch.manual_seed(1)


def test_toy_loop_resumes_exactly_and_keeps_the_last_two(tmp_path):
    _seed_globals()
    state = _toy_state()
    reference = _toy_train(state, None)
    flushed: list[int] = []  # the stage flushes its buffered MLflow metrics before every save
    ckpt = Checkpointer(tmp_path, every=3, fingerprint="a", before_save=flushed.append)
    _seed_globals()
    with pytest.raises(RuntimeError):
        _toy_train(_toy_state(), ckpt, crash_at=7)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000006"] and flushed == [3, 6]
    _seed_globals()
    resumed_state = _toy_state(seed=5)  # other initial weights and RNG seeds: all overwritten by the restore
    random.seed(99)
    torch.manual_seed(99)  # the globals too: dropout must come from the checkpoint
    tail = _toy_train(resumed_state, Checkpointer(tmp_path, every=3, fingerprint="a"))
    assert tail == reference[6:]
    assert torch.equal(resumed_state.modules["toy"][0].weight, state.modules["toy"][0].weight)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000009", "step-000012"]


def test_latest_checkpoint_ignores_incomplete_and_temporary_directories(tmp_path):
    runs, tmp_path = tmp_path, tmp_path / "loop"
    ckpt = Checkpointer(tmp_path, every=2, fingerprint="a")
    ckpt.save(2, _toy_state())
    (tmp_path / "step-000010").mkdir()  # no state.json: never finished
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".step-000012.tmp-{dead.pid}").mkdir()  # left by a process killed while saving
    assert latest_checkpoint(tmp_path).name == "step-000002"
    assert ckpt.restore(_toy_state()) == 2
    assert not (tmp_path / f".step-000012.tmp-{dead.pid}").exists()
    assert resume_points(runs) == {"loop": 2}


def test_checkpointing_off_writes_nothing_and_restores_nothing(tmp_path):
    ckpt = Checkpointer(tmp_path / "runs", every=0, fingerprint="a")
    assert ckpt.maybe_save(4, _toy_state(), final=True) is None and ckpt.restore(_toy_state()) == 0
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "damage, file",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "model-toy.safetensors"),
        (lambda p: p.write_bytes(p.read_bytes()[:-8] + b"\x00" * 8), "optimizer.safetensors"),
        (lambda p: p.write_text('{"format": 1, "step": '), "state.json"),
        (lambda p: p.unlink(), "rng.safetensors"),
    ],
    ids=["truncated-weights", "flipped-bytes", "truncated-state", "missing-file"],
)
def test_a_corrupt_checkpoint_is_a_clear_input_error(tmp_path, damage, file):
    runs = tmp_path / "runs" / "ict"
    Checkpointer(runs, every=2, fingerprint="a").save(2, _toy_state())
    damage(runs / "step-000002" / file)
    with pytest.raises(
        InputError, match=rf"{file}: corrupt or truncated checkpoint .*delete {runs} to start this training over"
    ):
        Checkpointer(runs, every=2, fingerprint="a").restore(_toy_state())


def test_a_checkpoint_of_other_params_or_inputs_is_not_resumed(tmp_path, caplog):
    Checkpointer(tmp_path, every=2, fingerprint=fingerprint({"lr": 1e-3})).save(4, _toy_state())
    state = _toy_state(seed=3)
    before = state.modules["toy"][0].weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="realm_core.checkpoint"):
        start = Checkpointer(tmp_path, every=2, fingerprint=fingerprint({"lr": 3e-3})).restore(state)
    assert start == 0 and torch.equal(before, state.modules["toy"][0].weight)
    assert "other params or inputs" in caplog.text and latest_checkpoint(tmp_path) is None


def test_fingerprint_follows_params_and_input_bytes(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "blocks.jsonl").write_text("a\n")
    before = fingerprint({"ict.lr": 1e-4}, [data])
    assert fingerprint({"ict.lr": 1e-4}, [data]) == before
    assert fingerprint({"ict.lr": 3e-4}, [data]) != before
    (data / "blocks.jsonl").write_text("b\n")
    assert fingerprint({"ict.lr": 1e-4}, [data]) != before


def test_stage_fingerprint_uses_the_dvc_stage_params_but_not_checkpoint_every(tmp_path):
    from realm_core.config import Params
    from realm_core.paths import Paths
    from tasks.training import stage_fingerprint

    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    paths, base = Paths(tmp_path), Params()
    fp = stage_fingerprint(base, paths, "ict")
    assert (
        stage_fingerprint(
            base.model_copy(update={"ict": base.ict.model_copy(update={"checkpoint_every": 5})}), paths, "ict"
        )
        == fp
    )
    assert (
        stage_fingerprint(base.model_copy(update={"ict": base.ict.model_copy(update={"lr": 5e-4})}), paths, "ict") != fp
    )
    assert (
        stage_fingerprint(
            base.model_copy(update={"finetune": base.finetune.model_copy(update={"lr": 5e-4})}), paths, "ict"
        )
        == fp
    )


def test_mlm_head_warmup_resumes_to_the_same_head(tiny_dir):
    """The second loop of the ict stage: its masking generator and dropout are restored too."""
    from realm_core.blocks import BlockStore
    from realm_core.config import IctParams
    from realm_core.ict import warmup_mlm_head
    from realm_core.modeling import load_tokenizer

    store = BlockStore.load(tiny_dir / "blocks.jsonl", load_tokenizer(tiny_dir / "bert"), max_block_tokens=64)

    def run(ckpt, crash_at=None):
        torch.manual_seed(0)
        encoder = KnowledgeAugmentedEncoder.from_backbone(tiny_dir / "bert", None)
        losses = []

        def log(m, step):
            if step == crash_at:
                raise RuntimeError("simulated crash")
            losses.append(m["mlm_loss"])

        c = IctParams(mlm_warmup_steps=6, mlm_batch_size=4, mlm_lr=1e-2)
        warmup_mlm_head(encoder, store, c, seed=0, device=torch.device("cpu"), log=log, checkpoint=ckpt)
        return encoder, losses

    reference, ref_losses = run(None)
    runs = tiny_dir / "mlm-runs"
    with pytest.raises(RuntimeError):
        run(Checkpointer(runs, every=2, fingerprint="a"), crash_at=3)
    resumed, losses = run(Checkpointer(runs, every=2, fingerprint="a"))
    assert losses == ref_losses[2:]
    assert torch.equal(
        resumed.mlm.cls.predictions.transform.dense.weight, reference.mlm.cls.predictions.transform.dense.weight
    )


def test_checkpoints_hold_no_pickle(traces):
    files = [p for s in STAGES for p in (traces[s]["work"] / "runs").rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".safetensors", ".json"}


# ------------------------------------------------------------------ atomic outputs


def test_a_failing_stage_leaves_the_previous_output_and_no_temp(tmp_path):
    final = tmp_path / "data" / "ict"
    with atomic_dir(final) as out:
        (out / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(final) as out:
        (out / "weights").write_text("half of v2")
        raise RuntimeError("stage failed midway")
    assert (final / "weights").read_text() == "v1"
    assert sorted(p.name for p in final.parent.iterdir()) == ["ict"]


def test_a_sigkilled_writer_leaves_the_previous_output_and_its_temp_is_cleaned_later(tmp_path):
    final = tmp_path / "data" / "ict"
    with atomic_dir(final) as out:
        (out / "weights").write_text("v1")
    code = (
        "import sys, time; from pathlib import Path; from realm_core.io import atomic_dir\n"
        "with atomic_dir(Path(sys.argv[1])) as out:\n"
        "    (out / 'weights').write_text('half of v2'); print('writing', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(final)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (final / "weights").read_text() == "v1"
    stray = [p.name for p in final.parent.iterdir() if p.name != "ict"]
    assert stray == [f".ict.tmp-{proc.pid}"]  # hidden sibling, not the path dvc.yaml lists as the out
    with atomic_dir(final) as out:
        (out / "weights").write_text("v2")
    assert (final / "weights").read_text() == "v2"
    assert sorted(p.name for p in final.parent.iterdir()) == ["ict"]


# ------------------------------------------------------------------ MLflow: killed attempts and resumed runs


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its schema takes seconds); each test its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.fixture()
def tracked_project(tmp_path, monkeypatch, mlflow_store, request) -> Path:
    """A project root with params.yaml, tracked in an experiment of its own."""
    from flows.tracking import PARENT_RUN_ENV

    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", re.sub(r"\W", "-", request.node.name))
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    return root


def _attempt_run(client, experiment_id: str, root: Path, pid: int, losses: dict[int, float]) -> str:
    """A RUNNING ict run as `stage_run` opens it, owned by process `pid`, with per-step losses."""
    import psutil
    from mlflow.entities import Metric

    from flows.resume import process_tags

    tags = {
        **process_tags(root),
        "realm.stage": "ict",
        "realm.pid": str(pid),
        "realm.pid_started": repr(psutil.Process(pid).create_time()),
    }
    run_id = client.create_run(experiment_id, run_name="ict", tags=tags).info.run_id
    client.log_batch(
        run_id, metrics=[Metric("ict/ict_loss", v, 0, s) for s, v in losses.items()]
    )  # as ict's run names it
    return run_id


def test_the_next_attempt_marks_a_sigkilled_run_killed_and_links_to_it(tracked_project):
    from mlflow import MlflowClient

    from flows.tracking import ensure_experiment, stage_run

    root = tracked_project
    client = MlflowClient()
    experiment_id = ensure_experiment(client, root)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed = _attempt_run(client, experiment_id, root, victim.pid, {s: 10.0 - s for s in range(6)})
    alive = _attempt_run(client, experiment_id, root, os.getpid(), {})  # a live attempt elsewhere: not ours to close
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    Checkpointer(root / "runs" / "ict" / "retriever", every=4, fingerprint="a").save(4, _toy_state())

    with stage_run("ict", root) as ctx:
        for step in range(4, 8):
            ctx.log_fn({"ict_loss": 10.0 - step}, step)
        ctx.set_final(ctx.last_logged(["ict_loss"]))

    new = client.get_run(ctx.run_id)
    assert client.get_run(killed).info.status == "KILLED"
    assert client.get_run(alive).info.status == "RUNNING"
    assert new.info.status == "FINISHED"
    assert new.data.tags["resumed_from"] == killed and new.data.tags["resumed_at_step"] == "4"
    assert [m.step for m in client.get_metric_history(ctx.run_id, "ict/ict_loss")] == [
        4,
        5,
        6,
        7,
    ]  # no copies in MLflow
    curve = (root / "metrics" / "ict_curve.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in curve[1:]] == [str(s) for s in range(8)]  # the whole curve for DVC plots
    assert json.loads((root / "metrics" / "ict.json").read_text()) == {"ict_loss": 3.0}
    resources = json.loads((root / "metrics" / "ict.resources.json").read_text())
    assert resources["peak_rss_mb"] > 0 and resources["peak_rss_children_mb"] >= 0  # tests/test_peak_memory.py
    assert not (root / "runs" / "ict").exists()  # outputs saved: the resumable state is gone


@pytest.mark.parametrize("error, status", [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_failed_or_interrupted_stage_is_marked_and_keeps_its_checkpoints(tracked_project, error, status):
    from mlflow import MlflowClient

    from flows.tracking import stage_run

    root = tracked_project
    Checkpointer(root / "runs" / "ict" / "retriever", every=4, fingerprint="a").save(4, _toy_state())
    with pytest.raises(error), stage_run("ict", root) as ctx:
        raise error()
    run = MlflowClient().get_run(ctx.run_id)
    assert run.info.status == status and "resumed_from" not in run.data.tags
    assert latest_checkpoint(root / "runs" / "ict" / "retriever").name == "step-000004"


def test_realm_runs_stale_closes_dead_runs_and_the_next_attempt_still_links_to_them(tracked_project, monkeypatch):
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.tracking import ensure_experiment, stage_run

    root = tracked_project
    monkeypatch.chdir(root)
    client = MlflowClient()
    experiment_id = ensure_experiment(client, root)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    old = _attempt_run(client, experiment_id, root, victim.pid, {0: 9.0})
    client.set_terminated(old, "KILLED")  # an attempt killed before the last finished one: never resumed
    time.sleep(0.01)
    done = client.create_run(experiment_id, run_name="ict", tags=client.get_run(old).data.tags).info.run_id
    client.set_terminated(done, "FINISHED")
    time.sleep(0.01)
    killed = _attempt_run(client, experiment_id, root, victim.pid, {s: 10.0 - s for s in range(6)})
    dead = {k: v for k, v in client.get_run(killed).data.tags.items() if k.startswith("realm.")}  # the same dead pid
    parent = client.create_run(
        experiment_id, run_name="pipeline-x", tags={**dead, "realm.stage": "pipeline"}
    ).info.run_id
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()

    result = CliRunner().invoke(app, ["runs", "--stale"])
    assert result.exit_code == 0, result.output
    assert "2 stale run(s) closed" in result.output and killed in result.output and parent in result.output
    assert client.get_run(killed).info.status == client.get_run(parent).info.status == "KILLED"
    assert "0 stale run(s) closed" in CliRunner().invoke(app, ["runs", "--stale"]).output

    Checkpointer(root / "runs" / "ict" / "retriever", every=4, fingerprint="a").save(4, _toy_state())
    with stage_run("ict", root) as ctx:  # closed already, by `realm runs --stale`: still taken up
        ctx.set_final({"ict_loss": 2.0})
    assert client.get_run(ctx.run_id).data.tags["resumed_from"] == killed
    assert client.get_run(killed).data.tags["realm.resumed_by"] == ctx.run_id
    assert "realm.resumed_by" not in client.get_run(old).data.tags  # older than the finished attempt
    with stage_run("ict", root) as again:  # taken up once: the next attempt starts afresh
        again.set_final({"ict_loss": 2.0})
    assert "resumed_from" not in client.get_run(again.run_id).data.tags
