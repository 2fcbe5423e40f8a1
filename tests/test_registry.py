"""The champion rule of flows/registry.py (issue 15 item 1): evaluate moves `realm@champion` to
the version it scored only when that version's exact match is at least the champion's."""

from __future__ import annotations

import pytest

pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

from flows.registry import ALIAS, DECISION_TAG, EM_TAG, FINGERPRINT_TAG, MODEL_NAME, promote_if_champion  # noqa: E402


@pytest.fixture
def client(tmp_path):
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    c.create_experiment("t", artifact_location=str(tmp_path / "art"))
    return c


def _version(client: MlflowClient, fingerprint: str) -> str:
    """A registered version tagged as the finetune stage tags its model (no weights needed for the rule)."""
    try:
        client.create_registered_model(MODEL_NAME)
    except Exception:  # already there
        pass
    run = client.create_run(client.get_experiment_by_name("t").experiment_id)
    mv = client.create_model_version(
        MODEL_NAME, source="file:///nowhere", run_id=run.info.run_id, tags={FINGERPRINT_TAG: fingerprint}
    )
    return mv.version


def _evaluate(client: MlflowClient, fingerprint: str, em: float):
    run = client.create_run(client.get_experiment_by_name("t").experiment_id)
    decision = promote_if_champion(client, run.info.run_id, fingerprint, em)
    return decision, client.get_run(run.info.run_id).data.tags[DECISION_TAG]


def _champion(client: MlflowClient) -> str:
    return client.get_model_version_by_alias(MODEL_NAME, ALIAS).version


def test_the_first_scored_version_becomes_champion_a_worse_one_does_not_an_equal_one_does(client):
    v1 = _version(client, "fp-a")
    d1, tag1 = _evaluate(client, "fp-a", 5.0)
    assert d1.promoted and _champion(client) == v1 and "now realm@champion" in tag1
    assert float(client.get_model_version(MODEL_NAME, v1).tags[EM_TAG]) == 5.0

    v2 = _version(client, "fp-b")
    d2, tag2 = _evaluate(client, "fp-b", 3.0)
    assert not d2.promoted and _champion(client) == v1  # worse: the champion stays
    assert "not promoted" in tag2 and f"version {v1}" in tag2
    assert client.get_model_version(MODEL_NAME, v2).tags[DECISION_TAG] == tag2

    v3 = _version(client, "fp-c")
    d3, _ = _evaluate(client, "fp-c", 5.0)
    assert d3.promoted and _champion(client) == v3  # a tie promotes the newer model


def test_the_newest_version_of_a_fingerprint_is_scored(client):
    _version(client, "fp-a")
    newer = _version(client, "fp-a")  # the same finetune output registered again (e.g. `realm run --force`)
    decision, _ = _evaluate(client, "fp-a", 1.0)
    assert decision.version == newer and _champion(client) == newer


def test_no_matching_version_moves_nothing_and_says_so(client):
    v1 = _version(client, "fp-a")
    _evaluate(client, "fp-a", 2.0)
    decision, tag = _evaluate(client, "fp-unknown", 99.0)
    assert decision.version is None and not decision.promoted and _champion(client) == v1
    assert "no version" in tag and "fp-unknown" in tag


def test_without_any_registered_model_evaluate_still_finishes(client):
    decision, tag = _evaluate(client, "fp-a", 1.0)
    assert decision.version is None and "no version" in tag
