"""Prefect tasks for the model stages: thin wrappers that load inputs, call realm_core, save outputs.

Each task writes into a directory the flow gives it (inside the stage's atomic output dir)
and returns paths or small metric dicts, never models.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from realm_core import distributed
from realm_core.answer import load_open_qa as open_qa_over_index
from realm_core.blocks import BlockStore, read_blocks
from realm_core.checkpoint import Checkpointer, fingerprint
from realm_core.config import Params
from realm_core.evaluate import dense_recall
from realm_core.finetune import OpenQA, finetune
from realm_core.ict import train_ict, warmup_mlm_head
from realm_core.index import DenseIndex
from realm_core.io import InputError, atomic_dir, write_json
from realm_core.logging import StepLogger
from realm_core.metrics import answer_sets, any_answerable
from realm_core.modeling import (
    KnowledgeAugmentedEncoder,
    Retriever,
    SpanReader,
    backbone_dir,
    load_embedder,
    load_encoder,
    load_retriever,
    load_tokenizer,
    resolve_device,
    save_embedder,
    save_encoder,
    save_reader,
    save_retriever,
)
from realm_core.paths import Paths
from realm_core.precision import resolve_embed_precision
from realm_core.pretrain import Pretrainer, check_top_k, pretrain
from realm_core.questions import read_qa_jsonl
from realm_core.reading import pretraining_queries, warmup_encoder
from realm_core.refresh import make_refresher, planned_refreshes


def seed_everything(seed: int) -> None:
    """Seed every generator; under torchrun torch's (dropout) gets seed + rank and each process
    its share of the cores (realm_core/distributed.py). Rank 0 / one process: exactly `seed`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed + distributed.rank())
    torch.set_num_threads(distributed.threads_per_process())


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow; a plain logger under `realm train` (torchrun, no flow run)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("realm.train")


def _stage_spec(root: Path, stage: str) -> dict:
    return yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]


def stage_params(params: Params, root: Path, stage: str) -> dict[str, Any]:
    """The flattened params ("pretrain.lr": 3e-05) that dvc.yaml lists for `stage`: what DVC reruns
    it for, so what its MLflow run logs (the pipeline's parent run logs them all)."""
    names = [p for p in _stage_spec(root, stage).get("params", []) if isinstance(p, str)]
    return {k: v for k, v in params.flat().items() if any(k == n or k.startswith(n + ".") for n in names)}


def stage_fingerprint(params: Params, paths: Paths, stage: str) -> str:
    """Hash of what DVC keys `stage` on in dvc.yaml (its params and the bytes of its deps, code
    included), so a checkpoint never survives a change that DVC reruns the stage for.
    `checkpoint_every` is left out: how often state is saved does not change the result."""
    flat = {k: v for k, v in stage_params(params, paths.root, stage).items() if not k.endswith(".checkpoint_every")}
    deps = _stage_spec(paths.root, stage).get("deps", [])
    return fingerprint({"stage": stage, "params": flat}, [paths.root / d for d in deps])


def stage_checkpointer(
    params: Params, paths: Paths, stage: str, loop: str, log: StepLogger | None = None
) -> Checkpointer:
    """Resumable state of one training loop in the untracked runs/<stage>/<loop>/ (DVC has no checkpoints,
    DESIGN.md 2); saved every `<stage>.checkpoint_every` steps and deleted once the stage succeeds.
    The step logger's buffered metrics are flushed before each save, so a killed attempt's MLflow
    run holds every step its last checkpoint covers (flows/resume.py copies them on resume)."""
    every = getattr(getattr(params, stage), "checkpoint_every", 0)
    flush = getattr(log, "flush", None)
    return Checkpointer(
        paths.scratch(stage) / loop,
        every,
        stage_fingerprint(params, paths, stage),
        before_save=(lambda _: flush()) if flush else None,
    )


def log_resume(checkpoint: Checkpointer, what: str) -> None:
    if checkpoint.resumed_step:
        run_logger().info(
            "%s resumed from checkpoint step %d (%s)", what, checkpoint.resumed_step, checkpoint.directory
        )


def load_store(params: Params, paths: Paths) -> BlockStore:
    tokenizer = load_tokenizer(backbone_dir(params.model.backbone))
    return BlockStore.load(paths.blocks, tokenizer, params.corpus.max_block_tokens)


def check_pretrain_top_k(params: Params, store: BlockStore) -> None:
    """pretrain.top_k against the corpus, as soon as a stage has read it (InputError naming blocks.jsonl)."""
    c = params.pretrain
    check_top_k(c.top_k, store, null_block=c.null_block, exclude_source=c.exclude_source)


@task(cache_policy=NO_CACHE)
def train_ict_task(params: Params, paths: Paths, out_dir: Path, log: StepLogger) -> Path:
    """Inverse cloze task warm start of both embedders (ORQA); saves out_dir/retriever."""
    seed_everything(params.seed)
    store = load_store(params, paths)
    check_pretrain_top_k(params, store)  # before ICT trains for a pre-training that cannot run
    device = resolve_device(params.device)
    retriever = new_retriever(params)
    run_logger().info(
        "ICT on %d blocks (%d usable), %d steps of batch %d",
        len(store),
        sum(len(b.sentences) > 1 for b in store.blocks),
        params.ict.steps,
        params.ict.batch_size,
    )
    c = params.ict
    ckpt = stage_checkpointer(params, paths, "ict", "retriever", log)
    train_ict(
        retriever,
        store,
        c,
        max_query_tokens=params.model.max_query_tokens,
        seed=params.seed,
        device=device,
        log=log,
        checkpoint=ckpt,
    )
    log_resume(ckpt, "ICT")
    save_retriever(retriever.cpu(), out_dir / "retriever")
    return out_dir / "retriever"


@task(cache_policy=NO_CACHE)
def warmup_mlm_head_task(params: Params, paths: Paths, out_dir: Path, log: StepLogger) -> Path:
    """Creates the encoder's MLM head (tied decoder) and warms it up; saves out_dir/encoder."""
    seed_everything(params.seed)
    store = load_store(params, paths)
    encoder = KnowledgeAugmentedEncoder.from_backbone(
        backbone_dir(params.model.backbone), params.model.num_hidden_layers, copy=params.model.copy_head
    )
    c = params.ict
    ckpt = stage_checkpointer(params, paths, "ict", "mlm_head", log)
    warmup_mlm_head(
        encoder,
        store,
        c,
        seed=params.seed,
        device=resolve_device(params.device),
        log=log,
        checkpoint=ckpt,
    )
    log_resume(ckpt, "MLM head warm-up")
    save_encoder(encoder.cpu(), out_dir / "encoder")
    return out_dir / "encoder"


@task(cache_policy=NO_CACHE)
def warmup_encoder_task(params: Params, paths: Paths, out_dir: Path, log: StepLogger) -> dict[str, float]:
    """Teaches the whole encoder to read answer-bearing blocks (realm_core/reading.py); overwrites out_dir/encoder.

    Warns when the probe's evidence gain stays below `encoder_warmup.min_evidence_gain`: the
    retriever's gradient in pre-training is then mostly noise (REALM section 3.4).
    """
    seed_everything(params.seed)
    store = load_store(params, paths)
    device = resolve_device(params.device)
    encoder = load_encoder(out_dir / "encoder")
    q = pretraining_queries(store, params.pretrain, params.model.max_query_tokens, params.seed)
    c = params.encoder_warmup
    run_logger().info(
        "encoder warm-up: %d salient queries (%d with an answer-bearing block elsewhere), probe of %d held-out queries, %d steps",
        len(q.salient),
        sum(bool(e) for e in q.salient_evidence),
        len(q.probe),
        c.steps,
    )
    ckpt = stage_checkpointer(params, paths, "ict", "encoder", log)
    summary = warmup_encoder(
        encoder,
        store,
        q.salient,
        q.salient_evidence,
        c,
        seed=params.seed,
        device=device,
        negatives=q.salient_negatives,
        log=log,
        checkpoint=ckpt,
        probe=q.probe,
    )
    log_resume(ckpt, "encoder warm-up")
    gain = summary.get("evidence_gain")
    if gain is not None:
        passed = gain >= c.min_evidence_gain
        summary["evidence_gain_gate_passed"] = float(passed)
        (run_logger().info if passed else run_logger().warning)(
            "evidence gain on the probe: %.3f nats/token (gate %.2f: %s)",
            gain,
            c.min_evidence_gain,
            "passed" if passed else "NOT passed; the retriever will train on noise",
        )
    save_encoder(encoder.cpu(), out_dir / "encoder")
    return summary


def new_retriever(params: Params) -> Retriever:
    m = params.model
    return Retriever.from_backbone(
        backbone_dir(m.backbone), m.num_hidden_layers, m.retriever_dim, m.pooling, shared=m.share_embedders
    )


def initial_retriever(params: Params, paths: Paths) -> Retriever:
    """The ICT warm-started retriever, or (ablation `pretrain.retriever_init: bert`) a fresh one."""
    return load_retriever(paths.ict / "retriever") if params.pretrain.retriever_init == "ict" else new_retriever(params)


@task(cache_policy=NO_CACHE)
def pretrain_task(params: Params, paths: Paths, out_dir: Path, log: StepLogger) -> dict[str, float]:
    """REALM pre-training from the ICT retriever and the warmed-up encoder.

    Saves the last retriever and encoder, the best ones by retrieval utility in out_dir/best,
    and every index refresh (snapshot step, swap step, staleness) in refresh_log.json.
    """
    seed_everything(params.seed)
    store = load_store(params, paths)
    check_pretrain_top_k(params, store)
    device = resolve_device(params.device)
    c = params.pretrain
    q = pretraining_queries(store, c, params.model.max_query_tokens, params.seed)
    run_logger().info(
        "%d of %d %s-masking queries kept (query_filter=%s), probe of %d held-out queries, over %d blocks; %s index refresh every %d steps",
        len(q.train),
        int(q.stats["queries_before_filter"]),
        c.masking,
        c.query_filter,
        len(q.probe),
        len(store),
        c.refresh_mode,
        c.refresh_every,
    )
    trainer = Pretrainer.from_params(
        initial_retriever(params, paths), load_encoder(paths.ict / "encoder"), store, c, device
    )
    kernel = resolve_embed_precision(params.index.embed_precision, device)
    run_logger().info(
        "index builds embed the blocks with %s (index.embed_precision=%s)", kernel, params.index.embed_precision
    )
    refresher = make_refresher(
        c.refresh_every,
        c.refresh_mode,
        store,
        device,
        c.embed_batch_size,
        work_dir=paths.scratch("pretrain") / "refresh",
        lag=c.refresh_lag,
        max_staleness=c.max_staleness,
        threads=c.refresh_threads,
        precision=kernel,
    )
    lag = c.refresh_lag if c.refresh_mode == "async" else 0
    planned = planned_refreshes(c.steps, c.refresh_every, lag)
    if c.refresh_every and planned == 0:
        run_logger().warning(
            "pretrain.steps=%d is too short for any index refresh (refresh_every=%d, refresh_lag=%d): the whole run "
            "retrieves from the initial index; raise steps or lower refresh_every",
            c.steps,
            c.refresh_every,
            lag,
        )
    elif c.refresh_every and c.refresh_mode == "async" and not lag:
        run_logger().warning(
            "pretrain.refresh_lag=0: indexes are swapped in whenever the builder finishes, so results depend on the machine's load"
        )
    else:
        run_logger().info(
            "%d index refreshes planned (every %d steps, each swapped in %d steps after its snapshot)",
            planned,
            c.refresh_every,
            lag,
        )

    best_dir = paths.scratch("pretrain") / "best"  # beside the checkpoints, so a resumed run keeps it

    def save_best(step: int, utility: float) -> None:
        with atomic_dir(best_dir) as best:
            save_retriever(trainer.retriever, best / "retriever")
            save_encoder(trainer.encoder, best / "encoder")
            write_json(best / "best.json", {"step": step, "retrieval_utility_window": utility, "window": c.best_window})

    dev = read_qa_jsonl(paths.qa_dev)
    dev_relevant = answer_sets([b.text for b in store.blocks], [q.answers for q in dev])  # once, not per index

    def dev_recall(index: DenseIndex) -> dict[str, float]:
        """Zero-shot recall@k of the held-out questions over each new index (a curve per refresh),
        and a log line as it comes into use (the Prefect UI shows each refresh when it happens)."""
        r = refresher.records[-1]
        run_logger().info(
            "index snapshot at step %d swapped in at step %d (staleness %d): built in %.1f s, trainer waited %.2f s",
            r.snapshot_step,
            r.swap_step,
            r.staleness,
            r.build_seconds,
            r.wait_seconds,
        )
        recall = dense_recall(
            trainer.retriever.query,
            store,
            index,
            dev,
            recall_at=params.evaluate.recall_at,
            max_query_tokens=params.model.max_query_tokens,
            device=device,
            relevant=dev_relevant,
        )
        return {f"dev_{k.replace('@', '_at_')}": v for k, v in recall.items()}  # MLflow names cannot hold "@"

    ckpt = stage_checkpointer(params, paths, "pretrain", "trainer", log)
    summary = pretrain(
        trainer,
        q.train,
        c,
        refresher=refresher,
        seed=params.seed,
        log=log,
        on_best=save_best,
        checkpoint=ckpt,
        on_index=dev_recall,
        probe=q.probe,
    )
    summary.update({k: v for k, v in q.stats.items() if k != "queries"})
    log_resume(ckpt, "pre-training")
    if best_dir.exists():
        shutil.copytree(best_dir, out_dir / "best")
    write_json(
        out_dir / "refresh_log.json",
        {
            "mode": c.refresh_mode if c.refresh_every else "never",
            "refresh_every": c.refresh_every,
            "embed_precision": kernel,
            "refreshes": [r.schedule() for r in refresher.records],  # timings: MLflow and the resources file
        },
    )
    save_retriever(trainer.retriever.cpu(), out_dir / "retriever")
    save_encoder(trainer.encoder.cpu(), out_dir / "encoder")
    return summary


def load_open_qa(params: Params, paths: Paths, query_dir: Path, reader: SpanReader, index_dir: Path) -> OpenQA:
    """OpenQA over the blocks and the frozen index; a corrupt index or one built over other blocks
    is an InputError naming it (realm_core.answer.load_open_qa, shared with `realm ask`)."""
    return open_qa_over_index(params, paths, load_embedder(query_dir), reader, index_dir)


@task(cache_policy=NO_CACHE)
def finetune_task(params: Params, paths: Paths, out_dir: Path, log: StepLogger) -> dict[str, float]:
    """Train the query embedder and a span reader initialised from the pre-trained encoder
    (`finetune.init: ict`: from the ICT retriever and the ict stage's encoder, ORQA-style)."""
    seed_everything(params.seed)
    c = params.finetune
    questions = read_qa_jsonl(paths.qa_train)
    texts = [b.text for b in read_blocks(paths.blocks)]
    if not any_answerable([q.answers for q in questions], texts):  # before the index is built
        raise InputError(
            f"{paths.qa_train}: none of its {len(questions)} training questions has an answer that occurs in any of "
            f"the {len(texts)} blocks of {paths.blocks}, so fine-tuning would learn nothing (loss 0); give questions "
            "about this corpus (corpus.qa_train_extra), or a corpus that holds their answers"
        )
    start = paths.finetune_start(c.init)
    reader = SpanReader(load_encoder(start.encoder).bert, hidden=c.span_hidden)
    model = load_open_qa(params, paths, start.query, reader, out_dir / "index")
    run_logger().info("fine-tuning on %d questions over %d blocks", len(questions), len(model.store))
    ckpt = stage_checkpointer(params, paths, "finetune", "openqa", log)
    summary = finetune(
        model,
        questions,
        c,
        seed=params.seed,
        log=log,
        checkpoint=ckpt,
    )
    log_resume(ckpt, "fine-tuning")
    save_embedder(model.query.cpu(), out_dir / "query")
    save_reader(model.reader.cpu(), out_dir / "reader")
    return summary
