"""Open-QA evaluation exactly as the literature computes it.

- Exact match: SQuAD normalisation as in ORQA `language/orqa/utils/eval_utils.py`
  (NFD, lower-case, drop ASCII punctuation, drop the articles a/an/the, squash white space),
  maximum over the reference answers. REALM reports this metric (Guu et al. 2020, Table 1).
- CuratedTREC: answers are regular expressions matched at the *start* of the prediction
  (ORQA eval_utils `regex_match_score`: `re.match` with IGNORECASE | UNICODE | MULTILINE).
- Retrieval recall@k: a retrieved block "has the answer" under DPR's token-level rule
  (Karpukhin et al. 2020, `dpr/data/qa_validation.py` `has_answer` with `SimpleTokenizer`);
  for CuratedTREC's regex answers, DPR's regex rule (`has_answer_regex`: searched anywhere).
- Answer spans for the reader: ORQA matches answers at the wordpiece level inside a block.

    >>> exact_match("The  Beatles!", ["beatles"])
    1.0
    >>> has_answer("He studied art in Paris.", ["art"]), has_answer("A smart move.", ["art"])
    (True, False)
"""

from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence

import regex  # a dependency of transformers; needed for DPR's \p{...} Unicode classes

from realm_core.io import InputError

# ORQA eval_utils: `set(string.punctuation)`, i.e. ASCII punctuation only.
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# DPR SimpleTokenizer: runs of letters/numbers/combining marks, or any single character that is
# neither a separator (Z) nor a control/format/unassigned code point (C).
_DPR_TOKEN = regex.compile(
    r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]", flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
)
_REGEX_FLAGS = re.IGNORECASE | re.UNICODE | re.MULTILINE


def _as_list(values: Iterable[str], what: str, *, allow_empty: bool = False) -> list[str]:
    """Reject a bare string where a list of strings is expected (iterating it would give characters)."""
    if isinstance(values, str):
        raise TypeError(f"{what} must be a list of strings, not a single str: wrap it as [{values!r}]")
    out = list(values)
    if not out and not allow_empty:
        raise InputError(f"{what} is empty: every question needs at least one reference answer")
    return out


# ----------------------------------------------------------------------------- exact match


def normalize_answer(s: str) -> str:
    """SQuAD/ORQA answer normalisation: NFD, lower, strip punctuation, drop articles, squash spaces.

    Same steps and order as ORQA eval_utils.normalize_answer: punctuation is removed before
    articles, so "the-end" becomes "theend" (not an article), and only whole-word articles go.
    """
    s = unicodedata.normalize("NFD", s).lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, references: Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0 (ORQA: max over references)."""
    pred = normalize_answer(prediction)
    return max(float(pred == normalize_answer(ref)) for ref in _as_list(references, "references"))


@functools.lru_cache(maxsize=4096)
def _compile_answer_regex(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags=_REGEX_FLAGS)
    except re.error as exc:
        raise InputError(
            f"invalid answer regex {pattern!r}: {exc}; CuratedTREC answers must be Python regular expressions"
        ) from None


def regex_match(prediction: str, patterns: Iterable[str]) -> float:
    """1.0 if any pattern matches at the start of the prediction (CuratedTREC), else 0.0.

    As ORQA eval_utils.regex_match_score: `re.match` (anchored at the start, not at the end) with
    IGNORECASE | UNICODE | MULTILINE on the raw prediction. Unlike ORQA, which scores an invalid
    regex as a miss, an invalid pattern raises InputError naming it.
    """
    compiled = [_compile_answer_regex(p) for p in _as_list(patterns, "patterns")]
    return max(float(c.match(prediction) is not None) for c in compiled)


# ----------------------------------------------------------------------------- retrieval


@functools.lru_cache(maxsize=16384)
def dpr_tokens(text: str) -> tuple[str, ...]:
    """DPR's uncased SimpleTokenizer words of `text` after NFD normalisation.

    Tokens are maximal runs of `[\\p{L}\\p{N}\\p{M}]` (letters, numbers, combining marks) or single
    characters that are not separators or control characters (`[^\\p{Z}\\p{C}]`), lower-cased.
    So "Café," -> ("cafe\\u0301", ","), and "U.S." -> ("u", ".", "s", ".").
    """
    return tuple(m.group().lower() for m in _DPR_TOKEN.finditer(unicodedata.normalize("NFD", text)))


def _contains(haystack: tuple[str, ...], needle: tuple[str, ...]) -> bool:
    """True if `needle` (non-empty) occurs as a contiguous sub-sequence of `haystack`."""
    n, first = len(needle), needle[0]
    return any(haystack[i] == first and haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def has_answer(text: str, answers: Iterable[str]) -> bool:
    """DPR's token-level answer test (the "string" match type of dpr/data/qa_validation.py).

    NFD-normalise and lower-case both sides, tokenise with DPR's SimpleTokenizer pattern
    `[\\p{L}\\p{N}\\p{M}]+|[^\\p{Z}\\p{C}]` (see `dpr_tokens`), and return True if the token
    sequence of any answer occurs contiguously in the text's tokens. Whole tokens only: "art"
    is not found in "smart". Punctuation tokens must match too ("U.S." needs "u . s ."), but
    punctuation next to a word does not block it ("Beatles!" contains "beatles").
    An answer with no tokens (empty or only spaces) is skipped, where DPR would count it as
    found; with no answers at all the result is False.
    """
    words = dpr_tokens(text)
    for answer in _as_list(answers, "answers", allow_empty=True):
        tokens = dpr_tokens(answer)
        if tokens and _contains(words, tokens):
            return True
    return False


def any_answerable(answer_sets: Sequence[Sequence[str]], texts: Sequence[str]) -> bool:
    """True if an answer of some question occurs in some text by `has_answer` (DPR's rule): with
    none, ORQA's marginal gives fine-tuning no signal at all (its loss is exactly 0).

    An answer whose first DPR token is not even a substring of the lower-cased NFD corpus cannot
    match, so it is skipped before any per-text test (a necessary condition, never a false no).
    """
    corpus = unicodedata.normalize("NFD", "\n".join(texts)).lower()
    for answers in answer_sets:
        possible = [a for a in answers if (tokens := dpr_tokens(a)) and tokens[0] in corpus]
        if possible and any(has_answer(text, possible) for text in texts):
            return True
    return False


@functools.lru_cache(maxsize=4096)
def _compile_passage_regex(pattern: str) -> regex.Pattern:
    try:
        return regex.compile(
            unicodedata.normalize("NFD", pattern), flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
        )
    except regex.error as exc:
        raise InputError(
            f"invalid answer regex {pattern!r}: {exc}; CuratedTREC answers must be regular expressions"
        ) from None


def has_answer_regex(text: str, patterns: Iterable[str]) -> bool:
    """DPR's "regex" match type (dpr/data/qa_validation.py), used for CuratedTREC retrieval recall.

    Text and pattern are NFD-normalised, and the pattern is *searched* anywhere in the passage
    (`regex.search`, IGNORECASE | UNICODE | MULTILINE), unlike `regex_match`, which scores a
    reader's prediction and must match at its start. An invalid pattern raises InputError
    (DPR counts it as a miss). With no patterns the result is False.
    """
    text = unicodedata.normalize("NFD", text)
    return any(
        _compile_passage_regex(p).search(text) is not None for p in _as_list(patterns, "patterns", allow_empty=True)
    )


def recall_at_k(hits: Sequence[Sequence[bool]], ks: Iterable[int]) -> dict[str, float]:
    """Fraction of questions with at least one answer-bearing item among their first k retrieved.

    `hits[q][r]` says whether the rank-r item retrieved for question q has an answer (e.g. by
    `has_answer`); a row may be shorter than k when fewer items were retrieved. Keys are
    "recall@k", values in [0, 1] (DPR Table 2 reports these as percentages).
    """
    ks = list(ks)
    if not hits:
        raise ValueError("recall_at_k needs at least one question")
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    first_hit = [next((r for r, h in enumerate(row) if h), None) for row in hits]  # rank of first hit per question
    return {f"recall@{k}": sum(r is not None and r < k for r in first_hit) / len(hits) for k in ks}


# ----------------------------------------------------------------------------- reader targets


def answer_spans(
    block_token_ids: Sequence[int], answer_token_ids: Sequence[Sequence[int]], max_span_tokens: int
) -> list[tuple[int, int]]:
    """All (start, end) positions, end inclusive, where an answer's wordpieces occur in the block.

    ORQA marks every occurrence of every answer in the retrieved block's wordpieces as a gold span
    for the reader; answers longer than `max_span_tokens` (ORQA/REALM: 10) can never be predicted
    and are skipped, as are empty answers. Returned sorted and without duplicates.
    """
    block = list(block_token_ids)
    spans: set[tuple[int, int]] = set()
    for answer in answer_token_ids:
        answer = list(answer)
        n = len(answer)
        if n == 0 or n > max_span_tokens:
            continue
        for start in range(len(block) - n + 1):
            if block[start] == answer[0] and block[start : start + n] == answer:
                spans.add((start, start + n - 1))
    return sorted(spans)


class AnswerIndex:
    """Which texts contain an answer, by DPR's token rule (`has_answer`), via an inverted index.

    A text holding an answer's token sequence holds each of its tokens, so only the texts in the
    intersection of the answer tokens' postings need the full has_answer check.
    """

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

    def containing(self, answers: Sequence[str]) -> set[int]:
        """Indices of the texts that hold any of `answers`; equals {i : has_answer(texts[i], answers)}."""
        found: set[int] = set()
        for answer in answers:
            tokens = dpr_tokens(answer)
            if tokens:
                candidates = set.intersection(*(self.postings.get(t, set()) for t in tokens)) - found
                found |= {i for i in candidates if has_answer(self.texts[i], [answer])}
        return found


def answer_sets(
    texts: Sequence[str], answers: Sequence[Sequence[str]], regex: Sequence[bool] | None = None
) -> list[set[int]]:
    """Per question, the positions of the texts that hold one of its answers: DPR's token rule
    (`has_answer`, through one AnswerIndex), or its regex rule where `regex[q]` (CuratedTREC)."""
    index = AnswerIndex(texts)
    regex = regex or [False] * len(answers)
    return [
        {i for i, t in enumerate(texts) if has_answer_regex(t, a)} if r else index.containing(a)
        for a, r in zip(answers, regex, strict=True)
    ]


def hit_table(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int]]) -> list[list[bool]]:
    """hits[q][r] = the rank-r passage retrieved for question q is relevant (for `recall_at_k`)."""
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings for {len(relevant)} questions")
    return [[z in rel for z in ranking] for ranking, rel in zip(rankings, relevant)]
