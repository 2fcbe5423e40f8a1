"""Stage `ict`: warm-start the retriever with the inverse cloze task, warm up the MLM head, teach the encoder to read.

realm stage ict          (what `dvc repro ict` runs)
"""

from __future__ import annotations

from prefect import flow

from flows.tracking import stage_run
from realm_core.io import atomic_dir
from tasks.training import train_ict_task, warmup_encoder_task, warmup_mlm_head_task


@flow(name="ict", log_prints=True)
def ict_flow() -> dict[str, float]:
    with stage_run("ict") as ctx, atomic_dir(ctx.paths.ict) as out:
        train_ict_task(ctx.params, ctx.paths, out, ctx.log_fn)
        warmup_mlm_head_task(ctx.params, ctx.paths, out, ctx.log_fn)
        reading = warmup_encoder_task(ctx.params, ctx.paths, out, ctx.log_fn)
        ctx.set_final(
            {
                **ctx.last_logged(
                    [
                        "ict_loss",
                        "ict_accuracy",
                        "mlm_loss",
                        "mlm_accuracy",
                        "encoder_warmup_loss",
                        "encoder_warmup_accuracy",
                    ]
                ),
                **reading,
            }
        )
    return ctx.final
