"""Stage `corpus`: passages -> sentences + salient spans -> blocks -> cloze questions.

    realm stage corpus       (what `dvc repro corpus` runs)

Preprocessing is a Prefect map over `corpus.shards` contiguous shards; the shards' blocks are
concatenated in shard order, which equals the unsharded result (tests/test_corpus.py).
"""

from __future__ import annotations

from prefect import flow, unmapped

from flows.tracking import stage_run
from realm_core.corpus import shard
from realm_core.io import atomic_dir
from tasks.corpus import process_shard_task, read_passages_task, write_corpus_task


@flow(name="corpus", log_prints=True)
def corpus_flow() -> dict[str, float]:
    with stage_run("corpus") as ctx, atomic_dir(ctx.paths.corpus) as out:
        passages = read_passages_task(ctx.params, ctx.paths.root)
        parts = shard(passages, ctx.params.corpus.shards)
        futures = process_shard_task.map(parts, unmapped(ctx.params), list(range(len(parts))))
        blocks = [b for future in futures for b in future.result()]
        ctx.set_final(write_corpus_task(blocks, ctx.params, out, len(passages), ctx.paths.root))
    return ctx.final
