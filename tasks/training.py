"""Prefect tasks for the model stages: thin wrappers that load inputs, call realm_core, save outputs.

Each task writes into a directory the flow gives it (inside the stage's atomic output dir)
and returns paths or small metric dicts, never models.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from realm_core.blocks import BlockStore, embed_blocks
from realm_core.config import Params
from realm_core.finetune import OpenQA, finetune, load_questions
from realm_core.ict import train_ict, warmup_mlm_head
from realm_core.index import DenseIndex
from realm_core.logging import StepLogger
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
from realm_core.pretrain import Pretrainer, make_queries, pretrain


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


def load_store(params: Params, paths: Paths) -> BlockStore:
    tokenizer = load_tokenizer(backbone_dir(params.model.backbone))
    return BlockStore.load(paths.blocks, tokenizer, params.corpus.max_block_tokens)


@task(cache_policy=NO_CACHE)
def train_ict_task(params: Params, paths: Paths, out_dir: Path, log: StepLogger) -> Path:
    """Inverse cloze task warm start of both embedders (ORQA); saves out_dir/retriever."""
    seed_everything(params.seed)
    store = load_store(params, paths)
    device = resolve_device(params.device)
    retriever = new_retriever(params)
    get_run_logger().info("ICT on %d blocks (%d usable), %d steps of batch %d", len(store), sum(len(b.sentences) > 1 for b in store.blocks), params.ict.steps, params.ict.batch_size)
    c = params.ict
    train_ict(retriever, store, steps=c.steps, batch_size=c.batch_size, lr=c.lr, remove_prob=c.remove_prob, max_query_tokens=params.model.max_query_tokens, seed=params.seed, device=device, log=log)
    save_retriever(retriever.cpu(), out_dir / "retriever")
    return out_dir / "retriever"


@task(cache_policy=NO_CACHE)
def warmup_mlm_head_task(params: Params, paths: Paths, out_dir: Path, log: StepLogger) -> Path:
    """Creates the encoder's MLM head (tied decoder) and warms it up; saves out_dir/encoder."""
    seed_everything(params.seed)
    store = load_store(params, paths)
    encoder = KnowledgeAugmentedEncoder.from_backbone(backbone_dir(params.model.backbone), params.model.num_hidden_layers)
    c = params.ict
    warmup_mlm_head(encoder, store, steps=c.mlm_warmup_steps, batch_size=c.mlm_batch_size, lr=c.mlm_lr, seed=params.seed, device=resolve_device(params.device), log=log)
    save_encoder(encoder.cpu(), out_dir / "encoder")
    return out_dir / "encoder"


def new_retriever(params: Params) -> Retriever:
    m = params.model
    return Retriever.from_backbone(backbone_dir(m.backbone), m.num_hidden_layers, m.retriever_dim, m.pooling)


def initial_retriever(params: Params, paths: Paths) -> Retriever:
    """The ICT warm-started retriever, or (ablation `pretrain.retriever_init: bert`) a fresh one."""
    return load_retriever(paths.ict / "retriever") if params.pretrain.retriever_init == "ict" else new_retriever(params)


@task(cache_policy=NO_CACHE)
def pretrain_task(params: Params, paths: Paths, out_dir: Path, log: StepLogger) -> dict[str, float]:
    """REALM pre-training from the ICT retriever and the warmed-up encoder; saves both."""
    seed_everything(params.seed)
    store = load_store(params, paths)
    device = resolve_device(params.device)
    c = params.pretrain
    queries = make_queries(store, c.masking, params.model.max_query_tokens, c.max_masks, params.seed)
    get_run_logger().info("%d %s-masking queries over %d blocks", len(queries), c.masking, len(store))
    trainer = Pretrainer(
        initial_retriever(params, paths),
        load_encoder(paths.ict / "encoder"),
        store,
        top_k=c.top_k,
        device=device,
        embed_batch_size=c.embed_batch_size,
        loss_form=c.loss_form,
        null_block=c.null_block,
        exclude_source=c.exclude_source,
    )
    summary = pretrain(trainer, queries, steps=c.steps, batch_size=c.batch_size, lr=c.lr, refresh_every=c.refresh_every, seed=params.seed, log=log)
    save_retriever(trainer.retriever.cpu(), out_dir / "retriever")
    save_encoder(trainer.encoder.cpu(), out_dir / "encoder")
    return summary


@task(cache_policy=NO_CACHE)
def build_frozen_index_task(params: Params, paths: Paths, out_dir: Path) -> Path:
    """Embed every block once with the pre-trained document embedder (frozen in fine-tuning)."""
    store = load_store(params, paths)
    doc = load_embedder(paths.pretrain / "retriever" / "doc")
    emb = embed_blocks(doc, store, resolve_device(params.device), params.pretrain.embed_batch_size)
    DenseIndex(emb, np.arange(len(store), dtype=np.int64)).save(out_dir / "index", meta={"source": "pretrain/retriever/doc"})
    return out_dir / "index"


def load_open_qa(params: Params, paths: Paths, query_dir: Path, reader: SpanReader, index_dir: Path) -> OpenQA:
    store = load_store(params, paths)
    return OpenQA(
        load_embedder(query_dir),
        reader,
        store,
        DenseIndex.load(index_dir),
        device=resolve_device(params.device),
        max_query_tokens=params.model.max_query_tokens,
        max_span=params.finetune.max_span_tokens,
    )


@task(cache_policy=NO_CACHE)
def finetune_task(params: Params, paths: Paths, out_dir: Path, log: StepLogger) -> dict[str, float]:
    """Train the query embedder and a span reader initialised from the pre-trained encoder."""
    seed_everything(params.seed)
    c = params.finetune
    reader = SpanReader(load_encoder(paths.pretrain / "encoder").bert, hidden=c.span_hidden)
    model = load_open_qa(params, paths, paths.pretrain / "retriever" / "query", reader, out_dir / "index")
    questions = load_questions(paths.qa_train)
    get_run_logger().info("fine-tuning on %d questions over %d blocks", len(questions), len(model.store))
    summary = finetune(model, questions, steps=c.steps, batch_size=c.batch_size, lr=c.lr, retriever_top_k=c.retriever_top_k, reader_top_k=c.top_k, seed=params.seed, log=log)
    save_embedder(model.query.cpu(), out_dir / "query")
    save_reader(model.reader.cpu(), out_dir / "reader")
    return summary
