"""Stage `finetune`: Open-QA fine-tuning over a frozen block index (ORQA/REALM).

realm stage finetune     (what `dvc repro finetune` runs)
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.embedding import build_index
from flows.registry import log_finetuned_model
from flows.tracking import StageContext, stage_run
from realm_core.io import atomic_dir
from realm_core.modeling import resolve_device
from realm_core.precision import resolve_embed_precision
from tasks.retry import IO_RETRIES
from tasks.training import finetune_task, stage_fingerprint

# I/O against the tracking server: a dropped connection or a locked database is retried, a bad model is not.
register_model = task(log_finetuned_model, name="register_model", cache_policy=NO_CACHE, **IO_RETRIES)


@flow(name="finetune", log_prints=True)
def finetune_flow() -> dict[str, float]:
    with stage_run("finetune") as ctx:
        with atomic_dir(ctx.paths.finetune) as out:
            _finetune(ctx, out)
        # the model, logged from the final data/finetune, registered as a version of flows/registry.MODEL_NAME
        register_model(
            ctx.recorder.client, ctx.run_id, ctx.params, ctx.paths, stage_fingerprint(ctx.params, ctx.paths, "finetune")
        )
    return ctx.final


def _finetune(ctx: StageContext, out: Path) -> None:
    """Embed the blocks once into out/index, then fine-tune into out/query and out/reader."""
    # Block embeddings are frozen in fine-tuning (ORQA): embed once, a map over corpus shards.
    start = ctx.paths.finetune_start(ctx.params.finetune.init)
    kernel = resolve_embed_precision(ctx.params.index.embed_precision, resolve_device(ctx.params.device))
    ctx.recorder.client.set_tag(ctx.run_id, "realm.embed_precision", kernel)  # what index.embed_precision resolved to
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
