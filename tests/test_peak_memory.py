"""Every stage reports its peak resident memory (issue 13): `peak_rss_mb` (the stage process) and
`peak_rss_children_mb` (the largest its children reported of themselves: pre-training's index
builder), in metrics/<stage>.json and as final_* metrics of its MLflow run (flows/tracking.py)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import types
from pathlib import Path

import psutil
import pytest

import tasks.training  # noqa: F401  (imports Prefect, whose logging set-up would drop caplog's handler in a test)
from realm_core import memory

ROOT = Path(__file__).resolve().parents[1]

# A process that holds 200 MB more (bytes(1) * n writes every page), then spawns a child that
# measures itself: its getrusage would count its parent's 200+ MB (exec keeps the mark), peak_rss_mb not.
MEASURE = """
import json, subprocess, sys
from realm_core.memory import peak_rss_mb
before = peak_rss_mb()
block = bytes(1) * (200 * 2**20)
after = peak_rss_mb()
child = subprocess.run([sys.executable, "-c", "from realm_core.memory import peak_rss_mb; print(peak_rss_mb())"], capture_output=True, text=True, check=True)
print(json.dumps({"before": before, "after": after, "child": float(child.stdout)}))
"""


def test_peak_rss_grows_by_what_the_process_allocates_and_a_spawned_child_does_not_inherit_it():
    out = subprocess.run([sys.executable, "-c", MEASURE], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    got = json.loads(out.splitlines()[-1])
    assert got["after"] - got["before"] >= 190, got  # its own 200 MB
    assert got["child"] < got["before"] + 20 < got["after"], got  # a bare interpreter, not its parent's 200+ MB


@pytest.mark.parametrize("platform, maxrss", [("linux", 512 * 1024), ("darwin", 512 * 2**20)])
def test_without_proc_ru_maxrss_is_read_as_kib_on_linux_and_bytes_on_macos(monkeypatch, tmp_path, platform, maxrss):
    monkeypatch.setattr(memory, "PROC_STATUS", tmp_path / "no-proc")
    monkeypatch.setattr(memory.sys, "platform", platform)
    monkeypatch.setattr(memory.resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=maxrss))
    assert memory.peak_rss_mb() == 512.0


def test_every_stage_result_holds_its_peak_memory_and_its_childrens(tmp_path, monkeypatch, caplog):
    from mlflow import MlflowClient

    from flows import tracking

    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "peak-memory")
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    monkeypatch.setattr(
        memory, "_children_peak_mb", 0.0
    )  # restored afterwards: other tests' stages see no 300 MB child
    monkeypatch.setattr(tracking, "MEMORY_BUDGET_MB", 1.0)  # every stage is over it: a warning, not a failure
    held = psutil.Process().memory_info().rss / 2**20
    with caplog.at_level(logging.WARNING), tracking.stage_run("corpus", root) as ctx:
        memory.note_child_peak(300.0)  # what the index builder's messages do
        memory.note_child_peak(120.0)
        ctx.set_final({"blocks": 10, "build_seconds": 2.5})
    tracked = json.loads((root / "metrics" / "corpus.json").read_text())
    assert tracked == {"blocks": 10.0}  # what git and DVC track holds no cost that varies with the load
    written = json.loads((root / "metrics" / "corpus.resources.json").read_text())
    assert set(written) == {"build_seconds", "peak_rss_mb", "peak_rss_children_mb"}
    assert written["peak_rss_mb"] >= held - 1  # a peak: at least what it held before the stage
    assert written["peak_rss_children_mb"] == 300.0  # the largest child, not the last or a sum
    assert ctx.final == {**tracked, **written}
    run = MlflowClient().get_run(ctx.run_id)
    assert run.info.status == "FINISHED"
    for key in ("peak_rss_mb", "peak_rss_children_mb"):
        assert run.data.metrics[f"corpus/final_{key}"] == pytest.approx(written[key])
    assert re.search(r"stage corpus peaked at \d+ MB resident .* over the 1 MB budget", caplog.text)


def test_the_index_builder_reports_its_own_peak_to_the_trainer(tiny, models, tmp_path, monkeypatch):
    from realm_core.refresh import AsyncRefresher
    from tests.conftest import CPU

    _, store = tiny
    doc = models[0].doc
    monkeypatch.setattr(memory, "_children_peak_mb", 0.0)
    refresher = AsyncRefresher(store, CPU, 4, refresh_every=2, work_dir=tmp_path / "refresh", max_staleness=2)
    try:
        refresher.initial(doc)
        swapped = None
        for step in range(1, 5):  # the builder's snapshot of step 2 is in use by step 4 at the latest
            swapped = swapped if swapped is not None else refresher.step(doc, step)
        assert swapped is not None
        built = memory.children_peak_rss_mb()
        builder = refresher._proc
        held = psutil.Process(builder.pid).memory_info().rss / 2**20  # idle after its build
    finally:
        refresher.close()  # what pretrain() does in its finally, before the stage writes its result
    assert built > 0  # sent with its index
    assert builder.exitcode == 0 and memory.children_peak_rss_mb() >= max(built, held)  # and when it stopped


def test_the_parent_run_shows_the_pipelines_peak_not_evaluates_memory_as_the_evaluation():
    from flows.pipeline import parent_metrics

    metrics = {
        "ict": {"ict_loss": 1.0, "peak_rss_mb": 900.0, "peak_rss_children_mb": 0.0},
        "pretrain": {"loss": 2.0, "peak_rss_mb": 1500.0, "peak_rss_children_mb": 700.0},
        "evaluate": {"exact_match": 5.0, "peak_rss_mb": 800.0, "peak_rss_children_mb": 0.0},
    }
    assert parent_metrics(metrics) == {"exact_match": 5.0, "pipeline_peak_rss_mb": 2200.0}
    assert parent_metrics({"evaluate": {"exact_match": 5.0}}) == {"exact_match": 5.0}


def test_the_tracked_curve_leaves_out_timings_that_mlflow_still_gets(tmp_path):
    """A curve column that is timed changes with the load; it would leave `git status` dirty after
    every run of the same commit (issue 16, item 4), so the curve TSV drops it."""
    from flows.tracking import StepRecorder

    recorder = StepRecorder(client=None, run_id="test", flush_every=10**9)  # never flushes to MLflow
    for step in range(3):
        recorder({"loss": 1.0 / (step + 1), "refresh_wait_seconds": 0.1 * step, "peak_rss_mb": 5.0}, step)
    recorder.write_tsv(tmp_path / "curve.tsv")
    header = (tmp_path / "curve.tsv").read_text().splitlines()[0].split("\t")
    assert header == ["step", "loss"]
    assert [m.key for m in recorder._pending].count("refresh_wait_seconds") == 3  # still on its way to MLflow
