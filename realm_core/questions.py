"""Questions for the default demo, derived offline from the corpus (cloze), or read from files.

A seeded share of the sentences holding a salient span is *removed* from the corpus and turned
into a cloze question "sentence with one span replaced by [MASK] (title)", answer = the span,
kept only if the answer still occurs in a remaining block. Held-out sentences never appear in any
block, so pre-training (REALM section 3.4, salient span masking) cannot memorise them. Given
NQ-open style files (`corpus.qa_train` / `corpus.qa_dev`) those are used instead.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from realm_core.corpus import join_pieces, resolve_input
from realm_core.io import InputError
from realm_core.metrics import dpr_tokens, has_answer

MASK = "[MASK]"


def _rebuild(block: dict[str, Any], drop: set[int]) -> dict[str, Any] | None:
    """The block without the sentences at indices `drop` (offsets recomputed); None if nothing is left."""
    text, pieces, prev = block["text"], [], None
    for j, (s, e) in enumerate(block["sentences"]):
        if j in drop:
            continue
        sep = text[block["sentences"][j - 1][1] : s] if prev == j - 1 else " "
        pieces.append((sep, text[s:e], [(a - s, b - s, lab) for a, b, lab in block["spans"] if s <= a and b <= e]))
        prev = j
    if not pieces:
        return None
    new_text, sentences, spans = join_pieces(pieces)
    return {**block, "text": new_text, "sentences": sentences, "spans": spans}


def _cloze_options(block: dict[str, Any], j: int, max_question_words: int) -> list[tuple[str, str]]:
    """(question, answer) for each usable span of sentence j: the answer must not show in the
    question (elsewhere in the sentence or in the title) and the question must stay short."""
    text, title = block["text"], block["title"]
    s, e = block["sentences"][j]
    options = []
    for a, b, _ in block["spans"]:
        if not (s <= a and b <= e):
            continue
        answer = text[a:b]
        masked = f"{text[s:a]}{MASK}{text[b:e]}"
        question = f"{masked} ({title})" if title else masked
        if len(question.split()) > max_question_words or has_answer(question, [answer]):
            continue
        options.append((question, answer))
    return options


class _AnswerIndex:
    """Which blocks contain an answer, by DPR's token rule (metrics.has_answer), via an inverted index."""

    def __init__(self, texts: Sequence[str]):
        self.texts = texts
        self.postings: dict[str, set[int]] = {}
        for i, text in enumerate(texts):
            for token in set(dpr_tokens(text)):
                self.postings.setdefault(token, set()).add(i)

    def found(self, answer: str) -> bool:
        tokens = dpr_tokens(answer)
        if not tokens:
            return False
        candidates = set.intersection(*(self.postings.get(t, set()) for t in tokens))
        return any(has_answer(self.texts[i], [answer]) for i in sorted(candidates))


def make_cloze_questions(
    blocks: Sequence[dict[str, Any]],
    qa_fraction: float,
    qa_dev_fraction: float,
    seed: int,
    max_question_words: int = 32,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    """Hold out a seeded `qa_fraction` of the sentences with a usable salient span as cloze questions.

    Question = the sentence with one (seeded) span replaced by [MASK], then " (title)" so pronoun
    subjects stay answerable; answer = [span text]. The sentence is removed from its block (empty
    blocks dropped), and a question is kept only if its answer still occurs in some remaining
    block (DPR has_answer). Sentences occurring more than once in the corpus are never held out.
    Returns (remaining blocks, train questions, dev questions, stats); blocks keep their order.
    """
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    for block in blocks:
        for s, e in block["sentences"]:
            counts[block["text"][s:e]] = counts.get(block["text"][s:e], 0) + 1
    candidates = [
        (i, j)
        for i, block in enumerate(blocks)
        for j, (s, e) in enumerate(block["sentences"])
        if counts[block["text"][s:e]] == 1 and _cloze_options(block, j, max_question_words)
    ]
    picked = sorted(rng.sample(candidates, round(qa_fraction * len(candidates))))
    drop: dict[int, set[int]] = {}
    drafts = []
    for i, j in picked:
        question, answer = rng.choice(_cloze_options(blocks[i], j, max_question_words))
        drafts.append((question, answer))
        drop.setdefault(i, set()).add(j)
    remaining = [r for i, b in enumerate(blocks) if (r := _rebuild(b, drop.get(i, set()))) is not None]
    index = _AnswerIndex([b["text"] for b in remaining])
    questions, seen, unanswerable = [], set(), 0
    for question, answer in drafts:
        if question in seen:
            continue
        seen.add(question)
        if not index.found(answer):
            unanswerable += 1
            continue
        questions.append({"question": question, "answer": [answer]})
    order = list(range(len(questions)))
    rng.shuffle(order)
    n_dev = round(qa_dev_fraction * len(questions))
    if len(questions) >= 2:
        n_dev = min(max(n_dev, 1), len(questions) - 1)
    dev_ids = set(order[:n_dev])
    train = [q for k, q in enumerate(questions) if k not in dev_ids]
    dev = [q for k, q in enumerate(questions) if k in dev_ids]
    stats = {
        "qa_candidates": len(candidates),
        "qa_held_out_sentences": len(picked),
        "qa_unanswerable": unanswerable,
        "qa_blocks_dropped": len(blocks) - len(remaining),
        "qa_train": len(train),
        "qa_dev": len(dev),
    }
    return remaining, train, dev, stats


def load_qa_files(qa_train: str, qa_dev: str, root: Path | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """NQ-open style question files given in params (validated by finetune.load_questions)."""
    from realm_core.finetune import load_questions

    out = []
    for name, value in (("qa_train", qa_train), ("qa_dev", qa_dev)):
        path = resolve_input(value, root)
        if not path.is_file():
            raise InputError(f"{path}: corpus.{name} file not found; give an NQ-open style JSONL path or null")
        questions = load_questions(path)
        if not questions:
            raise InputError(f'{path}:1: no questions; corpus.{name} needs lines {{"question": str, "answer": [str, ...]}}')
        out.append([{"question": q.question, "answer": list(q.answers)} for q in questions])
    return out[0], out[1]
