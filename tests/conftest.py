"""Shared fixtures: a tiny random BERT with the real vocabulary and ten hand-made city blocks."""

from __future__ import annotations

import pytest
import torch

from realm_core.blocks import BlockStore
from realm_core.modeling import KnowledgeAugmentedEncoder, Retriever, load_tokenizer
from tests.tiny import make_tiny_bert, write_blocks

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    bert = make_tiny_bert(root / "bert")
    store = BlockStore.load(write_blocks(root / "blocks.jsonl"), load_tokenizer(bert), max_block_tokens=64)
    return bert, store


@pytest.fixture()
def models(tiny):
    bert, store = tiny
    torch.manual_seed(0)
    return Retriever.from_backbone(bert, None, 16), KnowledgeAugmentedEncoder.from_backbone(bert, None)
