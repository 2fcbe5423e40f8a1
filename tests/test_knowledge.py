"""Knowledge updated without retraining (issue 15 item 7; REALM's "modular" knowledge):
`realm index add FILE` makes a new passage retrievable and answerable, `realm index remove`
takes it (or a corpus passage) out again, and `realm ask` / the API read the change."""

from __future__ import annotations

import json

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from flows.api import create_app
from flows.cli import app
from realm_core.answer import Answerer
from realm_core.knowledge import load_knowledge
from tests.tiny_qa import make_finetuned_project

FACT = "Zorblatt Quenthal wrote the opera The Glass Heron in Mibbleton."
QUESTION = "Zorblatt Quenthal wrote the opera The Glass Heron in which town?"
NEW_ID = "Zorblatt Quenthal"


@pytest.fixture
def project(tmp_path, monkeypatch):
    # all-MiniLM-L6-v2's mean pooling, one tower for questions and blocks: retrieval by meaning without training
    root = make_finetuned_project(tmp_path / "p", shared=True, backbone="minilm")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["top_k"] = 1  # the reader reads the top block only: the answer's provenance is exact
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(root)
    return root


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _ask(root, top_k: int = 11):
    return Answerer.from_project(root)(QUESTION, top_k=top_k)


def _dvc_project(root) -> None:
    import subprocess
    import sys
    from pathlib import Path

    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(Path(sys.executable).with_name("dvc")), "init", "-q"], cwd=root, check=True)


def _version_md5(root) -> str:
    return yaml.safe_load((root / "data" / "knowledge.dvc").read_text())["outs"][0]["md5"]


def test_an_added_passage_is_retrieved_and_answered_from_and_a_removed_one_is_not(project, tmp_path):
    _dvc_project(project)  # so each change is versioned with `dvc add`
    before = _ask(project)
    assert all(e.title != NEW_ID for e in before.evidence)  # the 10 corpus blocks only

    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"id": NEW_ID, "title": NEW_ID, "text": FACT}) + "\n")
    added = _cli("index", "add", str(new))
    assert added.exit_code == 0, added.output
    assert "added 1 passage(s) as 1 block(s)" in added.output and "versioned as data/knowledge.dvc" in added.output
    version_added = _version_md5(project)

    after = _ask(project)
    assert len(after.evidence) == 11  # the new block is in the index and the store
    top = after.evidence[0]
    assert (top.block_id, top.title, top.text) == (10, NEW_ID, FACT)  # ids continue the corpus's
    assert after.block_id == 10 and after.answer and after.answer in FACT  # answered from the new passage
    with TestClient(create_app(root=project)) as api:  # the API loads the same knowledge
        served = api.post("/ask", json={"question": QUESTION, "top_k": 3}).json()
    assert served["block_id"] == 10 and served["evidence"][0]["title"] == NEW_ID
    assert "1 passage(s) added" in _cli("index", "list").output

    again = _cli("index", "add", str(new))  # the same id twice: refused, nothing changes
    assert again.exit_code != 0 and "already in the index" in again.output

    removed = _cli("index", "remove", "--ids", NEW_ID)
    assert removed.exit_code == 0, removed.output
    assert _version_md5(project) != version_added  # a new version of data/knowledge
    gone = _ask(project)
    assert len(gone.evidence) == 10 and all(e.block_id != 10 for e in gone.evidence) and gone.block_id != 10
    assert [e.block_id for e in gone.evidence] == [e.block_id for e in before.evidence]  # back to the corpus


def test_removing_a_corpus_passage_takes_its_blocks_out_and_unknown_ids_are_refused(project):
    first = _ask(project).evidence[0]
    passage = first.title  # tests/tiny.py: one block per passage, titled by its passage id
    assert _cli("index", "remove", "--ids", passage).exit_code == 0
    assert all(e.title != passage for e in _ask(project).evidence)
    assert load_knowledge(project / "data" / "knowledge").removed == [passage]
    unknown = _cli("index", "remove", "--ids", "No Such Passage")
    assert unknown.exit_code != 0 and "no such passage in the index: No Such Passage" in unknown.output
    twice = _cli("index", "remove", "--ids", passage)  # already removed
    assert twice.exit_code != 0


def test_adding_to_a_project_without_a_finetuned_index_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"id": "a", "title": "a", "text": FACT}) + "\n")
    out = _cli("index", "add", str(new))
    assert out.exit_code != 0 and "blocks.jsonl: not found" in out.output


def test_an_overlay_over_an_index_rebuilt_since_is_refused_not_mixed(project, tmp_path):
    """Additions embedded with the old document tower must not be searched beside a new index."""
    import numpy as np

    from realm_core.index import DenseIndex

    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"id": NEW_ID, "title": NEW_ID, "text": FACT}) + "\n")
    assert _cli("index", "add", str(new)).exit_code == 0
    index_dir = project / "data" / "finetune" / "index"
    old = DenseIndex.load(index_dir)
    rebuilt = DenseIndex(
        old.embeddings[::-1].copy(), old.ids, meta=old.meta
    )  # as a rerun of finetune with a new doc tower
    rebuilt.save(index_dir)
    out = _cli("ask", QUESTION)
    assert out.exit_code != 0 and "extends another index" in out.output and "data/knowledge" in out.output
    assert np.array_equal(DenseIndex.load(index_dir).ids, old.ids)


def test_a_removed_corpus_passage_can_be_replaced_and_the_old_blocks_stay_out(project, tmp_path):
    passage = _ask(project).evidence[0].title
    assert _cli("index", "remove", "--ids", passage).exit_code == 0
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"id": passage, "title": passage, "text": FACT}) + "\n")
    assert _cli("index", "add", str(new)).exit_code == 0  # the same id again: a replacement
    evidence = _ask(project).evidence
    mine = [e for e in evidence if e.title == passage]
    assert [(e.block_id, e.text) for e in mine] == [(10, FACT)]  # the new block only; the corpus's stays removed
