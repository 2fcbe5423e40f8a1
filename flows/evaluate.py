"""Stage `evaluate`: exact match and recall@k on held-out questions, with a BM25 baseline.

realm stage evaluate     (what `dvc repro evaluate` runs)
"""

from __future__ import annotations

from prefect import flow

from flows.tracking import stage_run
from realm_core.io import atomic_dir
from tasks.evaluate import evaluate_task


@flow(name="evaluate", log_prints=True)
def evaluate_flow() -> dict[str, float]:
    with stage_run("evaluate") as ctx, atomic_dir(ctx.paths.evaluate) as out:
        ctx.set_final(evaluate_task(ctx.params, ctx.paths, out))
    return ctx.final
