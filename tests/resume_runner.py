"""One resumable training loop on a tiny random model: the process tests/test_resume.py SIGKILLs.

    python -m tests.resume_runner {ict,pretrain,finetune} WORKDIR [--every K] [--delay SECONDS]

WORKDIR must hold `bert/` and `blocks.jsonl` (tests/tiny.py). The loop checkpoints into
WORKDIR/runs/<stage>, prints one `step N loss X` line per step (the delay slows the steps down
so a kill lands mid-run; it changes nothing else) and `resumed from checkpoint step M` when it
resumes, and writes its final weights and metrics atomically into WORKDIR/result/.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_model

from realm_core.blocks import BlockStore, embed_blocks
from realm_core.checkpoint import Checkpointer
from realm_core.config import FinetuneParams, IctParams, PretrainParams
from realm_core.finetune import OpenQA, finetune
from realm_core.ict import train_ict
from realm_core.index import DenseIndex
from realm_core.io import atomic_dir
from realm_core.modeling import KnowledgeAugmentedEncoder, Retriever, SpanReader, load_tokenizer
from realm_core.pretrain import Pretrainer, pretrain, salient_span_queries
from realm_core.questions import QAExample
from realm_core.refresh import SyncRefresher

CPU = torch.device("cpu")
STEPS = 16
SEED = 7
QUESTIONS = [
    QAExample("[MASK] is the capital of France.", ["Paris"]),
    QAExample("The Berlin Wall fell in [MASK].", ["1989"]),
    QAExample("Mozart lived in [MASK] from 1781.", ["Vienna"]),
    QAExample("James Joyce was born in Dublin in [MASK].", ["1882"]),
]


def run(
    stage: str, workdir: Path, every: int, delay: float = 0.0, steps: int = STEPS, fingerprint: str = "tiny", echo=print
) -> dict:
    """Train `stage` from the seed (resuming from WORKDIR/runs/<stage> when `every` > 0); return its result."""
    torch.set_num_threads(1)  # the same thread count in every process: identical float reductions
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    store = BlockStore.load(workdir / "blocks.jsonl", load_tokenizer(workdir / "bert"), max_block_tokens=64)
    ckpt = Checkpointer(workdir / "runs" / stage, every, fingerprint)
    losses: dict[int, float] = {}

    def log(metrics: dict[str, float], step: int) -> None:
        if ("ict_loss" if stage == "ict" else "loss") not in metrics:  # pre-training also logs index refreshes
            return
        if not losses and ckpt.resumed_step:
            echo(f"resumed from checkpoint step {ckpt.resumed_step}")
        losses[step] = metrics["ict_loss" if stage == "ict" else "loss"]
        echo(f"step {step} loss {losses[step]:.6f}")
        time.sleep(delay)

    retriever = Retriever.from_backbone(workdir / "bert", None, 16)
    summary: dict[str, float] = {}
    if stage == "ict":
        train_ict(
            retriever,
            store,
            IctParams(steps=steps, batch_size=6, lr=1e-3, remove_prob=0.9),
            max_query_tokens=32,
            seed=SEED,
            device=CPU,
            log=log,
            checkpoint=ckpt,
        )
        modules = {"retriever": retriever}
    elif stage == "pretrain":  # sync refresh every 4 steps: a resume at a checkpoint (every 4) rebuilds the same index
        encoder = KnowledgeAugmentedEncoder.from_backbone(workdir / "bert", None)
        trainer = Pretrainer(retriever, encoder, store, top_k=3, device=CPU)
        summary = pretrain(
            trainer,
            salient_span_queries(store, 32, 10),
            PretrainParams(steps=steps, batch_size=2, lr=1e-3, query_lr=1e-3, doc_lr=1e-3, best_window=3),
            refresher=SyncRefresher(store, CPU, 8, refresh_every=4),
            seed=SEED,
            log=log,
            checkpoint=ckpt,
        )
        modules = {"retriever": retriever, "encoder": encoder}
    else:
        reader = SpanReader(KnowledgeAugmentedEncoder.from_backbone(workdir / "bert", None).bert, hidden=16)
        index = DenseIndex(
            embed_blocks(retriever.doc, store, CPU, progress=None), np.arange(len(store), dtype=np.int64)
        )
        model = OpenQA(retriever.query, reader, store, index, device=CPU, max_query_tokens=32, max_span=10)
        summary = finetune(
            model,
            QUESTIONS,
            FinetuneParams(steps=steps, batch_size=2, lr=1e-3, retriever_top_k=6, top_k=3),
            seed=SEED,
            log=log,
            checkpoint=ckpt,
        )
        modules = {"query": model.query, "reader": model.reader}
    summary = {k: v for k, v in summary.items() if "seconds" not in k}  # wall-clock differs from run to run
    result = {"start_step": ckpt.resumed_step, "losses": losses, "summary": summary}
    with atomic_dir(workdir / "result") as out:
        for name, module in modules.items():
            save_model(module, str(out / f"{name}.safetensors"))
        (out / "metrics.json").write_text(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["ict", "pretrain", "finetune"])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    run(args.stage, args.workdir, args.every, args.delay, echo=lambda line: print(line, flush=True))
    sys.exit(0)


if __name__ == "__main__":
    main()
