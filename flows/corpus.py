"""Stage `corpus`: passages -> sentences + salient spans -> blocks -> cloze questions.

    realm stage corpus       (what `dvc repro corpus` runs)

Preprocessing is a Prefect map over `corpus.shards` contiguous shards, run as the subflow
`corpus-shards` on the task runner params.yaml `runner` chooses (thread pool, Dask, Ray;
flows/runners.py); the shards' blocks are concatenated in shard order, which equals the
unsharded result (tests/test_corpus.py). Writing the outputs stays in this process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, unmapped

from flows.runners import run_with_runner
from flows.tracking import stage_run
from realm_core.config import Params
from realm_core.corpus import shard
from realm_core.io import atomic_dir
from tasks.corpus import process_shard_task, read_passages_task, write_corpus_task


@flow(name="corpus-shards", log_prints=True)
def corpus_shards_flow(params: Params, root: Path) -> tuple[list[dict[str, Any]], int]:
    """(blocks of all shards in shard order, number of passages read)."""
    passages = read_passages_task(params, root)
    parts = shard(passages, params.corpus.shards)
    futures = process_shard_task.map(parts, unmapped(params), list(range(len(parts))))
    return [b for future in futures for b in future.result()], len(passages)


@flow(name="corpus", log_prints=True)
def corpus_flow() -> dict[str, float]:
    with stage_run("corpus") as ctx, atomic_dir(ctx.paths.corpus) as out:
        blocks, n_passages = run_with_runner(corpus_shards_flow, ctx.params.runner, ctx.params, ctx.paths.root)
        ctx.set_final(write_corpus_task(blocks, ctx.params, out, n_passages, ctx.paths.root))
    return ctx.final
