"""`realm ask` on the quality profile's artefacts (issue "REALM that learns (2 of 2)", item 6).

Questions whose answer the vital corpus states in the article the question names (checked when
this list was written: the answer occurs in a passage with that title). Each must get the right
answer, read from evidence that includes that article. These are a check of the finished model,
never a tuning set.

Runs only where the quality artefacts exist: `REALM_QUALITY_ROOT` (a project directory after
`realm run --profile quality`), or this project when its data/ was built from the whole corpus.
Skips otherwise, which is the case in CI (the quality run takes about an hour).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FULL_CORPUS_PASSAGES = 10033

QUESTIONS = [  # (question, a word the answer must contain, the article that states it)
    ("who wrote the nutcracker ballet?", "tchaikovsky", "The Nutcracker"),
    ("what is the capital of france?", "paris", "France"),
    ("who painted the mona lisa?", "leonardo", "Mona Lisa"),
    ("who wrote hamlet?", "shakespeare", "Hamlet"),
    ("what is the capital of japan?", "tokyo", "Japan"),
    ("who developed the theory of relativity?", "einstein", "Theory of relativity"),
    ("who wrote pride and prejudice?", "austen", "Pride and Prejudice"),
    ("what is the capital of italy?", "rome", "Italy"),
    ("who composed the magic flute?", "mozart", "The Magic Flute"),
    ("who wrote war and peace?", "tolstoy", "War and Peace"),
    ("what is the capital of egypt?", "cairo", "Egypt"),
    ("what is the capital of russia?", "moscow", "Russia"),
    ("who painted the starry night?", "gogh", "The Starry Night"),
    ("who wrote don quixote?", "cervantes", "Don Quixote"),
]


def quality_root() -> Path | None:
    root = Path(os.environ.get("REALM_QUALITY_ROOT", ROOT))
    stats = root / "data" / "corpus" / "stats.json"
    if not stats.is_file() or not (root / "data" / "finetune").is_dir():
        return None
    built = json.loads(stats.read_text())
    return root if built.get("source") == "vital" and built.get("passages") == FULL_CORPUS_PASSAGES else None


@pytest.fixture(scope="module")
def answerer():
    root = quality_root()
    if root is None:
        pytest.skip("no quality artefacts (run `realm run --profile quality`, or set REALM_QUALITY_ROOT)")
    from realm_core.answer import Answerer

    return Answerer.from_project(root)


@pytest.mark.parametrize(("question", "expected", "article"), QUESTIONS)
def test_ask_answers_from_the_article_that_states_it(answerer, question, expected, article):
    answer = answerer(question, top_k=5)
    titles = [e.title for e in answer.evidence]
    assert article in titles, (question, titles)
    assert expected in answer.answer.lower(), (question, answer.answer, answer.block_title)
