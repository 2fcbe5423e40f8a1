"""Orchestration pieces that need no pipeline run: params, overrides, DVC argv, step recording, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.pipeline import check_overrides, dvc_command
from realm_core.config import Params, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_matches_the_pydantic_defaults():
    """No default is written twice with different values (DESIGN.md 2)."""
    assert load_params(ROOT / "params.yaml").model_dump() == Params().model_dump()


def test_unknown_param_names_file_and_line(tmp_path):
    file = tmp_path / "params.yaml"
    file.write_text("seed: 1\nfinetune:\n  steps: 3\n  lr_typo: 0.1\n")
    with pytest.raises(ParamsError, match=r"params.yaml:4: unknown key 'finetune.lr_typo'"):
        load_params(file)


def test_wrongly_typed_param_names_file_and_line(tmp_path):
    file = tmp_path / "params.yaml"
    file.write_text("pretrain:\n  top_k: many\n")
    with pytest.raises(ParamsError, match=r"params.yaml:2: 'pretrain.top_k'"):
        load_params(file)


def test_overrides_are_validated_before_dvc_runs():
    check_overrides(ROOT / "params.yaml", ["finetune.lr=3e-5", "corpus.max_passages=null"])
    with pytest.raises(ParamsError, match="expected section.key=value"):
        check_overrides(ROOT / "params.yaml", ["finetune.learning_rate=3e-5"])
    with pytest.raises(ParamsError, match="finetune.lr"):
        check_overrides(ROOT / "params.yaml", ["finetune.lr=-1"])
    with pytest.raises(ParamsError):
        check_overrides(ROOT / "params.yaml", ["seed"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.lr=abc", "-S finetune.lr=abc: expected a number (float) > 0"),
        ("pretrain.top_k=1", "-S pretrain.top_k=1: expected an integer (int) >= 2"),
        ("pretrain.null_block=maybe", "-S pretrain.null_block=maybe: expected true or false (bool)"),
        (
            "pretrain.masking=foo",
            "-S pretrain.masking=foo: expected one of 'salient', 'random_tokens', 'random_spans'",
        ),
        ("corpus.max_passages=all", "-S corpus.max_passages=all: expected an integer (int) >= 1, or null"),
        (
            "evaluate.recall_at=[0]",
            "-S evaluate.recall_at=[0]: recall_at must be a non-empty list of positive integers",
        ),
        ("finetune.lr=[1,", "-S finetune.lr=[1,: the value is not valid YAML"),
    ],
)
def test_a_bad_override_is_one_line_naming_it_and_what_its_key_takes(override, message):
    with pytest.raises(ParamsError) as raised:
        check_overrides(ROOT / "params.yaml", ["finetune.lr=3e-5", override])
    assert str(raised.value) == message


def test_several_bad_overrides_are_one_line_in_the_order_given():
    with pytest.raises(ParamsError) as raised:
        check_overrides(ROOT / "params.yaml", ["pretrain.masking=foo", "seed=1", "finetune.lr=abc"])
    assert str(raised.value) == (
        "-S pretrain.masking=foo: expected one of 'salient', 'random_tokens', 'random_spans'; "
        "-S finetune.lr=abc: expected a number (float) > 0"
    )


def test_realm_run_with_a_bad_override_prints_one_error_line():
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--temp", "-S", "finetune.lr=abc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stderr.strip() == "error: -S finetune.lr=abc: expected a number (float) > 0"


def test_bench_quality_without_its_data_folder_stops_with_one_line(tmp_path):
    """Before any question set or model loads: the message names the folder and the flag."""
    missing = tmp_path / "nonexistent"
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--data", str(missing), "--no-mlflow"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: --data {missing}: no such folder; pass --data DIR, the shared data folder (SOURCES.md; default ../shared/data)"
    ]
    assert "Traceback" not in out.stderr + out.stdout and not out.stdout


def test_dvc_argv_is_repro_or_exp_run_and_never_a_shell_string():
    repro = dvc_command([], force=False, name=None)
    assert repro[1:] == ["-m", "dvc", "repro"]
    exp = dvc_command(["finetune.lr=3e-5; rm -rf /"], force=True, name="lr")
    assert exp[3:] == ["exp", "run", "-S", "finetune.lr=3e-5; rm -rf /", "--name", "lr", "--force"]
    temp = dvc_command(["pretrain.null_block=false"], force=False, name=None, temp=True)
    assert temp[3:] == ["exp", "run", "--temp", "-S", "pretrain.null_block=false"]


def test_step_recorder_merges_rows_by_step_and_writes_a_curve(tmp_path):
    from flows.tracking import StepRecorder

    class FakeClient:
        def __init__(self):
            self.batches = []

        def log_batch(self, run_id, metrics=()):
            self.batches.append(list(metrics))

    client = FakeClient()
    rec = StepRecorder(client, "run", flush_every=3)
    rec({"loss": 2.0, "acc": 0.5}, 0)
    rec({"loss": 1.0, "nan": float("nan")}, 1)  # non-finite values are dropped, not logged
    rec({"other": 7.0}, 0)
    assert sum(len(b) for b in client.batches) == 3
    rec.flush()
    assert sum(len(b) for b in client.batches) == 4
    rec.write_tsv(tmp_path / "c.tsv")
    assert (tmp_path / "c.tsv").read_text().splitlines() == ["step\tacc\tloss\tother", "0\t0.5\t2\t7", "1\t\t1\t"]
    rec.plot(tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_cli_help_does_not_import_torch_or_mlflow():
    code = "import sys; from flows.cli import app; print(any(m in sys.modules for m in ('torch', 'mlflow', 'prefect')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_hub_download_fails_fast_offline():
    """realm_core forces HF offline mode: nothing may download weights at run time."""
    import os

    from transformers import AutoModel

    import realm_core  # noqa: F401  (sets HF_HUB_OFFLINE)

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(OSError, match="couldn't connect"):
        AutoModel.from_pretrained("bert-base-uncased")


def test_serve_builds_a_cron_scheduled_deployment_of_the_pipeline():
    from flows.pipeline import scheduled_deployment

    deployment = scheduled_deployment("0 3 * * *")
    assert deployment.name == "nightly"
    assert deployment.entrypoint.endswith("pipeline_flow")
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]


def test_serve_without_a_prefect_server_says_how_to_start_one():
    env = {k: v for k, v in __import__("os").environ.items() if k != "PREFECT_API_URL"}
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "serve"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "realm ui --tool prefect" in out.stderr


def test_git_commit_is_dirty_for_code_changes_but_not_for_files_the_pipeline_writes(tmp_path):
    from flows.tracking import git_commit

    def git(*args):
        subprocess.run(
            ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True, capture_output=True
        )

    (tmp_path / "metrics").mkdir()
    (tmp_path / "data").mkdir()
    for rel in ("dvc.lock", "metrics/evaluate.json", "data/.gitignore", "code.py"):
        (tmp_path / rel).write_text("v1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "x")
    clean = git_commit(tmp_path)
    assert len(clean) == 40
    for rel in ("dvc.lock", "metrics/evaluate.json", "data/.gitignore"):
        (tmp_path / rel).write_text("v2\n")
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("v2\n")
    assert git_commit(tmp_path) == clean + "-dirty"


def test_realm_bench_runs_the_named_script_with_its_arguments(monkeypatch):
    from typer.testing import CliRunner

    from flows import cli

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda argv, cwd: calls.append((argv, cwd)) or 0)
    result = CliRunner().invoke(cli.app, ["bench", "quality", "--quick"])
    assert result.exit_code == 0, result.output
    ((argv, cwd),) = calls
    assert argv[0] == sys.executable and Path(argv[1]) == Path(cwd) / "bench" / "quality.py" and argv[2:] == ["--quick"]
    assert all((Path(cwd) / "bench" / f"{name}.py").exists() for name in cli.BENCHES)
    unknown = CliRunner().invoke(cli.app, ["bench", "nope"])
    assert unknown.exit_code != 0 and "unknown benchmark" in unknown.output and len(calls) == 1
    # --help after a name is the script's own (argparse prints its options); alone it is realm bench's
    assert CliRunner().invoke(cli.app, ["bench", "quality", "--help"]).exit_code == 0 and calls[-1][0][2:] == ["--help"]
    own = CliRunner().invoke(cli.app, ["bench", "--help"])
    assert own.exit_code == 0 and "mechanics" in own.output and len(calls) == 2
