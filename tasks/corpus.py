"""Prefect tasks for the corpus stage: read passages, process one shard, write the outputs.

Thin wrappers over realm_core.corpus. `process_shard_task` is what the flow maps over shards
(ThreadPoolTaskRunner locally, Dask/Ray workers at scale); each call loads its own tokenizer
and spaCy pipeline (neither is safe to share between threads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from realm_core.config import Params
from realm_core.corpus import Passage, process_shard, read_passages
from realm_core.corpus_files import finish_corpus
from realm_core.modeling import backbone_dir, load_tokenizer
from tasks.retry import IO_RETRIES


@task(cache_policy=NO_CACHE, **IO_RETRIES)  # the corpus may sit on a network file system
def read_passages_task(params: Params, root: Path) -> list[Passage]:
    """The (subsampled) passages of corpus.source; bad input raises InputError naming file:line."""
    c = params.corpus
    passages = read_passages(c.source, c.max_passages, params.seed, root)
    get_run_logger().info("read %d passages from %s", len(passages), c.source)
    return passages


@task(cache_policy=NO_CACHE)
def process_shard_task(passages: list[Passage], params: Params, shard_index: int) -> list[dict[str, Any]]:
    """Sentences, salient spans and packed blocks (no ids yet) for one shard."""
    tokenizer = load_tokenizer(backbone_dir(params.model.backbone))
    blocks = process_shard(passages, tokenizer, params.corpus.max_block_tokens, progress=f"corpus shard {shard_index}")
    get_run_logger().info("shard %d: %d passages -> %d blocks", shard_index, len(passages), len(blocks))
    return blocks


@task(cache_policy=NO_CACHE, **IO_RETRIES)  # writes atomically, so a retry starts clean
def write_corpus_task(
    blocks: list[dict[str, Any]], params: Params, out_dir: Path, n_passages: int, root: Path
) -> dict[str, float]:
    """Cloze (or given) questions, dense block ids, blocks.jsonl / qa_*.jsonl / stats.json in out_dir."""
    tokenizer = load_tokenizer(backbone_dir(params.model.backbone))
    stats = finish_corpus(blocks, params.corpus, tokenizer, params.seed, out_dir, n_passages, root)
    get_run_logger().info("corpus: %s", ", ".join(f"{k}={v:g}" for k, v in stats.items()))
    return stats
