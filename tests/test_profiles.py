"""Profiles (profiles/<name>.yaml, `realm run --profile NAME`): a profile is a set of -S overrides,
so it runs as a DVC experiment whose params are versioned with its results."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.pipeline import check_overrides, dvc_command, profile_overrides
from realm_core.config import Params, ParamsError

ROOT = Path(__file__).resolve().parents[1]


def test_the_quality_profile_is_valid_params_and_uses_the_whole_corpus():
    overrides = profile_overrides(ROOT, "quality")
    check_overrides(ROOT / "params.yaml", overrides)  # raises on an unknown key or a bad value
    assert "corpus.max_passages=null" in overrides
    applied = yaml.safe_load((ROOT / "params.yaml").read_text())
    for item in overrides:
        key, _, value = item.partition("=")
        section, leaf = key.split(".")
        applied[section][leaf] = yaml.safe_load(value)
    params = Params.model_validate(applied)
    assert params.corpus.max_passages is None
    default = Params.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert params.pretrain.steps > default.pretrain.steps and params.finetune.steps > default.finetune.steps


def test_a_profile_becomes_dvc_experiment_overrides_and_an_explicit_set_wins(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "mine.yaml").write_text(
        "pretrain:\n  steps: 9\n  masking: random_spans\nevaluate:\n  recall_at: [1, 5]\n"
    )
    overrides = profile_overrides(tmp_path, "mine")
    assert overrides == ["pretrain.steps=9", "pretrain.masking=random_spans", "evaluate.recall_at=[1, 5]"]
    cmd = dvc_command([*overrides, "pretrain.steps=11"], force=False, name=None)
    assert cmd[3:5] == ["exp", "run"]
    assert cmd.index("pretrain.steps=11") > cmd.index("pretrain.steps=9")  # DVC applies -S in order: the last wins


def test_an_unknown_profile_names_the_ones_there_are(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "quality.yaml").write_text("ict:\n  steps: 1\n")
    with pytest.raises(ParamsError, match=r"no such profile; the profiles are quality"):
        profile_overrides(tmp_path, "qualty")


def test_a_broken_profile_is_refused_with_its_file_and_line(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "bad.yaml").write_text("ict:\n  steps: 1\n bad: [\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml:\d+: not valid YAML"):
        profile_overrides(tmp_path, "bad")
    (tmp_path / "profiles" / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ParamsError, match="a profile is a mapping"):
        profile_overrides(tmp_path, "list")
    (tmp_path / "profiles" / "typo.yaml").write_text("pretrain:\n  stepz: 3\n")
    with pytest.raises(ParamsError, match="pretrain.stepz"):
        check_overrides(ROOT / "params.yaml", profile_overrides(tmp_path, "typo"))
