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

import numpy as np
import torch
from torch import nn

from realm_core import distributed
from realm_core.blocks import BlockStore, doc_batch, query_batch
from realm_core.checkpoint import Checkpointer
from realm_core.config import PretrainParams
from realm_core.index import DenseIndex
from realm_core.io import InputError
from realm_core.logging import StepLogger, null_logger
from realm_core.loop import TrainLoop
from realm_core.masking import (  # noqa: F401 (re-exported)
    MASKINGS,
    MaskedQuery,
    encoder_inputs,
    make_queries,
    masked_query,
    random_span_queries,
    random_token_queries,
    salient_span_queries,
)
from realm_core.modeling import (
    NULL_BLOCK,
    KnowledgeAugmentedEncoder,
    Retriever,
    marginal_log_likelihood,
    retrieval_utility,
)
from realm_core.optim import GroupedAdamW, Part
from realm_core.reading import Probe
from realm_core.refresh import Refresher, RefreshRecord, build_index


def select_candidates(retrieved: np.ndarray, source: int, k: int) -> list[int]:
    """Top k distinct retrieved ids without the source block (the null block is added later)."""
    out: list[int] = []
    for block_id in retrieved.tolist():
        if block_id != source and block_id >= 0 and block_id not in out:
            out.append(block_id)
            if len(out) == k:
                break
    return out


def check_top_k(top_k: int, store: BlockStore, *, null_block: bool = True, exclude_source: bool = True) -> None:
    """pretrain.top_k candidates per query need `need` blocks in the corpus: top_k - 1 retrieved ones
    beside the null block (top_k without it), plus the query's own block, which is never a candidate.
    Checked as the ict stage starts, so ICT never trains for a pre-training that cannot run."""
    retrieved = top_k - 1 if null_block else top_k
    need = retrieved + int(exclude_source)
    if len(store) >= need:
        return
    largest = len(store) - int(exclude_source) + int(null_block)
    parts = [
        f"{retrieved} retrieved" + (" beside the null block" if null_block else ""),
        *(["plus the query's own block, never a candidate"] if exclude_source else []),
    ]
    fix = (
        f"set pretrain.top_k to at most {largest}, or use more passages (corpus.max_passages)"
        if largest >= 2
        else "use more passages (corpus.max_passages)"
    )
    where = store.source or "the corpus"
    raise InputError(
        f"{where}: pretrain.top_k={top_k} needs {need} blocks ({', '.join(parts)}), but the corpus has {len(store)}; {fix}"
    )


class NullScore(nn.Module):
    """The null block's retrieval score as one learned scalar, instead of f(x, null).

    A departure from the paper (switch `pretrain.null_bias`). REALM scores the null block like
    any other, f(x, null) = Embed_input(x) . Embed_doc([CLS] [SEP] [SEP]). On the default run that
    gave it a median p(null | x) of 1.5e-9 at step 0 and 4.6e-12 at the end, so the "retrieve
    nothing" option of section 3.4 had no effect; with a bias added to f(x, null), the doc tower
    instead moved the one null embedding towards every query and p(null) reached 1.0 within 10
    steps, starving the retriever of gradient. A scalar cannot be moved per query by the towers:
    it is calibrated once at step 0 so the null block scores like an average retrieved block,
    then learned at its own rate (`pretrain.null_bias_lr`).

    With `gate` (switch `pretrain.null_gate`, a further departure) the null block's share is a
    gate, p(null | x) = sigmoid(bias), and the retrieved blocks share the rest by softmax f(x, z):
    its score is bias + logsumexp_z f(x, z). The hypothesis it tests: in one softmax, whenever the
    null block predicts the span better than the average retrieved block, the gradient lowers every
    retrieved score at once, moving each query away from all its ICT neighbours. Under the gate the
    retrieved scores only compete with each other: their gradients sum to zero per query
    (tests/test_learning.py). Measured, it is worse (held-out R@5 17.8 -> 6.2 in 151 steps, against
    21.5 without it: reports/pretrain_scan.md), so it is off; the fall of R@5 over pre-training came
    from a stale index instead (DESIGN.md 1b).
    """

    def __init__(self, gate: bool = False):
        super().__init__()
        self.gate = gate
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, retrieved: torch.Tensor) -> torch.Tensor:
        """f(x, z) of the retrieved blocks [B, k-1] -> [B, k] with the null block's score first."""
        null = self.bias.expand(retrieved.size(0), 1)  # [B, 1]
        if self.gate:  # log_softmax of the result: [log sigmoid(b), log(1 - sigmoid(b)) + log_softmax(f)]
            null = null + torch.logsumexp(retrieved, dim=1, keepdim=True)
        return torch.cat([null, retrieved], dim=1)

    def calibrate(self, retrieved: torch.Tensor) -> float:
        """Start the null block as an average candidate: its score is the median query's mean retrieved
        score; under the gate, p(null) = 1/k, the share of each of the k candidates."""
        k = retrieved.size(1) + 1
        self.bias.fill_(-float(np.log(k - 1)) if self.gate else float(retrieved.mean(1).median()))
        return float(self.bias)


class Pretrainer:
    """One REALM pre-training step at a time, over a stale index of the blocks.

    `null_block=False` and `exclude_source=False` are REALM's ablations (section 3.4 explains
    why both exist): without the null block every candidate is a retrieved block (and retrieval
    utility, defined against the null block, is not logged); without source exclusion the
    sentence's own block may be retrieved and the task becomes trivial.

    `dropout=False` (the default, a departure from BERT's training mode) scores the candidates
    with every dropout layer off, gradients still flowing: on the default run dropout moved
    log p(y | z, x) by 0.157 nats/token for a fixed (x, z), against a genuine spread of 0.044
    across a query's candidates, and two dropout draws gave retriever gradients with cosine
    0.24 / 0.16 (DESIGN.md 1b). The retriever's gradient is the difference between candidates,
    so noise common to one pass is harmless but noise per candidate swamps it.
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
        dropout: bool = False,
        null_bias: bool = True,
        null_gate: bool = False,
    ):
        if top_k < 2:
            raise ValueError("pretrain.top_k counts the null block, so it must be at least 2")
        check_top_k(top_k, store, null_block=null_block, exclude_source=exclude_source)
        self.retriever, self.encoder, self.store = retriever.to(device), encoder.to(device), store
        self.null_bias = null_bias and null_block
        self.null = NullScore(gate=null_gate and self.null_bias).to(device)
        self.top_k, self.device, self.embed_batch_size, self.loss_form = top_k, device, embed_batch_size, loss_form
        self.null_block, self.exclude_source, self.dropout = null_block, exclude_source, dropout
        self.index: DenseIndex | None = None
        self.index_snapshot_step = 0  # the step whose parameters embedded the blocks of self.index

    @classmethod
    def from_params(
        cls,
        retriever: Retriever,
        encoder: KnowledgeAugmentedEncoder,
        store: BlockStore,
        c: PretrainParams,
        device: torch.device,
    ) -> "Pretrainer":
        return cls(
            retriever,
            encoder,
            store,
            top_k=c.top_k,
            device=device,
            embed_batch_size=c.embed_batch_size,
            loss_form=c.loss_form,
            null_block=c.null_block,
            exclude_source=c.exclude_source,
            dropout=c.dropout,
            null_bias=c.null_bias,
            null_gate=c.null_gate,
        )

    def modules(self) -> dict[str, nn.Module]:
        return {"retriever": self.retriever, "encoder": self.encoder, "null": self.null}

    def parts(self, c: PretrainParams) -> dict[str, Part]:
        """One parameter group per part at its own learning rate (realm_core/optim.py); lr 0 freezes it."""
        return {
            "query": Part.of(self.retriever.query, c.query_lr),
            "doc": Part.of(self.retriever.doc, c.doc_lr),  # dropped as a duplicate when the towers are shared
            "encoder": Part.of(self.encoder, c.lr),
            "null_bias": Part.of(self.null, c.null_bias_lr if self.null_bias else 0.0),
        }

    def train(self) -> None:
        """Training mode, with dropout only if asked for (see the class docstring)."""
        for module in self.modules().values():
            module.train(self.dropout)

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

    def retrieval_logits(self, batch: list[MaskedQuery]) -> tuple[torch.Tensor, list[list[int | None]]]:
        """f(x, z) [B, k] over the candidates, both towers live (section 3.3), and the candidates."""
        q = self.retriever.query(**query_batch(self.store, [b.input_ids for b in batch], self.device))  # [B, d]
        cands = self.candidates(q, batch)  # B x k
        if self.null_bias:  # the null block is the learned scalar: no need to embed it
            d = self.retriever.doc(
                **doc_batch(self.store, [z for row in cands for z in row[1:]], self.device)
            )  # [B*(k-1), d]
            retrieved = self.retriever.score(q, d.view(len(batch), self.top_k - 1, -1))  # [B, k-1]
            return self.null(retrieved), cands
        d = self.retriever.doc(**doc_batch(self.store, [z for row in cands for z in row], self.device))  # [B*k, d]
        return self.retriever.score(q, d.view(len(batch), self.top_k, -1)), cands  # [B, k]

    @torch.no_grad()
    def calibrate_null_bias(self, batch: list[MaskedQuery]) -> float:
        """Start the null score as an average retrieved block's (NullScore.calibrate), with dropout off
        so the calibration does not depend on a dropout draw."""
        modes = {name: m.training for name, m in self.modules().items()}
        for m in self.modules().values():
            m.eval()
        logits, _ = self.retrieval_logits(batch)  # [B, k]
        bias = self.null.calibrate(logits[:, 1:])
        for name, m in self.modules().items():
            m.train(modes[name])
        return bias

    def forward(self, batch: list[MaskedQuery]) -> dict[str, torch.Tensor]:
        logits, cands = self.retrieval_logits(batch)  # [B, k]
        enc = encoder_inputs(self.store, batch, cands, self.device)
        token_mask = enc.pop("token_mask")  # [B, M]
        logp = self.encoder.token_log_probs(**enc).view(len(batch), self.top_k, -1)  # [B, k, M]
        out = {
            "loss": marginal_log_likelihood(logits, logp, token_mask, self.loss_form),
            "candidates": cands,
            "logits": logits,
            "token_log_probs": logp,
            "token_mask": token_mask,
        }
        if self.null_block:  # all three are defined against the null block (candidate 0)
            out["retrieval_utility"] = retrieval_utility(logits.detach(), logp.detach(), token_mask)
            out["retrieval_utility_per_token"] = retrieval_utility(
                logits.detach(), logp.detach(), token_mask, per_token=True
            )
            out["null_prob"] = logits.detach().softmax(-1)[:, NULL_BLOCK].mean()
        return out


def refresh_metrics(record: RefreshRecord) -> dict[str, float]:
    return {
        "refresh_snapshot_step": record.snapshot_step,
        "refresh_staleness": record.staleness,
        "refresh_build_seconds": record.build_seconds,
        "refresh_wait_seconds": record.wait_seconds,
    }


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


DIAGNOSTICS = ("retrieval_utility", "retrieval_utility_per_token", "null_prob")


def last_quarter(values: list[float]) -> float:
    return float(np.mean(values[-max(1, len(values) // 4) :]))


def pretrain(
    trainer: Pretrainer,
    queries: list[MaskedQuery],
    c: PretrainParams,
    *,
    refresher: Refresher,
    seed: int,
    log: StepLogger = null_logger,
    on_best: Callable[[int, float], None] | None = None,
    checkpoint: Checkpointer | None = None,
    on_index: Callable[[DenseIndex], dict[str, float]] | None = None,
    probe: Probe | None = None,
) -> dict[str, float]:
    """Train both towers and the encoder for `c.steps` steps; returns summary metrics of the run.

    Each part has its own learning rate, clip and gradient norm (`grad_norm_query`, `_doc`,
    `_encoder`, `_null_bias`; realm_core/optim.py). Every step logs the loss, the retrieval
    utility (total and per masked token, section 4.5), the mean p(null | x) and the index's
    staleness. The probe's `evidence_gain` (reading.py) is logged at the start, with every new
    index and at the end; `on_index(index)` runs on rank 0 whenever a new index comes into use
    (e.g. zero-shot recall@5 of held-out questions, so quality can be followed refresh by refresh).

    `refresher` keeps the index fresh (SyncRefresher or AsyncRefresher); `on_best(step, ru)` is
    called whenever a window of `c.best_window` steps has the best mean retrieval utility so far.
    With `checkpoint`, training resumes from its newest checkpoint. The index is then rebuilt
    from the restored document embedder; in sync mode with `checkpoint_every` a multiple of
    `refresh_every`, that is the index an uninterrupted run uses there, so the result is the same.
    Under torchrun each rank trains with DDP on its slice of the same global batch and retrieves
    from the index rank 0 built (refresh.make_refresher shares it); only rank 0 logs and saves.
    """
    if not queries:
        raise ValueError(
            "no pre-training queries: with masking=salient, no sentence holds a salient span of at most pretrain.max_masks wordpieces "
            "(with query_filter=answer_elsewhere: none whose span occurs in another block)"
        )
    rng = random.Random(seed)
    opt = GroupedAdamW(
        trainer.parts(c), c.steps, weight_decay=c.weight_decay, warmup_fraction=c.warmup_fraction, clip_norm=c.clip_norm
    )
    trainer.train()
    best = BestByUtility(c.best_window, on_best if distributed.is_master() else None)
    batch_size = distributed.global_batch_size(c.batch_size, len(queries))
    loop = TrainLoop("pretrain", opt, trainer.modules(), {"batches": rng}, c.steps, log=log, checkpoint=checkpoint)
    log = loop.log
    start = loop.start
    history: dict[str, list[float]] = {}
    gains: list[float] = []
    try:
        if start:
            best.load(loop.resumed["best"])
            history = {k: list(v) for k, v in loop.resumed["history"].items()}
            gains = list(loop.resumed["evidence_gains"])

        def evidence_gain(step: int) -> dict[str, float]:
            if probe is None or not len(probe) or not distributed.is_master():
                return {}
            gains.append(probe.evidence_gain(trainer.encoder, trainer.store, trainer.device))
            return {"evidence_gain": gains[-1]}

        def use_index(index: DenseIndex, step: int) -> None:
            trainer.set_index(index, refresher.records[-1].snapshot_step)
            extra = on_index(index) if on_index is not None and distributed.is_master() else {}
            log({**refresh_metrics(refresher.records[-1]), **extra, **evidence_gain(step)}, step)

        use_index(refresher.initial(trainer.retriever.doc, start, loop.resumed.get("refreshes")), start)
        if start == 0 and trainer.null_bias:
            bias = trainer.calibrate_null_bias(random.Random(seed + 1).sample(queries, batch_size))
            log({"null_bias_init": bias}, 0)
        loss_fn = distributed.data_parallel(trainer.forward, *trainer.modules().values())

        def forward(step: int) -> tuple[torch.Tensor, dict]:
            new_index = refresher.step(trainer.retriever.doc, step)
            if new_index is not None:
                use_index(new_index, step)
            batch = rng.sample(queries, batch_size)
            local = distributed.shard(batch)
            out = loss_fn(local)
            loss = out["loss"] * trainer.shard_weight(local, batch)
            diagnostics = {k: out[k] for k in DIAGNOSTICS if k in out}
            return loss, {"loss": loss, "index_staleness": step - trainer.index_snapshot_step, **diagnostics}

        def report(metrics: dict, norms: dict[str, float]) -> dict:
            """Read after the optimiser step: the learning rates of the next step and the null
            bias this step produced."""
            head = {k: metrics[k] for k in ("loss", "index_staleness")}
            lrs = {"lr_encoder": opt.lr("encoder"), "lr_query": opt.lr("query")}
            diagnostics = {k: metrics[k] for k in DIAGNOSTICS if k in metrics}
            return {**head, **lrs, **norms, **diagnostics, "null_bias": trainer.null.bias.detach()}

        def keep(row: dict, step: int) -> dict:
            for k, v in row.items():
                history.setdefault(k, []).append(v)
            if "retrieval_utility" in row:
                window_mean = best.add(row["retrieval_utility"], step)
                if window_mean is not None:
                    row["retrieval_utility_window"] = window_mean
            return row

        def extra() -> dict:
            return {"best": best.state(), "history": history, "evidence_gains": gains, "refreshes": refresher.log()}

        loop.run(forward, report=report, on_row=keep, extra=extra)
        distributed.barrier()  # rank 0's last on_best has written its files
    finally:
        refresher.close()
    final_gain = evidence_gain(c.steps)
    if final_gain:
        log(final_gain, c.steps)
    summary = {**refresh_summary(refresher.records), "queries": float(len(queries))}
    for k in (*DIAGNOSTICS, "grad_norm_query", "grad_norm_doc", "grad_norm_encoder", "null_bias"):
        if history.get(k):
            summary[f"{k}_last_quarter"] = last_quarter(history[k])
    if gains:
        summary.update(evidence_gain_start=gains[0], evidence_gain=gains[-1])
    if best.best_step >= 0:
        summary.update(best_retrieval_utility=best.best, best_step=float(best.best_step))
    return summary
