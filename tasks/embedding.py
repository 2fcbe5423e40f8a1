"""Prefect tasks for block embedding as a map over corpus shards: embed one shard, merge them all.

Thin wrappers over realm_core.sharding. `embed_shard_task` is what flows/embedding.py maps over
shards on the configured task runner (a thread pool, Dask or Ray workers); it returns the path
of its shard file, never the vectors, so only a path travels back from a worker. Shard files
must therefore be on a filesystem the workers and the flow share (any local cluster is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from realm_core.blocks import read_blocks
from realm_core.config import IndexParams, Params
from realm_core.index import DenseIndex
from realm_core.modeling import backbone_dir, load_embedder, load_tokenizer, resolve_device
from realm_core.sharding import embed_shard, load_shard, merge_shards, save_shard, this_worker
from tasks.retry import IO_RETRIES


def shard_file(shard_dir: Path, shard: int, num_shards: int) -> Path:
    return Path(shard_dir) / f"shard-{shard:05d}-of-{num_shards:05d}.safetensors"


@task(cache_policy=NO_CACHE)
def embed_shard_task(
    params: Params,
    blocks: Path,
    embedder_dir: Path,
    shard: int,
    num_shards: int,
    shard_dir: Path,
    precision: str = "fp32",
) -> Path:
    """Embed the blocks of one shard with the document embedder in `embedder_dir`; returns the shard file.

    `precision` is the kernel the flow resolved once (realm_core/precision.py), so every shard
    of an index is embedded the same way whichever worker runs it.

    No Prefect retries: an error in here is deterministic (bad input), and a worker process
    that dies is rescheduled by Dask / Ray themselves.
    """
    tokenizer = load_tokenizer(backbone_dir(params.model.backbone))
    records = read_blocks(Path(blocks))
    result = embed_shard(
        load_embedder(Path(embedder_dir)),
        records,
        tokenizer,
        params.corpus.max_block_tokens,
        shard,
        num_shards,
        resolve_device(params.device),
        params.pretrain.embed_batch_size,
        precision,
    )
    path = save_shard(result, shard_file(shard_dir, shard, num_shards))
    get_run_logger().info("shard %d/%d: %d blocks (%s) -> %s", shard, num_shards, len(result.ids), precision, path)
    return path


@task(cache_policy=NO_CACHE, **IO_RETRIES)  # reads the workers' shard files from a shared file system
def merge_shards_task(
    shard_files: list[Path], index_dir: Path, meta: dict[str, Any], spec: IndexParams | None = None, seed: int = 0
) -> Path:
    """Merge the shard files in id order into a DenseIndex of type `spec` (params.yaml `index`) saved
    at `index_dir`; deletes the shard files.

    index.json's meta records, per shard, its size and the worker (host:pid) that embedded it, or
    "this process" for a shard embedded here (the default thread pool): a pid that changes with
    every run would make the same commit, params and seed give another DVC output (issue 16).
    """
    shards = [load_shard(f) for f in shard_files]
    embeddings, ids = merge_shards(shards)
    here = this_worker()
    provenance = [
        {"shard": s.index, "blocks": len(s.ids), "worker": "this process" if s.worker == here else s.worker}
        for s in sorted(shards, key=lambda s: s.index)
    ]
    DenseIndex.build(embeddings, ids, spec, seed=seed, progress=None).save(
        index_dir, meta={**meta, "shards": provenance}
    )
    for f in shard_files:
        Path(f).unlink(missing_ok=True)
    get_run_logger().info(
        "index of %d blocks (dim %d) from %d shards -> %s", len(ids), embeddings.shape[1], len(shard_files), index_dir
    )
    return Path(index_dir)
