"""Evaluation on held-out questions: exact match and retrieval recall@k, with BM25 beside it.

EM uses SQuAD/ORQA normalisation (metrics.normalize_answer), max over reference answers.
Recall@k counts a question as retrieved when one of its top-k blocks has an answer under
DPR's token-level rule (metrics.has_answer); BM25 (bm25s) is scored with the same rule on the
same blocks and questions.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from realm_core.blocks import BlockStore, query_batch
from realm_core.bm25 import bm25_retrieve
from realm_core.finetune import OpenQA
from realm_core.index import DenseIndex
from realm_core.metrics import answer_sets, exact_match, hit_table, recall_at_k
from realm_core.modeling import Embedder
from realm_core.questions import QAExample


def _query_text(question: str) -> str:
    """BM25 sees the question without the cloze marker of derived questions."""
    return question.replace("[MASK]", " ")


def evaluate_open_qa(
    model: OpenQA, questions: list[QAExample], *, recall_at: list[int], top_k: int, batch_size: int = 16
) -> tuple[dict[str, float], list[dict]]:
    """Metrics for the fine-tuned retriever + reader and for BM25; also the per-question predictions."""
    if not questions:
        raise ValueError("no evaluation questions")
    depth = max(recall_at)
    predictions: list[dict] = []
    for start in tqdm(range(0, len(questions), batch_size), desc="evaluate", unit="batch", mininterval=2.0):
        chunk = questions[start : start + batch_size]
        for q, p in zip(chunk, model.predict([c.question for c in chunk], top_k, depth)):
            p.update(question=q.question, answers=q.answers, em=exact_match(p["answer"], q.answers))
            predictions.append(p)
    metrics = {
        "exact_match": 100.0 * sum(p["em"] for p in predictions) / len(predictions),
        "questions": float(len(questions)),
    }
    relevant = [model.answer_blocks(q.answers) for q in questions]  # the model's AnswerIndex, built once
    realm_hits = hit_table([p["retrieved"][:depth] for p in predictions], relevant)
    metrics.update({f"realm_{k}": 100.0 * v for k, v in recall_at_k(realm_hits, recall_at).items()})
    docs = [f"{b.title} {b.text}" for b in model.store.blocks]
    bm25 = bm25_retrieve(docs, [_query_text(q.question) for q in questions], depth)
    metrics.update({f"bm25_{k}": 100.0 * v for k, v in recall_at_k(hit_table(bm25, relevant), recall_at).items()})
    for p, ranking in zip(predictions, bm25):
        p["bm25_retrieved"] = ranking
    return metrics, predictions


def retriever_recall(
    model: OpenQA, questions: list[QAExample], *, recall_at: list[int], batch_size: int = 16
) -> dict[str, float]:
    """Recall@k of the model's query embedder over its index, without the reader.

    With the pre-trained query embedder and the index of the pre-trained document embedder this
    is the zero-shot retrieval recall of REALM's Table 2 (no fine-tuning involved).
    """
    return dense_recall(
        model.query,
        model.store,
        model.index,
        questions,
        recall_at=recall_at,
        max_query_tokens=model.max_query_tokens,
        device=model.device,
        batch_size=batch_size,
        relevant=[model.answer_blocks(q.answers) for q in questions],
    )


def dense_recall(
    query: Embedder,
    store: BlockStore,
    index: DenseIndex,
    questions: list[QAExample],
    *,
    recall_at: list[int],
    max_query_tokens: int,
    device: torch.device,
    batch_size: int = 16,
    relevant: list[set[int]] | None = None,
) -> dict[str, float]:
    """Recall@k (in %) of `query` over `index` (dropout off, the embedder's mode restored).

    `relevant`: each question's answer-bearing blocks (metrics.answer_sets over the store), for a
    caller that scores the same questions again and again (pre-training, at every new index);
    computed here when not given."""
    depth = max(recall_at)
    was_training = query.training
    query.eval()
    rankings: list[list[int]] = []
    with torch.no_grad():
        for start in range(0, len(questions), batch_size):
            ids = [store.query_ids(q.question, max_query_tokens) for q in questions[start : start + batch_size]]
            _, found = index.search(
                query(**query_batch(store, ids, device)).float().cpu().numpy(), min(depth, len(index))
            )
            rankings += found.tolist()
    query.train(was_training)
    if relevant is None:
        relevant = answer_sets([b.text for b in store.blocks], [q.answers for q in questions])
    return {k: 100.0 * v for k, v in recall_at_k(hit_table(rankings, relevant), recall_at).items()}
