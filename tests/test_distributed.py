"""Data-parallel training (issue 5, part 2): 2 CPU processes with gloo, as torchrun starts them, against one.

One `torch.multiprocessing.spawn` of 2 ranks (env:// rendezvous on a free port) runs, on a tiny
random BERT with dropout off, the same `_train_all` the test process runs alone: ICT, REALM
pre-training (sync refresh every step, so the index rank 0 builds is broadcast) and Open-QA
fine-tuning, each a few steps on one global batch split over the ranks. DDP must give the
single-process losses and weights; ICT's logits must span the global batch. The same spawn
then kills an ICT run (dropout on) after its checkpoint and resumes it under DDP.
"""

from __future__ import annotations

import json
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file, save_model

from realm_core import distributed
from realm_core.blocks import BlockStore, embed_blocks
from realm_core.checkpoint import Checkpointer, latest_checkpoint
from realm_core.config import FinetuneParams, IctParams, PretrainParams
from realm_core.finetune import OpenQA, finetune
from realm_core.ict import ict_candidates, ict_example, ict_logits, train_ict
from realm_core.index import DenseIndex
from realm_core.modeling import (
    KnowledgeAugmentedEncoder,
    Retriever,
    SpanReader,
    load_encoder,
    load_reader,
    load_retriever,
    load_tokenizer,
    save_encoder,
    save_reader,
    save_retriever,
)
from realm_core.pretrain import Pretrainer, pretrain, salient_span_queries
from realm_core.questions import QAExample
from realm_core.refresh import SharedRefresher, make_refresher
from tests.tiny import make_tiny_bert, write_blocks

CPU = torch.device("cpu")
WORLD = 2
STEPS = 3
SEED = 11
PRETRAIN_SEED = 15  # its 2 global batches split into slices of 2 vs 4 and 3 vs 2 masked tokens
QUESTIONS = [
    QAExample("[MASK] is the capital of France.", ["Paris"]),
    QAExample("The Berlin Wall fell in [MASK].", ["1989"]),
    QAExample("Mozart lived in [MASK] from 1781.", ["Vienna"]),
    QAExample("James Joyce was born in Dublin in [MASK].", ["1882"]),
]


class Interrupted(Exception):
    """Stands in for a kill right after a checkpoint."""


class StopAfterSave(Checkpointer):
    """A Checkpointer whose process 'dies' once it has saved step `stop` (on every rank alike)."""

    def __init__(self, *args, stop: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop = stop

    def maybe_save(self, step, state, **kwargs):
        path = super().maybe_save(step, state, **kwargs)
        if step == self.stop:
            raise Interrupted(step)
        return path


def _store(root: Path, bert: str = "bert") -> BlockStore:
    return BlockStore.load(root / "blocks.jsonl", load_tokenizer(root / bert), max_block_tokens=64)


def _train_all(root: Path, out: Path) -> None:
    """ICT (float32, then float64), pre-training and fine-tuning (float64) from the saved initial
    weights; every rank writes its ICT logits, rank 0 the weights and losses.

    Why float64 for the weights: ICT's loss is invariant to adding one vector to every context
    embedding, so some gradients (doc.norm.bias) are exactly 0 in theory and ~1e-8 of rounding
    noise in float32 - as large as AdamW's eps, which turns that noise into steps of about lr.
    One process and two round differently, so float32 weights agree only to ~1e-3 after a few
    steps although the gradients agree to rounding; in float64 the noise is ~1e-17 and they agree.
    """
    torch.set_num_threads(1)  # the same float reductions in every process
    random.seed(SEED)
    torch.manual_seed(SEED)
    store = _store(root)
    out.mkdir(parents=True, exist_ok=True)
    losses: dict[str, list[float]] = {"ict32": [], "ict": [], "pretrain": [], "finetune": []}

    def logger(key: str, name: str):
        return lambda metrics, step: losses[key].append(metrics[name]) if name in metrics else None

    def ict(dtype: torch.dtype, key: str) -> Retriever:
        retriever = load_retriever(root / "init" / "retriever").to(dtype)
        train_ict(
            retriever,
            store,
            IctParams(steps=STEPS, batch_size=4, lr=1e-3, remove_prob=0.9),
            max_query_tokens=32,
            seed=SEED,
            device=CPU,
            log=logger(key, "ict_loss"),
        )
        return retriever

    ict(torch.float32, "ict32")
    retriever = ict(torch.float64, "ict")
    rng = random.Random(1)
    examples = [ict_example(store, b, rng, 0.9, 32) for b in rng.sample(ict_candidates(store), 4)]
    with torch.no_grad():
        logits, labels = ict_logits(retriever, distributed.shard(examples), store, CPU)
    save_file({"logits": logits, "labels": labels}, str(out / f"logits-rank{distributed.rank()}.safetensors"))

    trainer = Pretrainer(
        load_retriever(root / "init" / "retriever").double(),
        load_encoder(root / "init" / "encoder").double(),
        store,
        top_k=3,
        device=CPU,
    )
    refresher = make_refresher(1, "sync", store, CPU, 8, work_dir=out / "refresh")
    pretrain(
        trainer,
        salient_span_queries(store, 32, 10),
        PretrainParams(steps=2, batch_size=4, lr=1e-3, query_lr=1e-3, doc_lr=1e-3, best_window=1),
        refresher=refresher,
        seed=PRETRAIN_SEED,
        log=logger("pretrain", "loss"),
    )
    shared = isinstance(refresher, SharedRefresher)

    init = load_retriever(root / "init" / "retriever")
    index = DenseIndex(embed_blocks(init.doc, store, CPU, progress=None), np.arange(len(store), dtype=np.int64))
    model = OpenQA(
        init.query.double(),
        load_reader(root / "init" / "reader").double(),
        store,
        index,
        device=CPU,
        max_query_tokens=32,
        max_span=10,
    )
    model.block_embeddings = model.block_embeddings.double()
    finetune(
        model,
        QUESTIONS,
        FinetuneParams(steps=2, batch_size=4, lr=1e-3, retriever_top_k=6, top_k=3),
        seed=SEED,
        log=logger("finetune", "loss"),
    )

    if distributed.is_master():
        for name, module in {
            "ict": retriever,
            "pretrain_retriever": trainer.retriever,
            "pretrain_encoder": trainer.encoder,
            "finetune_query": model.query,
            "finetune_reader": model.reader,
        }.items():
            save_model(module, str(out / f"{name}.safetensors"))
        (out / "losses.json").write_text(
            json.dumps({**losses, "shared_refresher": shared, "refresh_records": len(refresher.records)})
        )


def _ict_from_checkpoint(root: Path, store: BlockStore, ckpt: Checkpointer, attempt: int) -> Retriever:
    """ICT with dropout on, 4 steps; a later attempt starts from other weights and dropout seeds,
    which the restore must overwrite."""
    torch.manual_seed(100 + 7 * attempt)
    retriever = Retriever.from_backbone(root / "bert-dropout", None, 16)
    torch.manual_seed(SEED + distributed.rank() + 7 * attempt)  # dropout differs per rank
    train_ict(
        retriever,
        store,
        IctParams(steps=4, batch_size=4, lr=1e-3, remove_prob=0.9),
        max_query_tokens=32,
        seed=SEED,
        device=CPU,
        checkpoint=ckpt,
    )
    return retriever


def _resume_ict(root: Path, out: Path) -> None:
    """Once straight through, once killed after the checkpoint of step 2 and resumed; rank 0 saves both."""
    store = _store(root, "bert-dropout")
    straight = _ict_from_checkpoint(root, store, Checkpointer(out / "ckpt-straight", 2, "ddp"), attempt=0)
    try:
        _ict_from_checkpoint(root, store, StopAfterSave(out / "ckpt-resumed", 2, "ddp", stop=2), attempt=0)
    except Interrupted:
        pass
    ckpt = Checkpointer(out / "ckpt-resumed", 2, "ddp")
    resumed = _ict_from_checkpoint(root, store, ckpt, attempt=1)
    if distributed.is_master():
        save_model(straight, str(out / "resume-straight.safetensors"))
        save_model(resumed, str(out / "resume-resumed.safetensors"))
        (out / "resume.json").write_text(json.dumps({"resumed_step": ckpt.resumed_step}))


def _worker(rank: int, world: int, port: int, root: str) -> None:
    """One rank, with the environment torchrun would give it."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    distributed.setup("cpu", timeout_minutes=2)
    try:
        _train_all(Path(root), Path(root) / "ddp")
        _resume_ict(Path(root), Path(root) / "ddp")
    finally:
        distributed.teardown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_dropout_bert(directory: Path) -> Path:
    make_tiny_bert(directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )  # one process must see the same network as two
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The 2-rank spawn and the single-process reference, both from the same saved initial weights."""
    root = tmp_path_factory.mktemp("ddp")
    bert = _no_dropout_bert(root / "bert")
    make_tiny_bert(root / "bert-dropout")
    write_blocks(root / "blocks.jsonl")
    torch.manual_seed(0)
    save_retriever(
        Retriever.from_backbone(bert, None, 16, pooling="mean"), root / "init" / "retriever"
    )  # poolers unused: DDP must leave them alone
    encoder = KnowledgeAugmentedEncoder.from_backbone(bert, None)
    save_encoder(encoder, root / "init" / "encoder")
    save_reader(
        SpanReader(KnowledgeAugmentedEncoder.from_backbone(bert, None).bert, hidden=16), root / "init" / "reader"
    )
    mp.spawn(_worker, args=(WORLD, _free_port(), str(root)), nprocs=WORLD, join=True)
    threads = torch.get_num_threads()
    try:
        _train_all(root, root / "single")
    finally:
        torch.set_num_threads(threads)
    return root


def _assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, f"{a.name}: weights differ by up to {worst:.2e}"


@pytest.mark.parametrize("stage", ["ict32", "ict", "pretrain", "finetune"])
def test_losses_match_one_process_on_the_same_global_batch(runs, stage):
    """The global batch's loss at every step (rank 0 logs the mean over ranks); ict32 in float32."""
    ddp, single = (json.loads((runs / d / "losses.json").read_text()) for d in ("ddp", "single"))
    assert len(ddp[stage]) == len(single[stage]) == (2 if stage in ("pretrain", "finetune") else STEPS)
    np.testing.assert_allclose(ddp[stage], single[stage], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "module", ["ict", "pretrain_retriever", "pretrain_encoder", "finetune_query", "finetune_reader"]
)
def test_weights_after_ddp_steps_match_one_process(runs, module):
    """Gradients averaged by DDP, ICT's through the gathered negatives too: the same update as one process."""
    ict = load_file(str(runs / "ddp" / "ict.safetensors"))
    init = load_file(str(runs / "init" / "retriever" / "query" / "model.safetensors"))
    assert any((ict[k] - init[k.removeprefix("query.")]).abs().max() > 1e-4 for k in ict if k.startswith("query.")), (
        "ICT did not train"
    )
    _assert_same_weights(runs / "ddp" / f"{module}.safetensors", runs / "single" / f"{module}.safetensors")


def test_ict_negatives_come_from_every_rank(runs):
    """Each rank scores its 2 queries against all 4 contexts of the global batch (ORQA's cross-shard
    negatives): the rows of both ranks together are the single-process [4, 4] logits."""
    single = load_file(str(runs / "single" / "logits-rank0.safetensors"))
    parts = [load_file(str(runs / "ddp" / f"logits-rank{r}.safetensors")) for r in range(WORLD)]
    assert single["logits"].shape == (4, 4)
    for r, part in enumerate(parts):
        assert part["logits"].shape == (2, 4), "a rank's logits must be as wide as the global batch"
        assert part["labels"].tolist() == [2 * r, 2 * r + 1]
    torch.testing.assert_close(torch.cat([p["logits"] for p in parts]), single["logits"], atol=1e-5, rtol=1e-5)


def test_pretraining_slices_have_unequal_token_counts(runs):
    """The per-token MLM loss averages over masked tokens, so DDP's mean over ranks is the global
    loss only with distributed.shard_weight; these batches make the weighting matter."""
    queries = salient_span_queries(_store(runs), 32, 10)
    rng = random.Random(PRETRAIN_SEED)
    counts = [
        [sum(len(q.targets) for q in part) for part in (batch[:2], batch[2:])]
        for batch in (rng.sample(queries, 4) for _ in range(2))
    ]
    assert all(a != b for a, b in counts), counts


def test_rank_zero_builds_the_index_and_shares_it(runs):
    ddp, single = (json.loads((runs / d / "losses.json").read_text()) for d in ("ddp", "single"))
    assert ddp["shared_refresher"] and not single["shared_refresher"]
    assert ddp["refresh_records"] == single["refresh_records"] == 2  # the initial index and the refresh at step 1


def test_ddp_resume_from_rank_zeros_checkpoint_equals_an_uninterrupted_run(runs):
    """Rank 0 alone writes the checkpoint, with each rank's dropout generator; both ranks restore it."""
    assert json.loads((runs / "ddp" / "resume.json").read_text()) == {"resumed_step": 2}
    _assert_same_weights(
        runs / "ddp" / "resume-straight.safetensors", runs / "ddp" / "resume-resumed.safetensors", atol=0.0
    )
    rngs = load_file(str(latest_checkpoint(runs / "ddp" / "ckpt-resumed") / "rng.safetensors"))
    assert not torch.equal(rngs["rank.0.torch.cpu"], rngs["rank.1.torch.cpu"])
