"""Teaching the knowledge-augmented encoder to read its evidence, and measuring that it does.

REALM (section 3.4) starts its encoder from a BERT masked-LM checkpoint that already reads its
context, and warns that an encoder that learns to ignore its documents gives the retriever no
meaningful gradient. Our backbone (all-MiniLM-L6-v2) is a sentence encoder with a new MLM head:
on the default run, an answer-bearing block raised log p(y | z, x) over the null block by only
+0.075 nats/token (DESIGN.md 1b), so the retriever trained on noise.

`warmup_encoder` trains the whole encoder (unfrozen) on the pre-training task itself, salient
span MLM over `[CLS] masked sentence [SEP] body [SEP]`, with a context chosen for it: an
answer-bearing non-source block with probability `evidence_prob`, otherwise the null block, a
random block or a hard negative (a BM25-close block without the answer; a third each), so the
encoder learns both to copy from evidence and that a block which cannot fill the span must not
make it less likely than no block at all. A share `source_prob` of the evidence is the query's own source block with
the sentence kept: a verbatim copy task, the easiest way to learn where to look, after which the
encoder generalises to evidence that states the fact in other words. This uses string matching to pick the evidence (masking.answer_bearing_blocks)
and never trains the retriever: the retriever still learns from the MLM signal alone.

The **evidence gain** is the health metric of that skill: mean over masked tokens of
log p(y | answer-bearing non-source block, x) - log p(y | null, x), in eval mode, on a fixed probe
of held-out queries (whole source blocks held out, so no probe sentence is trained on).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from realm_core import distributed
from realm_core.blocks import BlockStore
from realm_core.checkpoint import Checkpointer
from realm_core.config import EncoderWarmupParams, PretrainParams
from realm_core.logging import StepLogger, null_logger
from realm_core.loop import TrainLoop
from realm_core.masking import (
    MaskedQuery,
    answer_bearing_blocks,
    answer_near,
    encoder_inputs,
    make_queries,
    related_blocks_without_answer,
    salient_span_queries,
)
from realm_core.modeling import KnowledgeAugmentedEncoder
from realm_core.optim import GroupedAdamW, Part


@dataclass
class Probe:
    """Held-out queries, each with its answer-bearing non-source blocks (the first one is read)."""

    queries: list[MaskedQuery]
    evidence: list[list[int]]
    held_out_blocks: frozenset[int] = frozenset()  # source blocks none of whose sentences trains

    def __len__(self) -> int:
        return len(self.queries)

    @torch.no_grad()
    def evidence_gain(
        self, encoder: KnowledgeAugmentedEncoder, store: BlockStore, device: torch.device, batch_size: int = 16
    ) -> float:
        """log p(y | evidence, x) - log p(y | null, x), nats per masked token, dropout off."""
        was_training = encoder.training
        encoder.eval()
        total, tokens = 0.0, 0.0
        for start in range(0, len(self.queries), batch_size):
            queries = self.queries[start : start + batch_size]
            contexts = [[None, ev[0]] for ev in self.evidence[start : start + batch_size]]
            batch = encoder_inputs(store, queries, contexts, device)
            mask = batch.pop("token_mask")  # [B, M]
            logp = encoder.token_log_probs(**batch).view(len(queries), 2, -1)  # [B, 2, M]
            total += float(((logp[:, 1] - logp[:, 0]) * mask).sum())
            tokens += float(mask.sum())
        encoder.train(was_training)
        return total / max(tokens, 1.0)


def split_probe(
    queries: list[MaskedQuery], evidence: list[list[int]], size: int, seed: int, max_share: float = 0.25
) -> tuple[list[int], Probe]:
    """Hold out whole source blocks until `size` of their queries have evidence (or `max_share` of
    the source blocks are held out, on a small corpus); returns the indices
    of the queries left for training and the probe. Deterministic in `seed`, so the ict stage
    (encoder warm-up) and the pretrain stage hold out the same queries.

    Queries without a source block (block_id -1) are held out one by one.
    """
    if size <= 0:
        return list(range(len(queries))), Probe([], [])
    by_source: dict[int, list[int]] = {}
    for i, q in enumerate(queries):
        by_source.setdefault(q.block_id if q.block_id >= 0 else -2 - i, []).append(i)
    order = sorted(by_source)
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    probe: list[int] = []
    for n, source in enumerate(order):
        if len(probe) >= size or n >= max_share * len(order):  # never starve training on a small corpus
            break
        held.update(by_source[source])
        probe += [i for i in by_source[source] if evidence[i]]
    probe = probe[:size]
    blocks = frozenset(queries[i].block_id for i in held if queries[i].block_id >= 0)
    return [i for i in range(len(queries)) if i not in held], Probe(
        [queries[i] for i in probe], [evidence[i] for i in probe], blocks
    )


ANSWER_NEAR_BLOCKS = 16  # query_filter=answer_near: the evidence is among this many BM25-closest blocks


@dataclass
class PretrainingQueries:
    """What the encoder warm-up and pre-training train on, and the probe both measure."""

    salient: list[MaskedQuery]  # warm-up queries (salient spans, probe blocks removed)
    salient_evidence: list[list[int]]
    salient_negatives: list[list[int]]  # related blocks without the answer (hard negatives of the warm-up)
    train: list[MaskedQuery]  # pre-training queries (pretrain.masking, probe blocks removed, query_filter applied)
    probe: Probe
    stats: dict[str, float]


def pretraining_queries(store: BlockStore, c: PretrainParams, max_query_tokens: int, seed: int) -> PretrainingQueries:
    """Salient-span queries, their answer-bearing blocks, the probe (held out by source block), and the
    pre-training queries under `c.masking` and `c.query_filter`.

    The documented query rules (`query_filter`):
    - `answer_elsewhere`: only queries whose masked wordpieces occur, as whole words, in some block
      other than their source. On the default run 55% of queries had such a block anywhere; the
      rest can only be memorised and give the retriever a gradient of pure noise.
    - `answer_near` (default): of those, only queries with an answer-bearing block among the
      ANSWER_NEAR_BLOCKS BM25-closest non-source blocks. With `answer_elsewhere` only ~28% of
      queries had an answer-bearing block among their 7 candidates; the marginal likelihood then
      learns first that retrieved blocks hurt, and moved all mass to the null block (p(null) 0.98
      after 40 steps, retrieval utility per token -0.006). The string match only selects queries:
      the retriever still learns from the MLM signal alone.
    """
    salient = salient_span_queries(store, max_query_tokens, c.max_masks)
    evidence = answer_bearing_blocks(store, salient)
    keep, probe = split_probe(salient, evidence, c.probe_size, seed)
    if c.masking == "salient":
        train, train_evidence = [salient[i] for i in keep], [evidence[i] for i in keep]
    else:
        train = [
            q
            for q in make_queries(store, c.masking, max_query_tokens, c.max_masks, seed)
            if q.block_id not in probe.held_out_blocks
        ]
        train_evidence = answer_bearing_blocks(store, train) if c.query_filter != "all" else [[]] * len(train)
    candidates = len(train)
    if c.query_filter == "answer_elsewhere":
        train = [q for q, ev in zip(train, train_evidence) if ev]
    elif c.query_filter == "answer_near":
        train = [q for q, near in zip(train, answer_near(store, train, train_evidence, ANSWER_NEAR_BLOCKS)) if near]
    stats = {
        "salient_queries": float(len(salient)),
        "salient_with_evidence": float(sum(bool(e) for e in evidence)),
        "probe_queries": float(len(probe)),
        "queries_before_filter": float(candidates),
        "queries": float(len(train)),
    }
    warm = [salient[i] for i in keep]
    warm_evidence = [evidence[i] for i in keep]
    return PretrainingQueries(
        warm, warm_evidence, related_blocks_without_answer(store, warm, warm_evidence), train, probe, stats
    )


def warmup_contexts(
    queries: list[int],
    evidence: list[list[int]],
    sources: list[int],
    n_blocks: int,
    c: EncoderWarmupParams,
    rng: random.Random,
    negatives: list[list[int]] | None = None,
) -> list[int | None]:
    """One context per query: evidence with probability `c.evidence_prob` (its own source block, the
    sentence kept, with probability `c.source_prob`, else an answer-bearing non-source block),
    otherwise, in equal shares, the null block, a random block, or a hard negative (a related
    block without the answer, from `negatives`; a random block when there is none)."""
    out: list[int | None] = []
    for i, source in zip(queries, sources):
        r = rng.random()
        rest = (r - c.evidence_prob) / max(1e-9, 1 - c.evidence_prob)  # uniform in [0, 1) when not evidence
        if r < c.evidence_prob and (evidence[i] or source >= 0):
            use_source = source >= 0 and (not evidence[i] or rng.random() < c.source_prob)
            out.append(source if use_source else rng.choice(evidence[i][:4]))
        elif rest < 1 / 3 or n_blocks < 3:
            out.append(None)
        elif rest >= 2 / 3 and negatives is not None and negatives[i]:
            out.append(rng.choice(negatives[i]))
        else:
            z = rng.randrange(n_blocks)
            while z == source or z in evidence[i]:
                z = rng.randrange(n_blocks)
            out.append(z)
    return out


def warmup_encoder(
    encoder: KnowledgeAugmentedEncoder,
    store: BlockStore,
    queries: list[MaskedQuery],
    evidence: list[list[int]],
    c: EncoderWarmupParams,
    *,
    seed: int,
    device: torch.device,
    negatives: list[list[int]] | None = None,
    log: StepLogger = null_logger,
    checkpoint: Checkpointer | None = None,
    probe: Probe | None = None,
    probe_every: int = 50,
) -> dict[str, float]:
    """Salient-span MLM with a chosen context, the whole encoder training (see module docstring).

    Logs `encoder_warmup_loss` / `encoder_warmup_accuracy` (argmax over the vocabulary, all
    contexts) every step, and the probe's `evidence_gain` at step 0, every
    `probe_every` steps and at the end. Resumable like the other loops; under torchrun each rank
    trains on its slice of the same global batch, the loss a mean over the global batch's tokens.
    """
    pool = [i for i, ev in enumerate(evidence) if ev]
    if c.steps and not pool:
        raise ValueError(
            "encoder warm-up: no query has its answer in another block; the corpus is too small or has no repeated salient spans"
        )
    rng = random.Random(seed)
    encoder.to(device).train()
    opt = GroupedAdamW({"encoder": Part.of(encoder, c.lr)}, c.steps)
    loop = TrainLoop(
        "encoder warm-up", opt, {"encoder": encoder}, {"batches": rng}, c.steps, log=log, checkpoint=checkpoint
    )
    gain = {}

    def measure(step: int) -> None:
        if probe is not None and len(probe) and distributed.is_master():
            gain["last"] = probe.evidence_gain(encoder, store, device)
            gain.setdefault("first", gain["last"])
            loop.log({"evidence_gain": gain["last"]}, step)

    if loop.start == 0:
        measure(0)
    batch_size = distributed.global_batch_size(c.batch_size, len(pool)) if c.steps else 0
    loss_fn = distributed.data_parallel(lambda qs, ctx: _warmup_loss(encoder, store, qs, ctx, device), encoder)

    def forward(step: int) -> tuple[torch.Tensor, dict]:
        chosen = rng.sample(pool, batch_size)
        contexts = warmup_contexts(
            chosen, evidence, [queries[i].block_id for i in chosen], len(store), c, rng, negatives
        )
        mine = distributed.shard(list(zip(chosen, contexts)))
        local_q = [queries[i] for i, _ in mine]
        weight = distributed.shard_weight(
            sum(len(q.targets) for q in local_q), sum(len(queries[i].targets) for i in chosen)
        )
        loss, correct, tokens = loss_fn(local_q, [[z] for _, z in mine])
        # the logged loss is this shard's mean; the backpropagated one is weighted to the global batch's
        return loss * weight, {"encoder_warmup_loss": loss, "encoder_warmup_accuracy": correct / tokens.clamp(min=1)}

    def probe_due(step: int) -> None:
        if (step + 1) % probe_every == 0 and step + 1 < c.steps:
            measure(step + 1)

    loop.run(forward, after=probe_due)
    if c.steps:
        measure(c.steps)
    summary = {"encoder_warmup_steps": float(c.steps)}
    if gain:
        summary.update(evidence_gain_before_warmup=gain["first"], evidence_gain=gain["last"])
    return summary


def _warmup_loss(
    encoder: KnowledgeAugmentedEncoder,
    store: BlockStore,
    queries: list[MaskedQuery],
    contexts: list[list[int | None]],
    device: torch.device,
):
    """Mean MLM cross-entropy over the masked tokens, the argmax hits and the token count."""
    batch = encoder_inputs(store, queries, contexts, device)
    mask = batch.pop("token_mask")  # [B, M]
    logits = encoder.masked_log_probs(
        batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["mask_positions"]
    )  # [B, M, V]
    logp = logits.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)  # [B, M]
    loss = -(logp * mask).sum() / mask.sum().clamp(min=1)
    with torch.no_grad():
        hits = ((logits.argmax(-1) == batch["targets"]).to(mask.dtype) * mask).sum()
    return loss, hits, mask.sum()
