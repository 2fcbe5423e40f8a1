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
Every `refresh_every` steps a snapshot of the document embedder re-embeds all blocks into a new
index, synchronously or in a separate process while training goes on (section 3.3, refresh.py).
The windowed mean of the retrieval utility picks the best checkpoint (section 4.5 uses RU to
diagnose retrieval; we keep the best as well as the last).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import trange

from realm_core import distributed
from realm_core.blocks import BlockStore, pad_batch, query_batch
from realm_core.checkpoint import Checkpointer, TrainState
from realm_core.index import DenseIndex
from realm_core.logging import StepLogger, null_logger
from realm_core.modeling import KnowledgeAugmentedEncoder, Retriever, adamw_with_warmup, marginal_log_likelihood, retrieval_utility
from realm_core.refresh import Refresher, RefreshRecord, build_index


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
        self.index_snapshot_step = 0  # the step whose parameters embedded the blocks of self.index

    def set_index(self, index: DenseIndex, snapshot_step: int) -> None:
        self.index, self.index_snapshot_step = index, snapshot_step

    def refresh_index(self, step: int) -> None:
        """Re-embed every block with the current document embedder, here and now (tests, debugging)."""
        self.set_index(build_index(self.retriever.doc, self.store, self.device, self.embed_batch_size), step)

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

    def shard_weight(self, local: list[MaskedQuery], batch: list[MaskedQuery]) -> float:
        """Loss factor for this rank's slice `local` of the global `batch` under DDP (1.0 in one process):
        per_token averages over masked tokens, whose count differs between slices; product over examples."""
        count = (lambda qs: sum(len(q.targets) for q in qs)) if self.loss_form == "per_token" else len
        return distributed.shard_weight(count(local), count(batch))

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


def refresh_metrics(record: RefreshRecord) -> dict[str, float]:
    return {"refresh_snapshot_step": record.snapshot_step, "refresh_staleness": record.staleness, "refresh_build_seconds": record.build_seconds, "refresh_wait_seconds": record.wait_seconds}


def refresh_summary(records: list[RefreshRecord]) -> dict[str, float]:
    """Refreshes after the initial build, their mean staleness and the trainer's total wait for them."""
    later = records[1:]
    return {
        "refreshes": float(len(later)),
        "refresh_staleness_mean": float(np.mean([r.staleness for r in later])) if later else 0.0,
        "refresh_wait_seconds": float(sum(r.wait_seconds for r in later)),
        "initial_index_seconds": float(records[0].wait_seconds) if records else 0.0,
    }


class BestByUtility:
    """Mean retrieval utility over consecutive windows of `window` steps; calls `on_best` on a new best.

    RU = log p(y|z,x) marginal minus log p(y|null,x) (section 4.5): how much retrieval helps the
    MLM. Measured on each batch before its update (progressive validation), so it costs nothing.
    """

    def __init__(self, window: int, on_best: Callable[[int, float], None] | None):
        self.window, self.on_best = window, on_best
        self.values: list[float] = []
        self.best, self.best_step = float("-inf"), -1

    def add(self, value: float, step: int) -> float | None:
        """The window's mean when `step` closes a window, else None."""
        self.values.append(value)
        if len(self.values) < self.window:
            return None
        mean, self.values = float(np.mean(self.values)), []
        if mean > self.best:
            self.best, self.best_step = mean, step
            if self.on_best is not None:
                self.on_best(step, mean)
        return mean

    def state(self) -> dict:
        return {"values": self.values, "best": self.best if self.best_step >= 0 else None, "best_step": self.best_step}

    def load(self, state: dict) -> None:
        self.values, self.best_step = list(state["values"]), state["best_step"]
        self.best = float("-inf") if state["best"] is None else state["best"]


def pretrain(
    trainer: Pretrainer,
    queries: list[MaskedQuery],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    refresher: Refresher,
    seed: int,
    log: StepLogger = null_logger,
    best_window: int = 10,
    on_best: Callable[[int, float], None] | None = None,
    checkpoint: Checkpointer | None = None,
    on_index: Callable[[DenseIndex], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Train both towers and the encoder; returns summary metrics of the run.

    `on_index(index)` runs on rank 0 whenever a new index comes into use (e.g. the zero-shot
    recall@5 of held-out questions, so quality can be followed refresh by refresh); the metrics
    it returns are logged with the refresh's.

    `refresher` keeps the index fresh (SyncRefresher or AsyncRefresher); `on_best(step, ru)` is
    called whenever a window of `best_window` steps has the best mean retrieval utility so far.
    With `checkpoint`, training resumes from its newest checkpoint. The index is then rebuilt
    from the restored document embedder; in sync mode with `checkpoint_every` a multiple of
    `refresh_every`, that is the index an uninterrupted run uses there, so the result is the same.
    Under torchrun each rank trains with DDP on its slice of the same global batch and retrieves
    from the index rank 0 built (refresh.make_refresher shares it); only rank 0 logs and saves.
    """
    if not queries:
        raise ValueError("no pre-training queries: with masking=salient, no sentence holds a salient span of at most pretrain.max_masks wordpieces")
    rng = random.Random(seed)
    params = list(trainer.retriever.parameters()) + list(trainer.encoder.parameters())
    optimizer, schedule = adamw_with_warmup(params, lr, steps)
    trainer.retriever.train()
    trainer.encoder.train()
    best = BestByUtility(best_window, on_best if distributed.is_master() else None)
    batch_size = distributed.global_batch_size(batch_size, len(queries))
    log = distributed.master_only(log)
    recent_ru: list[float] = []
    state = TrainState({"retriever": trainer.retriever, "encoder": trainer.encoder}, optimizer, schedule, {"batches": rng})
    start = checkpoint.restore(state) if checkpoint else 0
    try:
        if start:
            best.load(checkpoint.extra["best"])
            recent_ru = list(checkpoint.extra["recent_ru"])

        def use_index(index: DenseIndex, step: int) -> None:
            trainer.set_index(index, refresher.records[-1].snapshot_step)
            extra = on_index(index) if on_index is not None and distributed.is_master() else {}
            log({**refresh_metrics(refresher.records[-1]), **extra}, step)

        use_index(refresher.initial(trainer.retriever.doc, start, checkpoint.extra.get("refreshes") if start else None), start)
        loss_fn = distributed.data_parallel(trainer.forward, trainer.retriever, trainer.encoder)
        for step in trange(start, steps, desc="pretrain", unit="step", mininterval=2.0, disable=not distributed.is_master()):
            new_index = refresher.step(trainer.retriever.doc, step)
            if new_index is not None:
                use_index(new_index, step)
            batch = rng.sample(queries, batch_size)
            local = distributed.shard(batch)
            out = loss_fn(local)
            loss = out["loss"] * trainer.shard_weight(local, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            row = {"loss": loss, "index_staleness": step - trainer.index_snapshot_step}
            row = distributed.average({**row, **{k: out[k] for k in ("retrieval_utility", "null_prob") if k in out}})
            if "retrieval_utility" in row:
                recent_ru.append(row["retrieval_utility"])
                window_mean = best.add(row["retrieval_utility"], step)
                if window_mean is not None:
                    row["retrieval_utility_window"] = window_mean
            log(row, step)
            if checkpoint:
                checkpoint.maybe_save(step + 1, state, final=step + 1 == steps, extra={"best": best.state(), "recent_ru": recent_ru, "refreshes": refresher.log()})
        distributed.barrier()  # rank 0's last on_best has written its files
    finally:
        refresher.close()
    summary = {**refresh_summary(refresher.records), "queries": float(len(queries))}
    if recent_ru:
        summary["retrieval_utility_last_quarter"] = float(np.mean(recent_ru[-max(1, len(recent_ru) // 4) :]))
    if best.best_step >= 0:
        summary.update(best_retrieval_utility=best.best, best_step=float(best.best_step))
    return summary
