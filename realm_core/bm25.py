"""BM25 baseline retrieval with the `bm25s` library (Lucene-style BM25, k1 = 1.5, b = 0.75).

BM25 is the sparse baseline of the Open-QA literature (ORQA Table 5, DPR Table 2, REALM's
comparison point); we score it with the same has_answer rule and the same blocks as REALM.

    >>> bm25_retrieve(["Paris is the capital of France.", "Cats chase mice."], ["capital of France"], k=5)
    [[0]]

Tokenisation is bm25s's own (lower-case, the scikit-learn pattern `\\b\\w\\w+\\b`, bm25s's English
stopword list), after Unicode NFC so composed and decomposed accents tokenise alike. No stemming.

Ranking rule, stated because bm25s alone gets the edge cases wrong: only documents that share at
least one term with the query are returned (as Lucene/Pyserini do; Lucene idf is always > 0, so
that is exactly "score > 0"), best first, ties broken by document index. A query can therefore
get fewer than k results, and none when all its terms are stopwords or out of vocabulary.
`bm25s.BM25.retrieve` instead pads with arbitrary zero-score documents in argpartition order,
raises ValueError when k > number of documents, `get_scores([])` raises IndexError, and
`index` crashes on a corpus with no tokens at all.
"""

from __future__ import annotations

import unicodedata

import bm25s
import numpy as np

STOPWORDS = "en"


def bm25_tokenize(texts: list[str]) -> list[list[str]]:
    """bm25s tokens of each text: lower-cased words of 2+ characters, English stopwords removed."""
    normalised = [unicodedata.normalize("NFC", t) for t in texts]
    return bm25s.tokenize(normalised, stopwords=STOPWORDS, return_ids=False, show_progress=False)


def build_bm25(doc_tokens: list[list[str]], *, k1: float = 1.5, b: float = 0.75) -> bm25s.BM25:
    """A bm25s index (eager sparse score matrix, method "lucene") over tokenised documents.

    bm25s fails (`max() arg is an empty sequence`) when no document has any token; callers check.
    """
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(doc_tokens, show_progress=False)
    return retriever


def rank_documents(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the (at most k) positive scores, best first, ties by lower index."""
    candidates = np.flatnonzero(scores > 0)
    if len(candidates) > k:  # keep everything tied with the k-th best, then sort only those
        kth = np.partition(scores[candidates], len(candidates) - k)[len(candidates) - k]
        candidates = candidates[scores[candidates] >= kth]
    order = np.lexsort((candidates, -scores[candidates]))  # primary: score desc; secondary: index asc
    return candidates[order][:k].tolist()


def bm25_retrieve(docs: list[str], queries: list[str], k: int) -> list[list[int]]:
    """For each query, the indices of its top-k documents by BM25, best first (see module docstring)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    doc_tokens = bm25_tokenize(docs)
    if not any(doc_tokens):  # empty corpus, or only stopwords: nothing can match
        return [[] for _ in queries]
    retriever = build_bm25(doc_tokens)
    rankings: list[list[int]] = []
    for tokens in bm25_tokenize(queries):
        ids = retriever.get_tokens_ids(tokens)  # drops out-of-vocabulary terms
        if not ids:
            rankings.append([])
            continue
        rankings.append(rank_documents(retriever.get_scores_from_ids(ids), k))
    return rankings
