"""Answer one question with the fine-tuned model, and show the evidence it read.

    realm ask "who wrote the nutcracker ballet?"          (flows/cli.py)
    POST /ask {"question": "...", "top_k": 5}             (flows/api.py, `realm serve-api`)

REALM's claim to interpretability (Guu et al. 2020, section 1 and 4.5) is that the answer comes
with the blocks z the retriever chose and their scores f(x, z) = Embed_input(x) . Embed_doc(z):
`answer_question` returns the reader's best span (OpenQA.predict: reader score + retriever score,
ORQA) together with the top retrieved blocks, their titles, f(x, z) and p(z|x), the softmax of
f(x, z) over the blocks listed.

`load_finetuned` loads what the finetune stage wrote (data/finetune: query embedder, reader,
frozen index) over the corpus stage's blocks, checking that the index and the blocks agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from realm_core.blocks import BlockStore
from realm_core.config import IndexParams, Params, load_params
from realm_core.finetune import OpenQA
from realm_core.index import DenseIndex
from realm_core.io import InputError
from realm_core.knowledge import Knowledge, apply_knowledge, load_knowledge, passage_ids
from realm_core.modeling import (
    Embedder,
    SpanReader,
    backbone_dir,
    load_embedder,
    load_reader,
    load_tokenizer,
    resolve_device,
)
from realm_core.paths import Paths

MAKE_IT = "run `realm run` to create it (the pipeline's corpus and finetune stages write data/)"
MAX_QUESTION_CHARS = 2000  # the query embedder reads model.max_query_tokens wordpieces anyway (48 by default)


@dataclass
class Evidence:
    """One retrieved block: its rank, id, title, text and retrieval scores."""

    rank: int
    block_id: int
    title: str
    text: str
    score: float  # f(x, z), the retriever's inner product
    probability: float  # p(z|x): softmax of f(x, z) over the blocks listed


@dataclass
class Answer:
    question: str
    answer: str
    score: float  # best span score: reader span logit + f(x, z) of its block (ORQA)
    block_id: int  # the block the answer span comes from
    block_title: str
    evidence: list[Evidence] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON object of `realm ask --json` and of POST /ask."""
        return asdict(self)


def _softmax(scores: list[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def check_question(question: str, top_k: int = 5, reader_top_k: int = 4) -> None:
    """The checks on a question that need no model: run before loading one (seconds saved on a typo)."""
    if not question.strip():
        raise InputError('the question is empty; ask a question, e.g. realm ask "who wrote hamlet?"')
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(
            f"the question has {len(question):,} characters, more than {MAX_QUESTION_CHARS:,}; ask a shorter question"
        )
    if top_k < 1 or reader_top_k < 1:
        raise InputError(f"top_k and reader_top_k must be >= 1, got {top_k} and {reader_top_k}")


def answer_question(model: OpenQA, question: str, top_k: int = 5, reader_top_k: int = 4) -> Answer:
    """The reader's best span over the top `reader_top_k` blocks, and the top `top_k` blocks as evidence.

    `reader_top_k` defaults to what the evaluate stage reads (params evaluate.top_k), so `realm
    ask` answers as evaluation scored it; `top_k` only sets how many blocks are listed, and the
    answer's own block is always among them (appended at its rank when it ranks below `top_k`).
    """
    check_question(question, top_k, reader_top_k)
    (pred,) = model.predict([question], reader_top_k=reader_top_k, retrieve_k=top_k)
    top_k = min(top_k, len(pred["retrieved"]))  # a corpus smaller than top_k lists every block
    shown = (
        top_k if int(pred["block"]) in pred["retrieved"][:top_k] else pred["retrieved"].index(int(pred["block"])) + 1
    )
    ranks = [*range(min(top_k, shown)), *([shown - 1] if shown > top_k else [])]  # the top_k, then the answer's block
    ids, scores = [pred["retrieved"][r] for r in ranks], [pred["retrieval_scores"][r] for r in ranks]
    blocks = model.store.blocks
    evidence = [
        Evidence(rank=r + 1, block_id=int(z), title=blocks[z].title, text=blocks[z].text, score=float(s), probability=p)
        for r, z, s, p in zip(ranks, ids, scores, _softmax(scores))
    ]
    block = int(pred["block"])
    return Answer(question, pred["answer"], float(pred["score"]), block, blocks[block].title, evidence)


# ---------------------------------------------------------------------------- loading


def load_index(directory: Path, n_blocks: int, blocks_file: Path, spec: IndexParams | None = None) -> DenseIndex:
    """The frozen block index (params.yaml `index` as `spec`); unreadable, inconsistent, built with
    other index params or over other blocks -> InputError naming it and the command that rebuilds it."""
    try:
        index = DenseIndex.load(directory, spec)
    except InputError:
        raise
    except ValueError as exc:  # DenseIndex.load names the directory and what disagrees
        raise InputError(f"{exc} (`dvc repro -f finetune` rebuilds it)") from None
    if len(index) != n_blocks or int(index.ids.min()) < 0 or int(index.ids.max()) >= n_blocks:
        raise InputError(
            f"{directory}: the index holds {len(index)} vectors (ids {int(index.ids.min())}..{int(index.ids.max())}) "
            f"but {blocks_file} has {n_blocks} blocks: it was built over another corpus; rebuild it (`dvc repro -f finetune`)"
        )
    return index


def load_open_qa(
    params: Params,
    paths: Paths,
    query: Embedder,
    reader: SpanReader,
    index_dir: Path,
    *,
    blocks_file: Path | None = None,
    tokenizer_dir: Path | None = None,
) -> OpenQA:
    """OpenQA over the corpus stage's blocks (or `blocks_file`) and the frozen index in `index_dir`
    (finetune, evaluate, ask). The tokenizer is the backbone's, or the copy in `tokenizer_dir`
    (a registered model carries its own, so it loads where the backbone is not installed)."""
    blocks_file = blocks_file or paths.blocks
    tokenizer = load_tokenizer(tokenizer_dir or backbone_dir(params.model.backbone))
    store = BlockStore.load(blocks_file, tokenizer, params.corpus.max_block_tokens)
    return OpenQA(
        query,
        reader,
        store,
        load_index(index_dir, len(store), blocks_file, params.index),
        device=resolve_device(params.device),
        max_query_tokens=params.model.max_query_tokens,
        max_span=params.finetune.max_span_tokens,
    )


def load_finetuned(
    params: Params,
    paths: Paths,
    *,
    finetune_dir: Path | None = None,
    blocks_file: Path | None = None,
    tokenizer_dir: Path | None = None,
    knowledge_dir: Path | None = None,
) -> OpenQA:
    """The fine-tuned model in `finetune_dir` (default data/finetune: query/, reader/, index/) over
    the blocks of `blocks_file` (default the corpus stage's, paths.blocks), with the passages added
    and removed by `realm index` (the overlay in `knowledge_dir`, realm_core/knowledge.py) if any."""
    finetune_dir, blocks_file = finetune_dir or paths.finetune, blocks_file or paths.blocks
    if not finetune_dir.is_dir():
        raise InputError(f"{finetune_dir}: no such directory: there is no fine-tuned model yet; {MAKE_IT}")
    for needed in (finetune_dir / "query", finetune_dir / "reader", finetune_dir / "index", blocks_file):
        if not needed.exists():
            raise InputError(f"{needed}: not found; {MAKE_IT}")
    model = load_open_qa(
        params,
        paths,
        load_embedder(finetune_dir / "query"),
        load_reader(finetune_dir / "reader"),
        finetune_dir / "index",
        blocks_file=blocks_file,
        tokenizer_dir=tokenizer_dir,
    )
    knowledge = load_knowledge(knowledge_dir) if knowledge_dir is not None else None
    return with_knowledge(model, blocks_file, knowledge) if knowledge is not None else model


def with_knowledge(model: OpenQA, blocks_file: Path, knowledge: Knowledge) -> OpenQA:
    """`model` retrieving from its blocks plus the overlay's, minus the removed passages' (no retraining)."""
    blocks, index = apply_knowledge(model.store.blocks, passage_ids(blocks_file), model.index, knowledge)
    return OpenQA(
        model.query,
        model.reader,
        BlockStore(blocks, model.store.tokenizer, model.store.max_block_tokens),
        index,
        device=model.device,
        max_query_tokens=model.max_query_tokens,
        max_span=model.max_span,
    )


class Answerer:
    """A loaded fine-tuned model and the reader depth of evaluation: what `realm ask` and the API hold."""

    def __init__(self, model: OpenQA, reader_top_k: int):
        self.model, self.reader_top_k = model, reader_top_k

    @classmethod
    def from_project(cls, root: Path) -> "Answerer":
        """Load root/params.yaml, then the latest fine-tuned model and index under root/data."""
        params = load_params(Path(root) / "params.yaml")
        paths = Paths(Path(root))
        return cls(load_finetuned(params, paths, knowledge_dir=paths.knowledge), params.evaluate.top_k)

    @classmethod
    def from_files(cls, params_file: Path, finetune_dir: Path, blocks_file: Path, tokenizer_dir: Path) -> "Answerer":
        """Load a packaged model: its params.yaml, fine-tuned directory, blocks and tokenizer (the
        artefacts of the MLflow model the finetune stage registers, flows/registry.py)."""
        params = load_params(params_file)
        model = load_finetuned(
            params,
            Paths(Path(finetune_dir).parent),
            finetune_dir=Path(finetune_dir),
            blocks_file=Path(blocks_file),
            tokenizer_dir=Path(tokenizer_dir),
        )
        return cls(model, params.evaluate.top_k)

    def __call__(self, question: str, top_k: int = 5) -> Answer:
        return answer_question(self.model, question, top_k, self.reader_top_k)
