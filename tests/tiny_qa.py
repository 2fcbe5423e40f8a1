"""A tiny project whose pipeline has "finished": params.yaml, data/corpus/blocks.jsonl and the
fine-tuned artefacts in data/finetune (query embedder, span reader, frozen index), all from a
random 2-layer BERT of width 32 with the real vocabulary (tests/tiny.py). Built in about a
second, so `realm ask`, the HTTP API and the bad-input table run without a pipeline run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from realm_core.blocks import BlockStore, embed_blocks
from realm_core.config import Params
from realm_core.index import DenseIndex
from realm_core.modeling import (
    KnowledgeAugmentedEncoder,
    Retriever,
    SpanReader,
    backbone_dir,
    load_tokenizer,
    save_embedder,
    save_reader,
)
from realm_core.paths import Paths
from tests.tiny import make_tiny_bert, write_blocks

TINY_QA_PARAMS = {
    "model": {"num_hidden_layers": None, "retriever_dim": 16, "max_query_tokens": 32},
    "corpus": {"max_block_tokens": 64},
    "finetune": {"span_hidden": 16},
    "evaluate": {"top_k": 2},
}


def tiny_params(bert: Path) -> Params:
    return Params.model_validate({**TINY_QA_PARAMS, "model": {**TINY_QA_PARAMS["model"], "backbone": str(bert)}})


def make_finetuned_project(root: Path, seed: int = 0, shared: bool = False, backbone: str | None = None) -> Path:
    """Write a project at `root` as the finetune stage would leave it; return `root`.

    The frozen document tower is saved where the finetune stage reads it (data/pretrain/retriever/doc)
    and named in the index's meta, as `realm index add` needs. `shared`: one tower for queries and
    blocks. `backbone`: a real checkpoint ("minilm", the packaged all-MiniLM-L6-v2) instead of the
    random tiny BERT, for tests that need retrieval by meaning (its mean pooling is a sentence embedder)."""
    root.mkdir(parents=True, exist_ok=True)
    if backbone is None:
        bert = make_tiny_bert(root / "tinybert")
        params = tiny_params(bert)
    else:
        bert = backbone_dir(backbone)
        params = Params.model_validate(
            {**TINY_QA_PARAMS, "model": {"backbone": backbone, "num_hidden_layers": None, "max_query_tokens": 32}}
        )
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    paths = Paths(root)
    store = BlockStore.load(write_blocks(paths.blocks), load_tokenizer(bert), params.corpus.max_block_tokens)
    torch.manual_seed(seed)
    retriever = Retriever.from_backbone(bert, None, params.model.retriever_dim, params.model.pooling, shared=shared)
    reader = SpanReader(KnowledgeAugmentedEncoder.from_backbone(bert, None).bert, hidden=params.finetune.span_hidden)
    save_embedder(retriever.query, paths.finetune / "query")
    save_reader(reader, paths.finetune / "reader")
    save_embedder(retriever.doc, paths.finetune_start("pretrain").doc)
    embeddings = embed_blocks(retriever.doc, store, torch.device("cpu"), progress=None)
    meta = {"source": "pretrain/retriever/doc", "embed_precision": "fp32"}
    DenseIndex(embeddings, np.arange(len(store), dtype=np.int64), meta=meta).save(paths.finetune / "index")
    return root
