"""Hand-checked cases for the evaluation rules (ORQA eval_utils, DPR has_answer) and the BM25 baseline."""

from __future__ import annotations

import pytest

from realm_core.bm25 import bm25_retrieve
from realm_core.io import InputError
from realm_core.metrics import (
    answer_spans,
    dpr_tokens,
    exact_match,
    has_answer,
    has_answer_regex,
    normalize_answer,
    recall_at_k,
    regex_match,
)

# ----------------------------------------------------------------------------- normalize / EM


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("The  Beatles!", "beatles"),
        ("  A  Tale of Two Cities. ", "tale of two cities"),
        ("theatre", "theatre"),  # articles only as whole words
        ("an anthem", "anthem"),
        ("Thea and the bat", "thea and bat"),
        ("the-end", "theend"),  # punctuation goes first (ORQA order): no article left
        ("Café", "cafe\u0301"),  # NFD: e + combining acute
        ("Cafe\u0301", "cafe\u0301"),  # decomposed input gives the same result
        ("U.S.", "us"),
        ("Don't", "dont"),
        ("“quoted”", "“quoted”"),  # only ASCII punctuation is removed, as in ORQA
    ],
)
def test_normalize_answer(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_exact_match_is_max_over_references() -> None:
    assert exact_match("The  Beatles!", ["beatles"]) == 1.0
    assert exact_match("Café", ["Cafe\u0301"]) == 1.0
    assert exact_match("Cafe", ["Café"]) == 0.0  # NFD keeps the accent as a separate mark
    assert exact_match("Paris", ["London", "paris."]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("the", ["a"]) == 1.0  # both normalise to ""


def test_exact_match_rejects_bad_references() -> None:
    with pytest.raises(TypeError, match="single str"):
        exact_match("Paris", "Paris")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="empty"):
        exact_match("Paris", [])


# ----------------------------------------------------------------------------- regex (CuratedTREC)


def test_regex_match_at_start_only_and_case_insensitive() -> None:
    assert regex_match("Mount Everest", [r"mount\s+everest"]) == 1.0
    assert regex_match("Everest is high", ["everest"]) == 1.0  # re.match: not anchored at the end
    assert regex_match("Mount Everest", ["everest"]) == 0.0  # not at the start
    assert regex_match("1990s", [r"19\d0", "nope"]) == 1.0
    assert regex_match("Beatles", ["stones", "rolling"]) == 0.0


def test_regex_match_scores_the_raw_prediction_as_orqa() -> None:
    # ORQA eval_utils.regex_match_score: no answer normalisation before re.match.
    assert regex_match("the Beatles", ["beatles"]) == 0.0
    assert regex_match("THE BEATLES", ["the beatles$"]) == 1.0
    assert regex_match("1991 war", [r"\b1991\b"]) == 1.0
    assert regex_match("Dec. 25", [r"Dec.*\b2[45]\b"]) == 1.0  # a CuratedTREC test pattern
    assert regex_match("December 26", [r"Dec.*\b2[45]\b"]) == 0.0


def test_regex_match_invalid_pattern_names_it() -> None:
    with pytest.raises(InputError, match=r"\(unclosed"):
        regex_match("anything", ["ok", "(unclosed"])


# ----------------------------------------------------------------------------- has_answer (DPR)


def test_dpr_tokens() -> None:
    assert dpr_tokens("Café, U.S.!") == ("cafe\u0301", ",", "u", ".", "s", ".", "!")
    assert dpr_tokens("Hello  WORLD 1,000") == ("hello", "world", "1", ",", "000")


HAS_ANSWER_CASES = [
    ("The Beatles were a band.", ["beatles"], True),
    ("I love the Beatles!", ["The Beatles"], True),  # punctuation next to a word is its own token
    ("A smart move.", ["art"], False),  # whole tokens only
    ("Artful dodger", ["art"], False),
    ("He studied art in Paris.", ["art"], True),
    ("Made in the U.S.A. in 1990", ["U.S."], True),  # punctuation tokens match too
    ("Made in the USA", ["U.S."], False),
    ("He was born in 1,990.", ["1990"], False),
    ("Café society", ["cafe\u0301"], True),  # NFD on both sides
    ("Cafe society", ["Café"], False),
    ("New York City", ["York New"], False),  # contiguous and in order
    ("new york city", ["Boston", "NEW YORK"], True),  # any answer
    ("anything", ["", "   "], False),  # answers with no tokens are skipped
    ("anything", [], False),
]


@pytest.mark.parametrize(("text", "answers", "expected"), HAS_ANSWER_CASES)
def test_has_answer(text: str, answers: list[str], expected: bool) -> None:
    assert has_answer(text, answers) is expected


def test_answer_index_finds_exactly_the_texts_has_answer_accepts():
    """The fine-tuning loss reads answer-bearing blocks from AnswerIndex; it must be has_answer's set."""
    from realm_core.metrics import AnswerIndex

    texts = [text for text, _, _ in HAS_ANSWER_CASES]
    index = AnswerIndex(texts)
    for _, answers, _ in HAS_ANSWER_CASES:
        assert index.containing(answers) == {i for i, t in enumerate(texts) if has_answer(t, answers)}
    assert index.containing(["art"]) == {4}  # "He studied art in Paris." only, not "A smart move."


def test_answer_sets_and_hit_table_are_has_answer_over_the_rankings():
    """evaluate's recall and the benchmarks' recall share these two: the answer-bearing texts
    per question (token rule, or the regex rule where asked), then hits along each ranking."""
    from realm_core.metrics import answer_sets, hit_table

    texts = [text for text, _, _ in HAS_ANSWER_CASES]
    answers = [a for _, a, _ in HAS_ANSWER_CASES] + [["Par+is"]]
    regex = [False] * len(HAS_ANSWER_CASES) + [True]
    sets = answer_sets(texts, answers, regex)
    for a, r, found in zip(answers, regex, sets):
        rule = has_answer_regex if r else has_answer
        assert found == {i for i, t in enumerate(texts) if rule(t, a)}
    assert 4 in sets[-1]  # the regex finds "Paris"
    rankings = [[i, (i + 1) % len(texts)] for i in range(len(answers))]
    hits = hit_table(rankings, sets)
    assert hits == [[z in s for z in ranking] for ranking, s in zip(rankings, sets)]
    with pytest.raises(ValueError, match="rankings for"):
        hit_table(rankings[:-1], sets)


@pytest.mark.parametrize(
    ("text", "patterns", "expected"),
    [
        ("The Soviet Union had 15 republics.", [r"\b15\b|fifteen"], True),  # searched anywhere, not only at the start
        ("It had 150 members.", [r"\b15\b"], False),
        ("christmas is on DECEMBER 25.", [r"Dec.*\b2[45]\b"], True),  # case-insensitive
        ("Café society", ["cafe\u0301"], True),  # NFD on text and pattern, as DPR
        ("Cafe\u0301 society", ["Café"], True),
        ("line one\nAnswer: Iraq", ["^answer"], True),  # MULTILINE: ^ at every line
        ("Iraq", [], False),
    ],
)
def test_has_answer_regex_is_dprs_regex_rule(text: str, patterns: list[str], expected: bool) -> None:
    assert has_answer_regex(text, patterns) is expected


def test_has_answer_regex_rejects_invalid_and_bare_patterns() -> None:
    with pytest.raises(InputError, match=r"Sievert"):
        has_answer_regex("x", ["Sievert \\(Sv\\)\\"])
    with pytest.raises(TypeError, match="single str"):
        has_answer_regex("x", "Iraq")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- recall@k


def test_recall_at_k_on_a_hand_made_table() -> None:
    hits = [
        [True, False, False, False, False],  # first hit at rank 0
        [False, False, True, False, False],  # rank 2
        [False, False, False, False, True],  # rank 4
        [False, False, False, False, False],  # never
    ]
    assert recall_at_k(hits, [1, 3, 5, 20]) == {"recall@1": 0.25, "recall@3": 0.5, "recall@5": 0.75, "recall@20": 0.75}


def test_recall_at_k_short_rows_and_errors() -> None:
    assert recall_at_k([[False, True], []], [1, 2, 10]) == {"recall@1": 0.0, "recall@2": 0.5, "recall@10": 0.5}
    with pytest.raises(ValueError):
        recall_at_k([], [1])
    with pytest.raises(ValueError):
        recall_at_k([[True]], [0])


# ----------------------------------------------------------------------------- answer spans (ORQA)


def test_answer_spans_all_occurrences_inclusive_end() -> None:
    block = [7, 1, 2, 3, 9, 1, 2, 5, 1]
    assert answer_spans(block, [[1, 2]], max_span_tokens=10) == [(1, 2), (5, 6)]
    assert answer_spans(block, [[1, 2], [9], [1, 2]], max_span_tokens=10) == [(1, 2), (4, 4), (5, 6)]
    assert answer_spans(block, [[2, 1]], max_span_tokens=10) == []
    assert answer_spans(block, [[1]], max_span_tokens=10) == [(1, 1), (5, 5), (8, 8)]
    assert answer_spans(block, [[5, 1, 4]], max_span_tokens=10) == []  # runs off the end


def test_answer_spans_skips_long_and_empty_answers() -> None:
    block = [1, 2, 3, 4]
    assert answer_spans(block, [[1, 2, 3]], max_span_tokens=2) == []
    assert answer_spans(block, [[1, 2, 3], [3, 4], []], max_span_tokens=2) == [(2, 3)]


# ----------------------------------------------------------------------------- BM25 (bm25s)

DOCS = [
    "Paris is the capital and largest city of France.",
    "The Berlin Wall fell in 1989, reuniting Germany.",
    "Mount Everest is the highest mountain above sea level.",
    "The Beatles were an English rock band formed in Liverpool.",
]


def test_bm25_finds_the_obvious_document() -> None:
    rankings = bm25_retrieve(
        DOCS, ["capital of France", "When did the Berlin Wall fall?", "highest mountain", "Liverpool rock band"], k=2
    )
    assert [r[0] for r in rankings] == [0, 1, 2, 3]
    assert all(len(r) <= 2 for r in rankings)


def test_bm25_only_returns_matching_documents_and_handles_large_k() -> None:
    rankings = bm25_retrieve(DOCS, ["France Germany", "France"], k=100)  # k > len(docs)
    assert sorted(rankings[0]) == [0, 1]
    assert rankings[1] == [0]


def test_bm25_out_of_vocabulary_and_stopword_queries_return_nothing() -> None:
    assert bm25_retrieve(DOCS, ["zyzzyva quux", "the of and", ""], k=3) == [[], [], []]
    assert bm25_retrieve(DOCS, ["zyzzyva Everest"], k=3) == [[2]]  # the in-vocabulary term still counts


def test_bm25_ties_broken_by_document_index_and_degenerate_corpora() -> None:
    assert bm25_retrieve(["red apple", "green pear", "red apple"], ["apple"], k=3) == [[0, 2]]
    assert bm25_retrieve(["the", "a"], ["the cat"], k=3) == [[]]  # no token in the whole corpus
    assert bm25_retrieve([], ["cat"], k=3) == [[]]
    with pytest.raises(ValueError):
        bm25_retrieve(DOCS, ["France"], k=0)


def test_any_answerable_agrees_with_has_answer_over_a_corpus():
    from realm_core.metrics import any_answerable

    texts = ["The U . S . Army marched.", "Café society in Paris."]
    assert any_answerable([["nowhere"], ["U.S."]], texts)  # punctuation spaced differently: still DPR's match
    assert any_answerable([["CAFE\u0301"]], texts)  # NFD and case, as has_answer
    assert not any_answerable([["smart"], ["art"], []], ["Smartphones"])  # whole tokens only
    assert not any_answerable([], texts)
