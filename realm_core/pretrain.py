"""REALM pre-training: salient-span MLM marginalised over retrieved blocks (sections 3.1-3.4).

One step, for a batch of queries x (one sentence each, one salient span masked):
  1. embed x with the live query embedder (gradient on);
  2. retrieve top blocks from the *stale* faiss index (no gradient through the index);
  3. drop the block x came from ("no trivial retrievals", section 3.4), drop duplicates, keep
     k - 1, and prepend the null block (candidate 0, section 3.4);
  4. re-embed the k candidates with the live document embedder, so the loss reaches both
     towers (section 3.3), and score f(x, z) = Embed_input(x) . Embed_doc(z);
  5. the knowledge-augmented encoder reads `[CLS] x [SEP] body(z) [SEP]` for every z and the
     loss is the marginal log-likelihood of the masked tokens (modeling.marginal_log_likelihood).
Every `refresh_every` steps all blocks are re-embedded with the current document embedder
and the index is rebuilt (section 3.3; synchronous here).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import trange

from realm_core.blocks import BlockStore, embed_blocks, pad_batch, query_batch
from realm_core.index import DenseIndex
from realm_core.logging import StepLogger, null_logger
from realm_core.modeling import KnowledgeAugmentedEncoder, Retriever, adamw_with_warmup, marginal_log_likelihood, retrieval_utility


@dataclass
class MaskedQuery:
    """A pre-training query: one sentence of `block_id` with one salient span masked."""

    block_id: int
    input_ids: list[int]  # [CLS] masked sentence [SEP]
    mask_positions: list[int]  # positions of the [MASK] tokens in input_ids
    targets: list[int]  # the original wordpieces there


MASKINGS = ("salient", "random_tokens", "random_spans")


def _masked_query(store: BlockStore, block_id: int, sentence: list[int], masked: list[int]) -> MaskedQuery:
    """`[CLS] sentence [SEP]` with every wordpiece at `masked` (0-based in the sentence) -> [MASK]."""
    tok = store.tokenizer
    ids = [tok.cls_token_id, *sentence, tok.sep_token_id]
    targets = [ids[p + 1] for p in masked]
    for p in masked:
        ids[p + 1] = tok.mask_token_id
    return MaskedQuery(block_id, ids, [p + 1 for p in masked], targets)


def _sentences(store: BlockStore, max_query_tokens: int):
    """(block, sentence start/end chars, sentence wordpieces cut to the query length, their offsets)."""
    for block in store.blocks:
        for s_start, s_end in block.sentences:
            i, j = store.sentence_token_range(block.id, s_start, s_end)
            j = min(j, i + max_query_tokens - 2)
            if j > i:
                yield block, s_start, s_end, store.body_ids[block.id][i:j], store.body_offsets[block.id][i:j]


def salient_span_queries(store: BlockStore, max_query_tokens: int, max_masks: int) -> list[MaskedQuery]:
    """All (sentence, salient span) pairs as masked queries (section 3.4).

    Every wordpiece of the span becomes [MASK] (no 80/10/10); spans of more than `max_masks`
    wordpieces, and spans that the query length limit would cut, are skipped.
    """
    queries = []
    for block, s_start, s_end, sentence, offsets in _sentences(store, max_query_tokens):
        for a, b, _label in block.spans:
            if not (s_start <= a and b <= s_end):
                continue
            masked = [p for p, (oa, ob) in enumerate(offsets) if oa < b and ob > a]
            if not masked or len(masked) > max_masks or (b > offsets[-1][1]):  # none, too long, or cut off
                continue
            queries.append(_masked_query(store, block.id, sentence, masked))
    return queries


def random_token_queries(store: BlockStore, max_query_tokens: int, max_masks: int, seed: int, prob: float = 0.15) -> list[MaskedQuery]:
    """Ablation "random token masks" (REALM Table 2): 15% of a sentence's wordpieces (at least 1,
    at most `max_masks`), chosen uniformly, all replaced by [MASK]; one query per sentence."""
    rng = random.Random(seed)
    queries = []
    for block, _, _, sentence, _ in _sentences(store, max_query_tokens):
        n = max(1, min(max_masks, round(prob * len(sentence))))
        queries.append(_masked_query(store, block.id, sentence, sorted(rng.sample(range(len(sentence)), n))))
    return queries


def random_span_queries(store: BlockStore, max_query_tokens: int, max_masks: int, seed: int, p: float = 0.2) -> list[MaskedQuery]:
    """Ablation "random span masks" (REALM Table 2, after SpanBERT): one contiguous span per
    sentence, length ~ Geometric(p) clipped to `max_masks` and the sentence, uniform start."""
    rng = random.Random(seed)
    queries = []
    for block, _, _, sentence, _ in _sentences(store, max_query_tokens):
        length = 1
        while rng.random() > p and length < min(max_masks, len(sentence)):
            length += 1
        start = rng.randrange(len(sentence) - length + 1)
        queries.append(_masked_query(store, block.id, sentence, list(range(start, start + length))))
    return queries


def make_queries(store: BlockStore, masking: str, max_query_tokens: int, max_masks: int, seed: int) -> list[MaskedQuery]:
    """The pre-training queries for `pretrain.masking` (salient = REALM; the others are its ablations)."""
    if masking == "salient":
        return salient_span_queries(store, max_query_tokens, max_masks)
    if masking == "random_tokens":
        return random_token_queries(store, max_query_tokens, max_masks, seed)
    if masking == "random_spans":
        return random_span_queries(store, max_query_tokens, max_masks, seed)
    raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")


def select_candidates(retrieved: np.ndarray, source: int, k: int) -> list[int]:
    """Top k distinct retrieved ids without the source block (the null block is added later)."""
    out: list[int] = []
    for block_id in retrieved.tolist():
        if block_id != source and block_id >= 0 and block_id not in out:
            out.append(block_id)
            if len(out) == k:
                break
    return out


@dataclass
class RefreshLog:
    """When each index in use was built, for staleness reporting (section 3.3)."""

    built_at_step: int = 0
    refreshes: int = 0
    seconds: list[float] = field(default_factory=list)


class Pretrainer:
    """One REALM pre-training step at a time, over a stale index of the blocks.

    `null_block=False` and `exclude_source=False` are REALM's ablations (section 3.4 explains
    why both exist): without the null block every candidate is a retrieved block (and retrieval
    utility, defined against the null block, is not logged); without source exclusion the
    sentence's own block may be retrieved and the task becomes trivial.
    """

    def __init__(
        self,
        retriever: Retriever,
        encoder: KnowledgeAugmentedEncoder,
        store: BlockStore,
        *,
        top_k: int,
        device: torch.device,
        embed_batch_size: int = 64,
        loss_form: str = "per_token",
        null_block: bool = True,
        exclude_source: bool = True,
    ):
        if top_k < 2:
            raise ValueError("pretrain.top_k counts the null block, so it must be at least 2")
        if len(store) < top_k:
            raise ValueError(f"pretrain.top_k={top_k} needs at least {top_k} blocks (null block + {top_k - 1} retrieved, source excluded); the corpus has {len(store)}")
        self.retriever, self.encoder, self.store = retriever.to(device), encoder.to(device), store
        self.top_k, self.device, self.embed_batch_size, self.loss_form = top_k, device, embed_batch_size, loss_form
        self.null_block, self.exclude_source = null_block, exclude_source
        self.index: DenseIndex | None = None
        self.refresh_log = RefreshLog()

    def refresh_index(self, step: int) -> float:
        """Re-embed every block with the current document embedder and rebuild the index."""
        start = time.perf_counter()
        emb = embed_blocks(self.retriever.doc, self.store, self.device, self.embed_batch_size, progress="refresh index")
        self.index = DenseIndex(emb, np.arange(len(self.store), dtype=np.int64))
        seconds = time.perf_counter() - start
        self.refresh_log.built_at_step = step
        self.refresh_log.refreshes += 1
        self.refresh_log.seconds.append(seconds)
        return seconds

    def candidates(self, query_emb: torch.Tensor, batch: list[MaskedQuery]) -> list[list[int | None]]:
        """[null, z_1, ..., z_{k-1}] per query (without the null block: [z_1, ..., z_k]), from the stale index."""
        assert self.index is not None, "call refresh_index() before training"
        want = self.top_k - 1 if self.null_block else self.top_k
        _, ids = self.index.search(query_emb.detach().float().cpu().numpy(), want + 1 + 4)  # +1 source, +4 spare
        out = []
        for row, q in zip(ids, batch):
            source = q.block_id if self.exclude_source else -1
            chosen = select_candidates(row, source, want)
            if len(chosen) < want:  # tiny corpora: pad from the rest so k stays constant
                chosen += [b for b in range(len(self.store)) if b != source and b not in chosen][: want - len(chosen)]
            out.append([None, *chosen] if self.null_block else chosen)
        return out

    def forward(self, batch: list[MaskedQuery]) -> dict[str, torch.Tensor]:
        store, dev = self.store, self.device
        q = self.retriever.query(**query_batch(store, [b.input_ids for b in batch], dev))  # [B, d]
        cands = self.candidates(q, batch)  # B x k
        flat = [z for row in cands for z in row]
        docs = [store.doc_sequence(z) for z in flat]
        d = self.retriever.doc(**pad_batch([s[0] for s in docs], [s[1] for s in docs], store.tokenizer.pad_token_id, dev))
        logits = self.retriever.score(q, d.view(len(batch), self.top_k, -1))  # [B, k]
        pairs = [store.pair_sequence(b.input_ids, z) for b, row in zip(batch, cands) for z in row]
        inputs = pad_batch([p[0] for p in pairs], [p[1] for p in pairs], store.tokenizer.pad_token_id, dev)
        m = max(len(b.mask_positions) for b in batch)
        positions = torch.zeros(len(batch), m, dtype=torch.long)
        targets = torch.zeros(len(batch), m, dtype=torch.long)
        token_mask = torch.zeros(len(batch), m)
        for i, b in enumerate(batch):
            positions[i, : len(b.mask_positions)] = torch.tensor(b.mask_positions)
            targets[i, : len(b.targets)] = torch.tensor(b.targets)
            token_mask[i, : len(b.targets)] = 1
        rep = lambda t: t.repeat_interleave(self.top_k, 0).to(dev)  # noqa: E731  [B*k, M]
        logp = self.encoder.token_log_probs(**inputs, mask_positions=rep(positions), targets=rep(targets)).view(len(batch), self.top_k, m)
        token_mask = token_mask.to(dev)
        out = {"loss": marginal_log_likelihood(logits, logp, token_mask, self.loss_form), "candidates": cands}
        if self.null_block:  # both are defined against the null block (candidate 0)
            out["retrieval_utility"] = retrieval_utility(logits.detach(), logp.detach(), token_mask)
            out["null_prob"] = logits.detach().softmax(-1)[:, 0].mean()
        return out


def pretrain(
    trainer: Pretrainer,
    queries: list[MaskedQuery],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    refresh_every: int,
    seed: int,
    log: StepLogger = null_logger,
) -> dict[str, float]:
    """Train both towers and the encoder; returns summary metrics of the run."""
    if not queries:
        raise ValueError("no pre-training queries: with masking=salient, no sentence holds a salient span of at most pretrain.max_masks wordpieces")
    rng = random.Random(seed)
    params = list(trainer.retriever.parameters()) + list(trainer.encoder.parameters())
    optimizer, schedule = adamw_with_warmup(params, lr, steps)
    trainer.retriever.train()
    trainer.encoder.train()
    seconds = trainer.refresh_index(step=0)
    log({"refresh_count": 0, "refresh_seconds": seconds}, 0)
    recent_ru: list[float] = []
    for step in trange(steps, desc="pretrain", unit="step", mininterval=2.0):
        if refresh_every and step > 0 and step % refresh_every == 0:
            seconds = trainer.refresh_index(step)
            log({"refresh_count": trainer.refresh_log.refreshes - 1, "refresh_seconds": seconds}, step)
        out = trainer.forward(rng.sample(queries, min(batch_size, len(queries))))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        row = {"loss": out["loss"].item(), "index_staleness": step - trainer.refresh_log.built_at_step}
        row.update({k: out[k].item() for k in ("retrieval_utility", "null_prob") if k in out})
        recent_ru += [row["retrieval_utility"]] if "retrieval_utility" in row else []
        log(row, step)
    summary = {"refreshes": float(trainer.refresh_log.refreshes - 1), "queries": float(len(queries))}
    if recent_ru:
        summary["retrieval_utility_last_quarter"] = float(np.mean(recent_ru[-max(1, len(recent_ru) // 4) :]))
    return summary
