"""Every command the README shows is exercised by a named test (or by CI), or listed here as not run, with why.

The README's commands are read from its ```bash blocks and from inline `code` that starts with
a command. Each must match a key of COVERED (the test that runs it) or NOT_RUN (a reason);
a README change that adds a command, or a renamed test, fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"^(realm|dvc|torchrun|curl|pip|python3?|export)\s")

# command prefix -> "tests/<file>.py::<test>" that runs it (".ci/run" = CI itself)
COVERED = {
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/python -m pytest": ".ci/run",
    "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]' && .venv/bin/realm run": "tests/test_pipeline.py::test_first_run_executes_all_five_stages_under_one_parent_run",
    "realm run --temp": "tests/test_pipeline.py::test_an_experiment_in_a_temporary_copy_is_recorded_by_dvc_and_mlflow",
    "realm run -S": "tests/test_pipeline.py::test_a_bad_override_stops_with_one_clear_message",
    "realm run": "tests/test_pipeline.py::test_a_finetune_param_change_reruns_only_finetune_and_evaluate",
    "realm stage": "tests/test_pipeline.py::test_first_run_executes_all_five_stages_under_one_parent_run",
    "realm train": "tests/test_pipeline.py::test_readme_commands_dag_metrics_diff_torchrun_train_dvc_commit_and_ui",
    "torchrun": "tests/test_pipeline.py::test_readme_commands_dag_metrics_diff_torchrun_train_dvc_commit_and_ui",
    "realm ui --tool prefect": None,  # see NOT_RUN
    "realm ui": "tests/test_pipeline.py::test_readme_commands_dag_metrics_diff_torchrun_train_dvc_commit_and_ui",
    "realm serve-api": "tests/test_answer.py::test_api_health_and_ask_return_what_realm_ask_json_prints",
    "curl -s localhost:8000/ask": "tests/test_answer.py::test_api_health_and_ask_return_what_realm_ask_json_prints",
    "realm serve --cron": "tests/test_orchestration.py::test_serve_builds_a_cron_scheduled_deployment_of_the_pipeline",
    "realm ask": "tests/test_answer.py::test_ask_json_prints_one_object_equal_to_answer_question",
    "realm index add": "tests/test_knowledge.py::test_an_added_passage_is_retrieved_and_answered_from_and_a_removed_one_is_not",
    "realm index remove": "tests/test_knowledge.py::test_an_added_passage_is_retrieved_and_answered_from_and_a_removed_one_is_not",
    "dvc add": "tests/test_knowledge.py::test_an_added_passage_is_retrieved_and_answered_from_and_a_removed_one_is_not",
    "realm index list": "tests/test_knowledge.py::test_an_added_passage_is_retrieved_and_answered_from_and_a_removed_one_is_not",
    "realm ask --model": "tests/test_pipeline.py::test_the_finetuned_model_is_registered_and_the_champion_answers_in_a_fresh_process",
    "realm serve-api --model": "tests/test_pipeline.py::test_the_finetuned_model_is_registered_and_the_champion_answers_in_a_fresh_process",
    "realm bench": "tests/test_orchestration.py::test_realm_bench_runs_the_named_script_with_its_arguments",
    "realm plots": "tests/test_plots.py::test_realm_plots_writes_a_png_per_plot_from_the_same_points",
    "dvc plots show": "tests/test_plots.py::test_each_plot_draws_its_y_fields_and_no_empty_cell",
    "python bench/diagnose.py": "tests/test_diagnose.py::test_diagnose_reports_the_probe_gains_of_each_stage_and_the_candidates",
    "dvc repro -s -f": "tests/test_pipeline.py::test_one_stage_alone_gets_its_own_top_level_run",
    "dvc repro -f -s": "tests/test_pipeline.py::test_one_stage_alone_gets_its_own_top_level_run",
    "dvc repro": "tests/test_pipeline.py::test_nothing_reruns_right_after_a_finished_run",
    "dvc status": "tests/test_pipeline.py::test_nothing_reruns_right_after_a_finished_run",
    "dvc remote add": "tests/test_pipeline.py::test_a_clone_pulls_the_trained_pipeline_from_a_dvc_remote_instead_of_retraining",
    "dvc push": "tests/test_pipeline.py::test_a_clone_pulls_the_trained_pipeline_from_a_dvc_remote_instead_of_retraining",
    "dvc pull": "tests/test_pipeline.py::test_a_clone_pulls_the_trained_pipeline_from_a_dvc_remote_instead_of_retraining",
    "dvc exp run --queue": None,
    "dvc queue start": None,
    "dvc exp run -S": "tests/test_pipeline.py::test_an_experiment_in_a_temporary_copy_is_recorded_by_dvc_and_mlflow",
    "dvc exp show": "tests/test_pipeline.py::test_an_experiment_in_a_temporary_copy_is_recorded_by_dvc_and_mlflow",
    "dvc metrics diff": "tests/test_pipeline.py::test_readme_commands_dag_metrics_diff_torchrun_train_dvc_commit_and_ui",
    "dvc dag": "tests/test_pipeline.py::test_readme_commands_dag_metrics_diff_torchrun_train_dvc_commit_and_ui",
    "dvc commit": "tests/test_pipeline.py::test_readme_commands_dag_metrics_diff_torchrun_train_dvc_commit_and_ui",
}
NOT_RUN = {
    "realm ui --tool prefect": "starts a Prefect server (~20 s more); the MLflow branch of the same command is tested",
    "dvc exp run --queue": "tried by hand with two queued experiments and `dvc queue start -j 2`; the MLflow side of concurrent runs is tests/test_concurrency.py",
    "dvc queue start": "as above",
    "pip install -e '.[ray]'": "installs ray (~240 MB); the Ray runner's factory is tests/test_scaleout.py",
    "export PREFECT_API_URL": "a shell setting for watching runs live in a running Prefect server",
}


def readme_commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands += [line.split("  #")[0].strip() for line in block.splitlines() if COMMAND.match(line.strip())]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [span.strip() for span in re.findall(r"`([^`\n]+)`", prose) if COMMAND.match(span.strip())]
    return commands


def key_of(command: str) -> str | None:
    matches = [k for k in (*COVERED, *NOT_RUN) if command.startswith(k)]
    return max(matches, key=len) if matches else None


def _test_exists(ref: str) -> bool:
    path, _, name = ref.partition("::")
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    return any(isinstance(node, ast.FunctionDef) and node.name == name for node in tree.body)


def test_every_readme_command_is_exercised_or_says_why_not():
    commands = readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(commands) > 15  # the extractor still finds the README's commands
    unmapped = [c for c in commands if key_of(c) is None]
    assert not unmapped, f"README commands with no test: {unmapped}; add the test to COVERED or a reason to NOT_RUN"
    for command in commands:
        key = key_of(command)
        ref = COVERED.get(key)
        assert ref is not None or key in NOT_RUN, command
        if ref == ".ci/run":
            assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
        elif ref is not None:
            assert _test_exists(ref), f"{command}: {ref} does not exist"


def test_the_extractor_finds_block_and_inline_commands():
    text = "```bash\nrealm run   # go\n# comment\n```\nthen `dvc dag` and `params.yaml`"
    assert readme_commands(text) == ["realm run", "dvc dag"]
    assert key_of("realm ui --tool prefect") == "realm ui --tool prefect" and key_of("realm ui") == "realm ui"
    assert key_of("ls -la") is None
