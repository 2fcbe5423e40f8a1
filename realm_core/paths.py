"""Where each stage reads and writes, relative to the project root.

DVC owns these outputs (`dvc.yaml` lists the same paths); resumable scratch state lives in
`runs/`, which neither git nor DVC tracks (DESIGN.md 2, "known pitfalls").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")

    # corpus stage
    @property
    def corpus(self) -> Path:
        return self.root / "data" / "corpus"

    @property
    def blocks(self) -> Path:
        return self.corpus / "blocks.jsonl"

    @property
    def qa_train(self) -> Path:
        return self.corpus / "qa_train.jsonl"

    @property
    def qa_dev(self) -> Path:
        return self.corpus / "qa_dev.jsonl"

    # ict stage: retriever/{query,doc}/ and encoder/ (BERT MLM with its warmed-up head)
    @property
    def ict(self) -> Path:
        return self.root / "data" / "ict"

    # pretrain stage: retriever/{query,doc}/ and encoder/
    @property
    def pretrain(self) -> Path:
        return self.root / "data" / "pretrain"

    # finetune stage: query/ (embedder), reader/, index/ (frozen block embeddings)
    @property
    def finetune(self) -> Path:
        return self.root / "data" / "finetune"

    def finetune_start(self, init: str) -> "FinetuneStart":
        """What fine-tuning starts from (`finetune.init`): REALM's pre-trained retriever and encoder, or
        ORQA's recipe, the ICT retriever and the ict stage's warmed encoder with no REALM pre-training
        (REALM Table 1 compares exactly these two; section 4.4)."""
        if init == "pretrain":
            return FinetuneStart(self.pretrain / "retriever" / "query", self.pretrain / "retriever" / "doc", self.pretrain / "encoder")
        if init == "ict":
            return FinetuneStart(self.ict / "retriever" / "query", self.ict / "retriever" / "doc", self.ict / "encoder")
        raise ValueError(f"finetune.init must be 'pretrain' or 'ict', got {init!r}")

    # evaluate stage
    @property
    def evaluate(self) -> Path:
        return self.root / "data" / "evaluate"

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    def curve(self, stage: str) -> Path:
        """Per-step training metrics as TSV: DVC plots and the MLflow loss-curve artefact read it."""
        return self.root / "metrics" / f"{stage}_curve.tsv"

    def scratch(self, stage: str) -> Path:
        """Untracked working state (checkpoints, refresh hand-over files)."""
        return self.root / "runs" / stage


@dataclass(frozen=True)
class FinetuneStart:
    """The checkpoints fine-tuning starts from: query tower, doc tower (frozen: it embeds the index), encoder (the reader's BERT)."""

    query: Path
    doc: Path
    encoder: Path
