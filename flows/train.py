"""`realm train <stage>`: one training stage (ict, pretrain, finetune) without Prefect, for torchrun.

    realm train pretrain                                          one process
    torchrun --nproc_per_node 2 -m flows.cli train pretrain       2 processes (gloo on CPU, nccl with device: cuda)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m flows.cli train pretrain

`realm stage <name>` (dvc.yaml's cmd) runs the stage's Prefect flow, and Prefect starts a
temporary server in every process that runs a flow: N ranks would start N servers on one
database. So under torchrun every rank runs the stage's training tasks as plain functions
(`task.fn`, the same code the flow runs) with DistributedDataParallel (realm_core/distributed.py),
and rank 0 alone opens the stage's MLflow run (`stage_run`, nested under
REALM_MLFLOW_PARENT_RUN_ID when set), writes data/<stage>/ and metrics/<stage>.json - the files
`realm stage` writes - and deletes runs/<stage>/ on success. The other ranks write their copies
into a temporary directory that is deleted. `dvc commit <stage>` then records the outputs.

The finetune stage's frozen index is embedded across the ranks: rank r embeds shard r of W
(realm_core.sharding, the split of the Prefect map in flows/embedding.py) and the shards are
all-gathered, so every rank holds the whole index.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flows.env import project_root
from flows.stages import TRAINING_STAGES
from realm_core import distributed
from realm_core.blocks import read_blocks
from realm_core.config import Params, load_params
from realm_core.index import DenseIndex
from realm_core.io import atomic_dir
from realm_core.logging import StepLogger, null_logger
from realm_core.modeling import backbone_dir, load_embedder, load_tokenizer, resolve_device
from realm_core.paths import Paths
from realm_core.precision import resolve_embed_precision
from realm_core.sharding import Shard, embed_shard, merge_shards


def _last(log: StepLogger, keys: list[str]) -> dict[str, float]:
    """The last logged value of each key (rank 0's StepRecorder; other ranks log nothing)."""
    last = getattr(log, "last", {})
    return {k: last[k] for k in keys if k in last}


def embed_index_across_ranks(params: Params, paths: Paths, index_dir: Path, meta: dict[str, Any]) -> Path:
    """The fine-tuning index of the pre-trained document embedder, every rank embedding 1/W of the blocks."""
    embedder = load_embedder(paths.pretrain / "retriever" / "doc")
    records = read_blocks(paths.blocks)
    tokenizer = load_tokenizer(backbone_dir(params.model.backbone))
    device = resolve_device(params.device)
    kernel = resolve_embed_precision(params.index.embed_precision, device)
    mine = embed_shard(
        embedder,
        records,
        tokenizer,
        params.corpus.max_block_tokens,
        distributed.rank(),
        distributed.world_size(),
        device,
        params.pretrain.embed_batch_size,
        kernel,
    )
    vectors = torch.from_numpy(mine.embeddings.reshape(len(mine.ids), embedder.projection.out_features))
    gathered = zip(distributed.all_gather_rows(vectors), distributed.all_gather_rows(torch.from_numpy(mine.ids)))
    shards = [
        Shard(r, mine.num_shards, mine.total, ids.numpy(), emb.numpy(), source=f"rank {r}")
        for r, (emb, ids) in enumerate(gathered)
    ]
    embeddings, ids = merge_shards(shards)
    provenance = [{"shard": s.index, "blocks": len(s.ids), "worker": f"torchrun rank {s.index}"} for s in shards]
    return DenseIndex(embeddings, ids).save(index_dir, meta={**meta, "shards": provenance, "embed_precision": kernel})


def _ict(params: Params, paths: Paths, out: Path, log: StepLogger) -> dict[str, float]:
    from tasks.training import train_ict_task, warmup_encoder_task, warmup_mlm_head_task

    train_ict_task.fn(params, paths, out, log)
    warmup_mlm_head_task.fn(params, paths, out, log)
    reading = warmup_encoder_task.fn(params, paths, out, log)
    return {
        **_last(
            log,
            ["ict_loss", "ict_accuracy", "mlm_loss", "mlm_accuracy", "encoder_warmup_loss", "encoder_warmup_accuracy"],
        ),
        **reading,
    }


def _pretrain(params: Params, paths: Paths, out: Path, log: StepLogger) -> dict[str, float]:
    from tasks.training import pretrain_task

    summary = pretrain_task.fn(params, paths, out, log)
    return {**summary, **_last(log, ["loss", "retrieval_utility"])}


def _finetune(params: Params, paths: Paths, out: Path, log: StepLogger) -> dict[str, float]:
    from tasks.training import finetune_task

    embed_index_across_ranks(params, paths, out / "index", {"source": "pretrain/retriever/doc"})
    return finetune_task.fn(params, paths, out, log)


# one per registered training stage (flows/stages.py; tests/test_structure.py checks it)
STAGE_TRAINING: dict[str, Callable[[Params, Paths, Path, StepLogger], dict[str, float]]] = {
    "ict": _ict,
    "pretrain": _pretrain,
    "finetune": _finetune,
}


def train_stage(stage: str, root: Path | None = None) -> dict[str, float]:
    """Run `stage`'s training on this rank; rank 0 tracks it and writes the outputs. Returns rank 0's final metrics."""
    if stage not in TRAINING_STAGES:
        raise ValueError(
            f"realm train runs the training stages {', '.join(TRAINING_STAGES)}; got {stage!r} (use `realm stage {stage}`)"
        )
    root = project_root(root)
    params = load_params(root / "params.yaml")
    distributed.setup(params.device)
    logging.basicConfig(
        level=logging.INFO if distributed.is_master() else logging.WARNING,
        format=f"%(asctime)s rank {distributed.rank()} %(name)s: %(message)s",
    )
    try:
        from flows.tracking import stage_paths, stage_run

        if distributed.is_master():
            with stage_run(stage, root) as ctx, atomic_dir(getattr(ctx.paths, stage)) as out:
                ctx.recorder.client.set_tag(ctx.run_id, "realm.world_size", str(distributed.world_size()))
                ctx.set_final(STAGE_TRAINING[stage](ctx.params, ctx.paths, out, ctx.log_fn))
                distributed.barrier()  # every rank is done before runs/<stage>/ is deleted
            return ctx.final
        with tempfile.TemporaryDirectory(prefix=f"realm-{stage}-rank{distributed.rank()}-") as tmp:
            STAGE_TRAINING[stage](params, stage_paths(root), Path(tmp), null_logger)  # the loops log on rank 0 only
            distributed.barrier()
        return {}
    finally:
        distributed.teardown()
