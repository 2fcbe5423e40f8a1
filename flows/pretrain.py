"""Stage `pretrain`: REALM pre-training with salient-span masking and index refreshes.

realm stage pretrain     (what `dvc repro pretrain` runs)
"""

from __future__ import annotations

from prefect import flow

from flows.tracking import stage_run
from realm_core.io import atomic_dir
from tasks.training import pretrain_task


@flow(name="pretrain", log_prints=True)
def pretrain_flow() -> dict[str, float]:
    with stage_run("pretrain") as ctx, atomic_dir(ctx.paths.pretrain) as out:
        summary = pretrain_task(ctx.params, ctx.paths, out, ctx.log_fn)
        ctx.set_final({**summary, **ctx.last_logged(["loss", "retrieval_utility"])})
    return ctx.final
