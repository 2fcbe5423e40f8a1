"""The stage registry: the pipeline's stages, in order, and what each one is (issue 14, item 3).

The CLI (its `realm stage` / `realm train` choices), MLflow tracking (run descriptions, dataset
lineage), the pipeline (its summary) and `realm train` read the stages from here; dvc.yaml runs
them (tests/test_structure.py checks that both list the same stages in the same order).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    note: str  # the stage run's MLflow description (mlflow.note.content)
    trains: bool = False  # a training loop `realm train <name>` runs, under torchrun too (flows/train.py)
    reads: tuple[str, ...] = ()  # Paths attributes logged as the run's MLflow dataset inputs (lineage)
    writes: tuple[str, ...] = ()  # ... and the files it writes that later stages read as datasets


REGISTRY: tuple[Stage, ...] = (
    Stage(
        "corpus",
        "Reads the passages, finds salient spans, packs blocks and holds out cloze questions (data/corpus).",
        writes=("blocks", "qa_train", "qa_dev"),
    ),
    Stage(
        "ict",
        "Inverse cloze task warm start of both towers (ORQA), the MLM head warm-up and the encoder warm-up (data/ict).",
        trains=True,
        reads=("blocks",),
    ),
    Stage(
        "pretrain",
        "REALM pre-training: salient-span MLM marginalised over the top-k retrieved blocks and the null "
        "block, gradients into the retriever, asynchronous index refresh (data/pretrain).",
        trains=True,
        reads=("blocks",),
    ),
    Stage(
        "finetune",
        "Open-QA fine-tuning: query tower and span reader over the frozen block index (data/finetune).",
        trains=True,
        reads=("blocks", "qa_train"),
    ),
    Stage(
        "evaluate",
        "Exact match and recall@k on the held-out questions, zero-shot recall and BM25 (data/evaluate).",
        reads=("blocks", "qa_dev"),
    ),
)
PIPELINE_NOTE = "One `realm run`: DVC runs the stale stages, each a nested run below this one."

STAGES: tuple[str, ...] = tuple(s.name for s in REGISTRY)
TRAINING_STAGES: tuple[str, ...] = tuple(s.name for s in REGISTRY if s.trains)


def stage(name: str) -> Stage:
    """The registered stage `name`; a ValueError naming the stages otherwise."""
    for s in REGISTRY:
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
