"""Real training questions (realm_core/benchmarks.training_questions, bench/training_questions.py):
never an evaluation question, SQuAD split by article. Needs ../shared/data; skips without it."""

from __future__ import annotations

from pathlib import Path

import pytest

from realm_core.benchmarks import (
    EVALUATION_FILES,
    SQUAD_ZIP,
    squad_article,
    squad_article_half,
    training_questions,
)
from realm_core.questions import QAExample, read_questions, read_squad

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / SQUAD_ZIP).is_file(), reason="../shared/data is absent")


def _q(text: str, article: int, paragraph: int = 0) -> QAExample:
    return QAExample(text, ("a",), False, (f"squad-dev-{article:02d}-{paragraph:03d}",))


def test_the_squad_halves_split_by_article_and_never_move():
    questions = [_q(f"q{a}-{p}", a, p) for a in range(10) for p in range(3)]
    train, test = squad_article_half(questions, "train"), squad_article_half(questions, "test")
    assert len(train) + len(test) == len(questions) and len(test) == 15
    assert not {squad_article(q) for q in train} & {
        squad_article(q) for q in test
    }  # every paragraph of an article on one side
    assert squad_article_half(list(reversed(questions)), "test") == list(reversed(test))  # fixed, whatever the order
    with pytest.raises(ValueError, match="'train' or 'test'"):
        squad_article_half(questions, "dev")


@needs_data
def test_training_questions_hold_no_evaluation_question(tmp_path):
    from bench.training_questions import main

    out = main(["--data", str(DATA), "--out", str(tmp_path / "qa.jsonl")])
    written = read_questions(out)
    questions, counts = training_questions(DATA)
    assert len(written) == len(questions) > 10_000
    key = lambda t: " ".join(t.lower().split()).rstrip("?").strip()  # noqa: E731
    evaluation = {key(q.question) for name in EVALUATION_FILES for q in read_questions(DATA / name)}
    _, squad = read_squad(DATA / SQUAD_ZIP)
    evaluation |= {key(q.question) for q in squad_article_half(squad, "test")}
    assert not {key(q.question) for q in written} & evaluation
    assert any(
        "dropped" in name and n > 0 for name, n in counts.items()
    )  # the vital-linked SQuAD questions overlap the train half
