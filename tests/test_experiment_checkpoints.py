"""Experiments resume too (issue 16, item 6): DVC runs --temp and queued experiments in a temporary
copy of the workspace (.dvc/tmp/exps/...), deleted when it ends, so their checkpoints live in the
workspace they came from (DVC_ROOT), keyed by params (flows/tracking.stage_paths)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from flows.tracking import stage_paths
from realm_core.checkpoint import Checkpointer, TrainState

ROOT = Path(__file__).resolve().parents[1]


def _copy(workspace: Path, name: str, params: str | None = None) -> Path:
    """A temporary experiment copy as DVC makes one."""
    copy = workspace / ".dvc" / "tmp" / "exps" / name
    copy.mkdir(parents=True)
    (copy / "params.yaml").write_text(params or (workspace / "params.yaml").read_text())
    return copy


def test_a_workspace_run_keeps_its_state_in_its_own_runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert stage_paths(tmp_path).scratch("pretrain") == tmp_path / "runs" / "pretrain"
    monkeypatch.delenv("DVC_ROOT")
    assert stage_paths(tmp_path).scratch("pretrain") == tmp_path / "runs" / "pretrain"


def test_a_killed_experiment_resumes_in_the_next_temporary_copy_with_the_same_params(tmp_path, monkeypatch):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    shutil.copy(ROOT / "params.yaml", workspace / "params.yaml")
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    monkeypatch.setenv("DVC_EXP_NAME", "first-try")

    first = _copy(workspace, "tmpAAAA")
    paths = stage_paths(first)
    scratch = paths.scratch("pretrain")
    assert scratch.is_relative_to(workspace / "runs" / "exps") and not scratch.is_relative_to(first)
    model = torch.nn.Linear(3, 2)
    Checkpointer(scratch / "loop", every=2, fingerprint="same").maybe_save(4, TrainState({"model": model}))
    shutil.rmtree(first)  # what DVC does when the killed experiment's run ends

    monkeypatch.setenv("DVC_EXP_NAME", "requeued")  # a requeue without --name gets another random name
    again = stage_paths(_copy(workspace, "tmpBBBB"))
    assert again.scratch("pretrain") == scratch
    restored = torch.nn.Linear(3, 2)
    step = Checkpointer(again.scratch("pretrain") / "loop", every=2, fingerprint="same").restore(
        TrainState({"model": restored})
    )
    assert step == 4 and torch.equal(restored.weight, model.weight)

    other = stage_paths(
        _copy(workspace, "tmpCCCC", params=(workspace / "params.yaml").read_text().replace("seed: 13", "seed: 14"))
    )
    assert other.scratch("pretrain") != scratch  # other params: another experiment, other state
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "b" * 40)
    assert stage_paths(_copy(workspace, "tmpDDDD")).scratch("pretrain") != scratch  # another commit's code
