"""Block embedding / index building as a Prefect map over corpus shards (DESIGN.md 4).

    build_index(params, paths.blocks, paths.pretrain / "retriever" / "doc", out / "index", scratch)

`embed_index_flow` maps `embed_shard_task` over `corpus.shards` shards on the task runner that
params.yaml `runner` chooses (thread pool, Dask, Ray; flows/runners.py), then merges the shard
files in id order into one DenseIndex in this process. The finetune stage runs it as a subflow
to build its frozen index; tests/test_scaleout.py runs it on a Dask LocalCluster and checks it
equals the single-process index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, unmapped

from flows.runners import run_with_runner
from realm_core.config import Params
from realm_core.modeling import resolve_device
from realm_core.precision import resolve_embed_precision
from tasks.embedding import embed_shard_task, merge_shards_task


@flow(name="embed-index", log_prints=True)
def embed_index_flow(
    params: Params,
    blocks: Path,
    embedder_dir: Path,
    index_dir: Path,
    shard_dir: Path,
    meta: dict[str, Any],
    precision: str | None = None,
) -> Path:
    n = params.corpus.shards
    kernel = precision or resolve_embed_precision(params.index.embed_precision, resolve_device(params.device))
    futures = embed_shard_task.map(
        unmapped(params),
        unmapped(blocks),
        unmapped(embedder_dir),
        list(range(n)),
        unmapped(n),
        unmapped(shard_dir),
        unmapped(kernel),
    )
    return merge_shards_task(
        futures.result(), index_dir, {**meta, "embed_precision": kernel}, params.index, params.seed
    )  # called directly: runs here, not on a worker


def build_index(
    params: Params,
    blocks: Path,
    embedder_dir: Path,
    index_dir: Path,
    shard_dir: Path,
    meta: dict[str, Any] | None = None,
    precision: str | None = None,
) -> Path:
    """Embed every block with the document embedder in `embedder_dir` into a DenseIndex at `index_dir`.

    `precision` is the resolved embedding kernel (None = resolve `index.embed_precision` here); index.json's meta records it.
    """
    return run_with_runner(
        embed_index_flow, params.runner, params, blocks, embedder_dir, index_dir, shard_dir, meta or {}, precision
    )
