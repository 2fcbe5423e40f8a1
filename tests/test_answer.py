"""`realm ask` and the HTTP API: the answer comes with the blocks the retriever chose and their
scores (REALM's interpretability, section 4.5), on a tiny fine-tuned project (tests/tiny_qa.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from flows.api import create_app
from flows.cli import app
from realm_core.answer import Answerer
from realm_core.blocks import query_batch
from tests.tiny_qa import make_finetuned_project

QUESTION = "Mozart lived in which city?"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_finetuned_project(tmp_path_factory.mktemp("qa"))


@pytest.fixture(scope="module")
def answerer(project):
    return Answerer.from_project(project)


def _brute_force_ranking(answerer: Answerer, question: str) -> tuple[np.ndarray, np.ndarray]:
    """Block ids by f(x, z) = Embed_input(x) . Embed_doc(z) over every block, without faiss."""
    model = answerer.model
    with torch.no_grad():
        model.query.eval()
        q = model.query(
            **query_batch(model.store, [model.store.query_ids(question, model.max_query_tokens)], model.device)
        )[0].numpy()
    scores = model.index.embeddings @ q  # [N]
    order = np.argsort(-scores, kind="stable")
    return order, scores[order]


def _assert_same_answer(got: dict, expected: dict) -> None:
    """Equal JSON, floats to 1e-5 (two loads of the same weights)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key == "evidence":
            assert len(got[key]) == len(value)
            for a, b in zip(got[key], value):
                _assert_same_answer(a, b)
        elif isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
        else:
            assert got[key] == value, key


# ----------------------------------------------------------------------------- answer_question


def test_evidence_is_the_top_k_blocks_by_retrieval_score_with_titles(answerer):
    answer = answerer(QUESTION, top_k=4)
    order, scores = _brute_force_ranking(answerer, QUESTION)
    assert [e.block_id for e in answer.evidence] == order[:4].tolist()
    assert [e.rank for e in answer.evidence] == [1, 2, 3, 4]
    np.testing.assert_allclose([e.score for e in answer.evidence], scores[:4], rtol=1e-5)
    blocks = answerer.model.store.blocks
    assert [(e.title, e.text) for e in answer.evidence] == [(blocks[z].title, blocks[z].text) for z in order[:4]]
    probs = [e.probability for e in answer.evidence]
    assert math.isclose(sum(probs), 1.0, rel_tol=1e-9) and probs == sorted(probs, reverse=True)


def test_the_answer_is_a_span_of_a_block_the_reader_read(answerer):
    answer = answerer(QUESTION, top_k=4)
    order, _ = _brute_force_ranking(answerer, QUESTION)
    assert answer.block_id in order[: answerer.reader_top_k].tolist()  # evaluate.top_k = 2 blocks read
    assert answer.answer and answer.answer in answerer.model.store.blocks[answer.block_id].text
    assert answer.block_title == answerer.model.store.blocks[answer.block_id].title
    assert math.isfinite(answer.score)


def test_top_k_changes_the_evidence_listed_not_the_answer(answerer):
    one, six = answerer(QUESTION, top_k=1), answerer(QUESTION, top_k=6)
    assert len(six.evidence) == 6 and len(one.evidence) == (1 if one.block_id == one.evidence[0].block_id else 2)
    assert (one.answer, one.block_id) == (six.answer, six.block_id)
    assert one.score == pytest.approx(six.score)
    assert one.evidence[0].block_id == six.evidence[0].block_id


def test_the_evidence_always_shows_the_block_the_answer_came_from_at_its_rank():
    from types import SimpleNamespace

    from realm_core.answer import answer_question

    blocks = [SimpleNamespace(title=f"t{i}", text=f"text {i}") for i in range(6)]
    retrieved, scores = [4, 2, 0, 5], [3.0, 2.0, 1.0, 0.5]

    class Reader:  # the reader's best span sits in the block ranked `answer_rank`
        store = SimpleNamespace(blocks=blocks)

        def __init__(self, answer_rank):
            self.block = retrieved[answer_rank - 1]

        def predict(self, questions, reader_top_k, retrieve_k):
            return [
                {"answer": "x", "score": 1.0, "block": self.block, "retrieved": retrieved, "retrieval_scores": scores}
            ]

    shown = answer_question(Reader(3), "q?", top_k=1, reader_top_k=4)
    assert [(e.rank, e.block_id) for e in shown.evidence] == [(1, 4), (3, 0)] and shown.block_id == 0
    assert sum(e.probability for e in shown.evidence) == pytest.approx(1.0)
    inside = answer_question(Reader(2), "q?", top_k=2, reader_top_k=4)
    assert [(e.rank, e.block_id) for e in inside.evidence] == [(1, 4), (2, 2)]


def test_ask_refuses_an_empty_question_before_loading_any_model(project, monkeypatch):
    import flows.cli

    monkeypatch.chdir(project)
    monkeypatch.setattr(flows.cli, "_load_answerer", lambda root: pytest.fail("loaded the model for an empty question"))
    result = CliRunner().invoke(app, ["ask", "  "])
    assert result.exit_code != 0 and "the question is empty" in result.output


# ----------------------------------------------------------------------------- realm ask


def test_ask_json_prints_one_object_equal_to_answer_question(project, answerer, monkeypatch):
    monkeypatch.chdir(project)
    result = CliRunner().invoke(app, ["ask", QUESTION, "--json", "--top-k", "3"])
    assert result.exit_code == 0, result.output
    _assert_same_answer(json.loads(result.stdout), answerer(QUESTION, top_k=3).to_dict())


def test_ask_prints_the_answer_and_a_table_of_evidence(project, answerer, monkeypatch):
    monkeypatch.chdir(project)
    result = CliRunner().invoke(app, ["ask", QUESTION, "--top-k", "3"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    expected = answerer(QUESTION, top_k=3)
    assert result.stdout.startswith(expected.answer)
    for e in expected.evidence:
        assert e.title in result.stdout and f"{e.score:.3f}" in result.stdout
    assert "f(x,z)" in result.stdout and "p(z|x)" in result.stdout


def test_ask_without_a_finetuned_model_names_the_directory_and_the_command(project, tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text((project / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["ask", QUESTION])
    assert result.exit_code == 1
    assert f"{tmp_path / 'data' / 'finetune'}: no such directory" in result.stderr
    assert "`realm run`" in result.stderr and "Traceback" not in result.output


# ----------------------------------------------------------------------------- HTTP API


def test_api_health_and_ask_return_what_realm_ask_json_prints(project, monkeypatch):
    loads = []
    real = Answerer.from_project.__func__

    def counting(cls, root):
        loads.append(root)
        return real(cls, root)

    monkeypatch.setattr(Answerer, "from_project", classmethod(counting))
    with TestClient(create_app(root=project)) as client:
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["blocks"] == 10
        first = client.post("/ask", json={"question": QUESTION, "top_k": 3})
        second = client.post("/ask", json={"question": "Who taught in Athens?"})
    assert first.status_code == 200 and second.status_code == 200
    assert len(loads) == 1  # the model loads once, at start-up
    assert len(second.json()["evidence"]) == 5  # default top_k
    monkeypatch.chdir(project)
    cli = CliRunner().invoke(app, ["ask", QUESTION, "--json", "--top-k", "3"])
    _assert_same_answer(first.json(), json.loads(cli.stdout))


@pytest.mark.parametrize(
    "body, words",
    [
        ({"question": ""}, "at least 1 character"),
        ({"question": "   "}, "the question is empty"),
        ({"question": "Who?", "top_k": 0}, "greater than or equal to 1"),
        ({"top_k": 3}, "Field required"),
    ],
)
def test_api_rejects_bad_requests_with_422(answerer, body, words):
    with TestClient(create_app(answerer)) as client:
        response = client.post("/ask", json=body)
    assert response.status_code == 422
    assert words in json.dumps(response.json())
