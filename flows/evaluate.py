"""Stage `evaluate`: exact match and recall@k on held-out questions, with a BM25 baseline.

realm stage evaluate     (what `dvc repro evaluate` runs)
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.registry import promote_if_champion
from flows.tracking import stage_run
from realm_core.io import atomic_dir
from tasks.evaluate import evaluate_task
from tasks.retry import IO_RETRIES
from tasks.training import stage_fingerprint

promote = task(promote_if_champion, name="promote_champion", cache_policy=NO_CACHE, **IO_RETRIES)


@flow(name="evaluate", log_prints=True)
def evaluate_flow() -> dict[str, float]:
    with stage_run("evaluate") as ctx:
        with atomic_dir(ctx.paths.evaluate) as out:
            ctx.set_final(evaluate_task(ctx.params, ctx.paths, out))
        # the registered version of the data/finetune just scored becomes realm@champion if its EM is the best
        fingerprint = stage_fingerprint(ctx.params, ctx.paths, "finetune")
        promote(ctx.recorder.client, ctx.run_id, fingerprint, ctx.final["exact_match"])
    return ctx.final
