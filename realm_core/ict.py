"""Warm start: the inverse cloze task (ORQA, Lee et al. 2019) and the MLM head warm-up.

REALM initialises both embedders from ICT (section 3.4): a random sentence of a block is the
pseudo-query, the rest of the block is its evidence; the sentence is removed from the block
90% of the time so the retriever learns more than string overlap, and the other blocks of
the batch are the negatives (softmax cross-entropy over in-batch candidates).

The knowledge-augmented encoder needs a BERT masked-LM. all-MiniLM-L6-v2 ships only a
BertModel, so its MLM head is new: `warmup_mlm_head` trains the head (transform + bias; the
decoder is tied to the frozen word embeddings) with BERT's own MLM objective on the blocks
while the backbone stays frozen, so pre-training starts from a head that predicts tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from realm_core import distributed
from realm_core.blocks import BlockStore, doc_batch, pad_batch, query_batch
from realm_core.checkpoint import Checkpointer
from realm_core.config import IctParams
from realm_core.logging import StepLogger, null_logger
from realm_core.loop import TrainLoop
from realm_core.modeling import KnowledgeAugmentedEncoder, Retriever
from realm_core.optim import GroupedAdamW, Part


@dataclass
class IctExample:
    query: list[int]  # [CLS] sentence [SEP]
    context: list[int]  # [CLS] title [SEP] body (sentence removed or kept) [SEP]
    context_segments: list[int]
    removed: bool


def ict_example(
    store: BlockStore, block_id: int, rng: random.Random, remove_prob: float, max_query_tokens: int
) -> IctExample:
    """One pseudo-query / evidence pair from a block with at least two sentences."""
    tok = store.tokenizer
    start, end = rng.choice(store.blocks[block_id].sentences)
    i, j = store.sentence_token_range(block_id, start, end)
    sentence = store.body_ids[block_id][i:j][: max_query_tokens - 2]
    removed = rng.random() < remove_prob
    ids, segments = store.doc_sequence(block_id, drop=(i, j) if removed else None)
    return IctExample([tok.cls_token_id, *sentence, tok.sep_token_id], ids, segments, removed)


def ict_candidates(store: BlockStore) -> list[int]:
    """Blocks ICT can use: two or more sentences, so removing one never empties a block."""
    return [b.id for b in store.blocks if len(b.sentences) >= 2]


def ict_logits(
    retriever: Retriever, examples: list[IctExample], store: BlockStore, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of this rank's queries against the contexts of the whole global batch, and the labels.

    `examples` is this process's slice of the global batch (all of it in one process). The
    context embeddings of every rank are gathered with their gradients, as ORQA gathered them
    across TPU cores, so each query is scored against all global candidates: [b, B].
    """
    q = retriever.query(**query_batch(store, [e.query for e in examples], device))  # [b, d]
    d = retriever.doc(
        **pad_batch(
            [e.context for e in examples], [e.context_segments for e in examples], store.tokenizer.pad_token_id, device
        )
    )  # [b, d]
    logits = q @ distributed.all_gather(d).T  # [b, B]; query i's positive is global context rank*b + i
    labels = torch.arange(len(examples), device=device) + distributed.rank() * len(examples)
    return logits, labels


def ict_loss(
    retriever: Retriever, examples: list[IctExample], store: BlockStore, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each query against all contexts of the (global) batch; returns (loss, accuracy)."""
    logits, labels = ict_logits(retriever, examples, store, device)
    return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()


def train_ict(
    retriever: Retriever,
    store: BlockStore,
    c: IctParams,
    *,
    max_query_tokens: int,
    seed: int,
    device: torch.device,
    log: StepLogger = null_logger,
    checkpoint: Checkpointer | None = None,
) -> Retriever:
    """ICT on in-batch negatives for `c.steps` steps (`c.batch_size`, `c.lr`, `c.remove_prob`);
    with `checkpoint`, resumes from and saves to it (same result as one run).

    All randomness is the loop's `rng` (batches, sentences, removals) and torch's global
    generator (dropout), both in the checkpoint. Under torchrun every rank draws the same
    global batch of `batch_size` examples and trains on its slice with DDP, the negatives
    gathered from all ranks (realm_core/distributed.py): the same step as one process.
    """
    rng = random.Random(seed)
    pool = ict_candidates(store)
    if len(pool) < 2:
        raise ValueError("ICT needs at least two blocks with two or more sentences; the corpus is too small")
    batch_size = distributed.global_batch_size(c.batch_size, len(pool))
    retriever.to(device).train()
    opt = GroupedAdamW({"query": Part.of(retriever.query, c.lr), "doc": Part.of(retriever.doc, c.lr)}, c.steps)
    loop = TrainLoop("ict", opt, {"retriever": retriever}, {"batches": rng}, c.steps, log=log, checkpoint=checkpoint)
    loss_fn = distributed.data_parallel(lambda examples: ict_loss(retriever, examples, store, device), retriever)

    def forward(step: int) -> tuple[torch.Tensor, dict]:
        examples = [ict_example(store, b, rng, c.remove_prob, max_query_tokens) for b in rng.sample(pool, batch_size)]
        loss, acc = loss_fn(distributed.shard(examples))
        return loss, {"ict_loss": loss, "ict_accuracy": acc}

    loop.run(forward, report=lambda metrics, norms: {**metrics, **{f"ict_{k}": v for k, v in norms.items()}})
    return retriever


def mask_tokens(
    ids: torch.Tensor,
    special: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    generator: torch.Generator,
    prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (15%; 80% [MASK], 10% random, 10% kept); labels are -100 elsewhere."""
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    masked = ids.clone()
    masked[chosen & (roll < 0.8)] = mask_id
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = random_ids[swap]
    return masked, labels


def warmup_mlm_head(
    encoder: KnowledgeAugmentedEncoder,
    store: BlockStore,
    c: IctParams,
    *,
    seed: int,
    device: torch.device,
    log: StepLogger = null_logger,
    checkpoint: Checkpointer | None = None,
) -> KnowledgeAugmentedEncoder:
    """Train the new MLM head on masked blocks with the backbone frozen (see module docstring),
    for `c.mlm_warmup_steps` steps of `c.mlm_batch_size` blocks at `c.mlm_lr`.

    Resumable like `train_ict`: `rng` (batches), `gen` (masking) and torch's dropout generator
    are checkpointed with the encoder and the optimizer. Under torchrun the global batch is
    drawn and masked identically on every rank; each rank trains on its slice of the rows, its
    summed token loss divided by the global batch's masked-token count.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    encoder.to(device).train()
    head = encoder.mlm.cls.predictions
    encoder.bert.requires_grad_(False)  # also freezes the tied decoder weight (= word embeddings)
    steps = c.mlm_warmup_steps
    opt = GroupedAdamW({"mlm_head": Part.of(head, c.mlm_lr)}, steps)  # the frozen tied decoder is skipped
    rngs = {"batches": rng, "masking": gen}
    loop = TrainLoop("mlm head warm-up", opt, {"encoder": encoder}, rngs, steps, log=log, checkpoint=checkpoint)
    tok = store.tokenizer
    batch_size = distributed.global_batch_size(c.mlm_batch_size, len(store))
    loss_fn = distributed.data_parallel(lambda *batch: _masked_lm_loss(encoder, *batch), encoder)

    def forward(step: int) -> tuple[torch.Tensor, dict]:
        batch = doc_batch(store, rng.sample(range(len(store)), batch_size), torch.device("cpu"))
        special = (
            (batch["input_ids"] == tok.cls_token_id)
            | (batch["input_ids"] == tok.sep_token_id)
            | (batch["attention_mask"] == 0)
        )
        masked, labels = mask_tokens(batch["input_ids"], special, tok.mask_token_id, encoder.mlm.config.vocab_size, gen)
        total = int((labels != -100).sum())  # masked tokens of the global batch
        rows = distributed.shard(range(batch_size))
        local = [
            t[rows[0] : rows[-1] + 1].to(device)
            for t in (masked, batch["attention_mask"], batch["token_type_ids"], labels)
        ]
        loss_sum, correct = loss_fn(*local)
        per_token = distributed.world_size() / max(1, total)  # DDP averages over ranks: W * local sum / global count
        loss = loss_sum * per_token
        return loss, {"mlm_loss": loss, "mlm_accuracy": correct * per_token}

    loop.run(forward, report=lambda metrics, norms: metrics)  # one frozen-backbone head: no norms logged
    encoder.bert.requires_grad_(True)
    return encoder


def _masked_lm_loss(
    encoder: KnowledgeAugmentedEncoder,
    masked: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed MLM cross-entropy and number of correct predictions over the masked tokens (frozen backbone)."""
    with torch.no_grad():
        hidden = encoder.bert(
            input_ids=masked, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
    rows = labels != -100
    logits = encoder.mlm.cls(hidden[rows])  # [masked tokens, V]
    return F.cross_entropy(logits, labels[rows], reduction="sum"), (logits.argmax(-1) == labels[rows]).sum().float()
