"""Open-QA fine-tuning as in ORQA / REALM (section 3.2 "Open-QA fine-tuning", ORQA code).

The document embedder is frozen: all blocks are embedded once and the index never changes.
The query embedder and the span reader train on two losses, batched over questions:
  retriever loss: -log sum over the top-K retrieved blocks that contain an answer of p(z|x),
                  with p(z|x) a softmax over those K blocks (K = finetune.retriever_top_k);
  reader loss:    one softmax over every (block, span) pair of the top-k blocks, the retriever
                  score added to each span score; -log of the mass on spans matching an answer.
Each loss is zero for a question with nothing correct retrieved (ORQA).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from realm_core import distributed
from realm_core.blocks import BlockStore, pad_batch, query_batch
from realm_core.checkpoint import Checkpointer
from realm_core.config import FinetuneParams
from realm_core.index import DenseIndex
from realm_core.logging import StepLogger, null_logger
from realm_core.loop import TrainLoop
from realm_core.metrics import AnswerIndex, answer_spans
from realm_core.modeling import Embedder, SpanReader, marginal_over_correct
from realm_core.optim import GroupedAdamW, Part
from realm_core.questions import QAExample


@dataclass
class ReaderBatch:
    inputs: dict[str, torch.Tensor]  # [B*k, L]
    starts: torch.Tensor  # [B*k, S]
    ends: torch.Tensor  # [B*k, S]
    valid: torch.Tensor  # [B*k, S]
    body_start: list[int]  # per sequence, where the body begins


def enumerate_spans(body_start: int, body_len: int, max_span: int) -> list[tuple[int, int]]:
    """All spans of at most `max_span` wordpieces inside the block body (sequence positions, inclusive)."""
    return [
        (s, e)
        for s in range(body_start, body_start + body_len)
        for e in range(s, min(s + max_span, body_start + body_len))
    ]


def reader_batch(
    store: BlockStore, query_ids: list[list[int]], block_ids: np.ndarray, max_span: int, device: torch.device
) -> ReaderBatch:
    seqs, segs, body_starts, spans = [], [], [], []
    for q, row in zip(query_ids, block_ids):
        for z in row.tolist():
            ids, seg, body_start = store.pair_sequence(q, z)
            seqs.append(ids)
            segs.append(seg)
            body_starts.append(body_start)
            spans.append(enumerate_spans(body_start, len(ids) - body_start - 1, max_span))
    width = max(1, max(len(s) for s in spans))
    starts = torch.zeros(len(spans), width, dtype=torch.long)
    ends = torch.zeros_like(starts)
    valid = torch.zeros_like(starts, dtype=torch.bool)
    for i, row in enumerate(spans):
        if row:
            starts[i, : len(row)] = torch.tensor([s for s, _ in row])
            ends[i, : len(row)] = torch.tensor([e for _, e in row])
            valid[i, : len(row)] = True
    inputs = pad_batch(seqs, segs, store.tokenizer.pad_token_id, device)
    return ReaderBatch(inputs, starts.to(device), ends.to(device), valid.to(device), body_starts)


def correct_spans(
    store: BlockStore, batch: ReaderBatch, block_ids: np.ndarray, answers: list[list[str]], max_span: int
) -> torch.Tensor:
    """[B*k, S] True where the span's wordpieces equal an answer's wordpieces (ORQA's match rule)."""
    tok = store.tokenizer
    correct = torch.zeros_like(batch.valid)
    flat_blocks = block_ids.reshape(-1).tolist()
    per_seq_answers = [a for a in answers for _ in range(block_ids.shape[1])]
    starts, ends = batch.starts.cpu(), batch.ends.cpu()
    for i, (z, ans) in enumerate(zip(flat_blocks, per_seq_answers)):
        answer_ids = [tok(a, add_special_tokens=False)["input_ids"] for a in ans]
        hits = {
            (s + batch.body_start[i], e + batch.body_start[i])
            for s, e in answer_spans(store.body_ids[z][: store.max_block_tokens], answer_ids, max_span)
        }
        if hits:
            for j in range(starts.size(1)):
                if (int(starts[i, j]), int(ends[i, j])) in hits:
                    correct[i, j] = True
    return correct & batch.valid


def _by_block_id(index: DenseIndex) -> np.ndarray:
    """The index's vectors with row z = block z: the saved index itself when its ids are 0..N-1 (no
    copy), else scattered (an index missing some blocks: `realm index remove`, realm_core/knowledge.py)."""
    if np.array_equal(index.ids, np.arange(len(index))):
        return index.embeddings
    out = np.zeros((int(index.ids.max()) + 1, index.dim), dtype=np.float32)
    out[index.ids] = index.embeddings
    return out


class OpenQA:
    """Query embedder + span reader over a frozen index of block embeddings."""

    def __init__(
        self,
        query: Embedder,
        reader: SpanReader,
        store: BlockStore,
        index: DenseIndex,
        *,
        device: torch.device,
        max_query_tokens: int,
        max_span: int,
    ):
        self.query, self.reader, self.store, self.index = query.to(device), reader.to(device), store, index
        self.device, self.max_query_tokens, self.max_span = device, max_query_tokens, max_span
        self.block_embeddings = torch.from_numpy(_by_block_id(index))  # [N, d], frozen; row z = block z
        self._answer_index: AnswerIndex | None = None
        self._answer_blocks: dict[tuple[str, ...], set[int]] = {}

    def answer_blocks(self, answers: list[str]) -> set[int]:
        """{z : has_answer(block z, answers)}, DPR's token rule, from an inverted index over the
        store built once and cached per answer list: one has_answer call per retrieved block was
        14% of a fine-tuning step (bench/profile_throughput.py finetune)."""
        key = tuple(answers)
        if key not in self._answer_blocks:
            if self._answer_index is None:
                self._answer_index = AnswerIndex([b.text for b in self.store.blocks])
            self._answer_blocks[key] = self._answer_index.containing(answers)
        return self._answer_blocks[key]

    def retrieve(self, questions: list[str], k: int) -> tuple[list[list[int]], torch.Tensor, np.ndarray]:
        """Query ids, retriever logits [B, k] (differentiable w.r.t. the query tower) and block ids [B, k]."""
        q_ids = [self.store.query_ids(q, self.max_query_tokens) for q in questions]
        q = self.query(**query_batch(self.store, q_ids, self.device))  # [B, d]
        _, ids = self.index.search(q.detach().float().cpu().numpy(), min(k, len(self.index)))
        docs = self.block_embeddings[torch.from_numpy(ids)].to(self.device)  # [B, k, d]
        return q_ids, torch.einsum("bd,bkd->bk", q, docs), ids

    def losses(self, batch: list[QAExample], retriever_top_k: int, reader_top_k: int) -> dict[str, torch.Tensor]:
        q_ids, logits, ids = self.retrieve([q.question for q in batch], retriever_top_k)
        found = [self.answer_blocks(q.answers) for q in batch]
        has = torch.tensor([[z in f for z in row] for f, row in zip(found, ids.tolist())], device=self.device)  # [B, K]
        retriever_loss = marginal_over_correct(logits, has)
        k = min(reader_top_k, ids.shape[1])
        rb = reader_batch(self.store, q_ids, ids[:, :k], self.max_span, self.device)
        span_logits = self.reader.span_logits(**rb.inputs, starts=rb.starts, ends=rb.ends)  # [B*k, S]
        span_logits = span_logits.view(len(batch), k, -1) + logits[:, :k, None]
        correct = correct_spans(self.store, rb, ids[:, :k], [q.answers for q in batch], self.max_span)
        reader_loss = marginal_over_correct(
            span_logits, correct.view(len(batch), k, -1), rb.valid.view(len(batch), k, -1)
        )
        return {
            "loss": retriever_loss + reader_loss,
            "retriever_loss": retriever_loss,
            "reader_loss": reader_loss,
            "recall_at_k": has[:, :k].any(-1).float().mean(),
        }

    @torch.inference_mode()
    def predict(self, questions: list[str], reader_top_k: int, retrieve_k: int) -> list[dict]:
        """Best span over the top-k blocks (reader score + retriever score) and the ranking."""
        self.query.eval()
        self.reader.eval()
        q_ids, logits, ids = self.retrieve(questions, max(retrieve_k, reader_top_k))
        k = min(reader_top_k, ids.shape[1])
        rb = reader_batch(self.store, q_ids, ids[:, :k], self.max_span, self.device)
        span_logits = self.reader.span_logits(**rb.inputs, starts=rb.starts, ends=rb.ends).masked_fill(
            ~rb.valid, float("-inf")
        )
        scores = span_logits.view(len(questions), k, -1) + logits[:, :k, None]
        out = []
        for b in range(len(questions)):
            flat = int(scores[b].reshape(-1).argmax())
            z_rank, s = divmod(flat, scores.size(-1))
            seq = b * k + z_rank
            block = int(ids[b, z_rank])
            start, end = int(rb.starts[seq, s]) - rb.body_start[seq], int(rb.ends[seq, s]) - rb.body_start[seq]
            offsets = self.store.body_offsets[block]
            text = self.store.blocks[block].text[offsets[start][0] : offsets[end][1]]
            out.append(
                {
                    "answer": text,
                    "score": float(scores[b].reshape(-1)[flat]),
                    "block": block,
                    "retrieved": ids[b].tolist(),
                    "retrieval_scores": logits[b].tolist(),
                }
            )
        return out


def finetune(
    model: OpenQA,
    questions: list[QAExample],
    c: FinetuneParams,
    *,
    seed: int,
    log: StepLogger = null_logger,
    checkpoint: Checkpointer | None = None,
) -> dict[str, float]:
    """Train the query embedder and the reader for `c.steps` steps of `c.batch_size` questions at
    `c.lr`, each over its `c.retriever_top_k` retrieved blocks of which the reader reads `c.top_k`;
    returns the last-quarter means of the step metrics.

    With `checkpoint` it resumes from and saves to it, the per-step history riding along in the
    checkpoint's `extra` so the summary equals an uninterrupted run's. Randomness: the loop's
    `rng` (question batches) and torch's global generator (dropout), both checkpointed.
    Under torchrun each rank trains with DDP on its equal slice of the same global batch (both
    losses are means over questions, so DDP's average is the global batch's loss); rank 0 logs.
    """
    if not questions:
        raise ValueError("no fine-tuning questions")
    rng = random.Random(seed)
    opt = GroupedAdamW({"query": Part.of(model.query, c.lr), "reader": Part.of(model.reader, c.lr)}, c.steps)
    model.query.train()
    model.reader.train()
    modules = {"query": model.query, "reader": model.reader}
    loop = TrainLoop("finetune", opt, modules, {"batches": rng}, c.steps, log=log, checkpoint=checkpoint)
    history: list[dict[str, float]] = list(loop.resumed.get("history", []))
    batch_size = distributed.global_batch_size(c.batch_size, len(questions))
    loss_fn = distributed.data_parallel(
        lambda batch: model.losses(batch, c.retriever_top_k, c.top_k), model.query, model.reader
    )

    def forward(step: int) -> tuple[torch.Tensor, dict]:
        out = loss_fn(distributed.shard(rng.sample(questions, batch_size)))
        return out["loss"], out

    def keep(row: dict, step: int) -> dict:
        history.append(row)
        return row

    loop.run(forward, on_row=keep, extra=lambda: {"history": history})
    tail = history[-max(1, len(history) // 4) :] or [{"loss": 0.0}]
    return {f"{k}_last_quarter": float(np.mean([r[k] for r in tail])) for k in tail[0]}
