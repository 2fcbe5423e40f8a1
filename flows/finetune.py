"""Stage `finetune`: Open-QA fine-tuning over a frozen block index (ORQA/REALM).

realm stage finetune     (what `dvc repro finetune` runs)
"""

from __future__ import annotations

from prefect import flow

from flows.embedding import build_index
from flows.tracking import stage_run
from realm_core.io import atomic_dir
from realm_core.modeling import resolve_device
from realm_core.precision import resolve_embed_precision
from tasks.training import finetune_task


@flow(name="finetune", log_prints=True)
def finetune_flow() -> dict[str, float]:
    with stage_run("finetune") as ctx, atomic_dir(ctx.paths.finetune) as out:
        # Block embeddings are frozen in fine-tuning (ORQA): embed once, a map over corpus shards.
        start = ctx.paths.finetune_start(ctx.params.finetune.init)
        kernel = resolve_embed_precision(ctx.params.index.embed_precision, resolve_device(ctx.params.device))
        ctx.recorder.client.set_tag(
            ctx.run_id, "realm.embed_precision", kernel
        )  # what index.embed_precision resolved to
        build_index(
            ctx.params,
            ctx.paths.blocks,
            start.doc,
            out / "index",
            ctx.paths.scratch("finetune") / "index-shards",
            {"source": str(start.doc.relative_to(ctx.paths.root / "data"))},
            kernel,
        )
        ctx.set_final(finetune_task(ctx.params, ctx.paths, out, ctx.log_fn))
    return ctx.final
