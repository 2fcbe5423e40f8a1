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
from tqdm.auto import trange

from realm_core.blocks import BlockStore, doc_batch, pad_batch, query_batch
from realm_core.logging import StepLogger, null_logger
from realm_core.modeling import KnowledgeAugmentedEncoder, Retriever, adamw_with_warmup


@dataclass
class IctExample:
    query: list[int]  # [CLS] sentence [SEP]
    context: list[int]  # [CLS] title [SEP] body (sentence removed or kept) [SEP]
    context_segments: list[int]
    removed: bool


def ict_example(store: BlockStore, block_id: int, rng: random.Random, remove_prob: float, max_query_tokens: int) -> IctExample:
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


def ict_loss(retriever: Retriever, examples: list[IctExample], store: BlockStore, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each query against all contexts of the batch; returns (loss, accuracy)."""
    q = retriever.query(**query_batch(store, [e.query for e in examples], device))  # [B, d]
    d = retriever.doc(**pad_batch([e.context for e in examples], [e.context_segments for e in examples], store.tokenizer.pad_token_id, device))
    logits = q @ d.T  # [B, B]; the diagonal holds the positives
    labels = torch.arange(len(examples), device=device)
    return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()


def train_ict(
    retriever: Retriever,
    store: BlockStore,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    remove_prob: float,
    max_query_tokens: int,
    seed: int,
    device: torch.device,
    log: StepLogger = null_logger,
) -> Retriever:
    rng = random.Random(seed)
    pool = ict_candidates(store)
    if len(pool) < 2:
        raise ValueError("ICT needs at least two blocks with two or more sentences; the corpus is too small")
    batch_size = min(batch_size, len(pool))
    retriever.to(device).train()
    optimizer, schedule = adamw_with_warmup(retriever.parameters(), lr, steps)
    for step in trange(steps, desc="ict", unit="step", mininterval=2.0):
        examples = [ict_example(store, b, rng, remove_prob, max_query_tokens) for b in rng.sample(pool, batch_size)]
        loss, acc = ict_loss(retriever, examples, store, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(retriever.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        log({"ict_loss": loss.item(), "ict_accuracy": acc.item()}, step)
    return retriever


def mask_tokens(ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int, generator: torch.Generator, prob: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
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
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    log: StepLogger = null_logger,
) -> KnowledgeAugmentedEncoder:
    """Train the new MLM head on masked blocks with the backbone frozen (see module docstring)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    encoder.to(device).train()
    head = encoder.mlm.cls.predictions
    encoder.bert.requires_grad_(False)  # also freezes the tied decoder weight (= word embeddings)
    head_params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(head_params, lr=lr)
    tok = store.tokenizer
    for step in trange(steps, desc="mlm head warm-up", unit="step", mininterval=2.0):
        batch = doc_batch(store, rng.sample(range(len(store)), min(batch_size, len(store))), torch.device("cpu"))
        special = (batch["input_ids"] == tok.cls_token_id) | (batch["input_ids"] == tok.sep_token_id) | (batch["attention_mask"] == 0)
        masked, labels = mask_tokens(batch["input_ids"], special, tok.mask_token_id, encoder.mlm.config.vocab_size, gen)
        with torch.no_grad():
            hidden = encoder.bert(input_ids=masked.to(device), attention_mask=batch["attention_mask"].to(device), token_type_ids=batch["token_type_ids"].to(device)).last_hidden_state
        rows = labels.to(device) != -100
        logits = encoder.mlm.cls(hidden[rows])  # [masked tokens, V]
        loss = F.cross_entropy(logits, labels.to(device)[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log({"mlm_loss": loss.item(), "mlm_accuracy": (logits.argmax(-1) == labels.to(device)[rows]).float().mean().item()}, step)
    encoder.bert.requires_grad_(True)
    return encoder
