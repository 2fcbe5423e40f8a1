"""Retrieval and reader quality of REALM beside its baselines: same corpus, same questions, same metrics.

    .venv/bin/python bench/quality.py            # full run (~20 min on 2 cores)
    .venv/bin/python bench/quality.py --quick    # small subsets and 1 ICT step (a smoke test, ~2 min)

Benchmarks (realm_core/benchmarks.py; real public data from ../shared/data):
  cloze         the pipeline's own held-out cloze questions (data/corpus/qa_dev.jsonl) over its blocks
  squad_open    the 2,067 SQuAD v1.1 dev paragraphs, the questions of the test half of its articles
                (benchmarks.squad_article_half; the train half is for fine-tuning: bench/training_questions.py)
  vital_linked  696 NQ / WebQuestions / CuratedTREC / SQuAD questions linked to a vital-article
                passage, over those 480 passages plus a seeded sample of other vital passages
Each passage is one retrieval unit (not re-blocked); dense encoders read `[CLS] title [SEP]
passage [SEP]` cut to 256 wordpieces (REALM blocks: 288; MiniLM's own limit: 256), BM25 and the
answer test see the whole passage. Recall@k is reported by gold passage and by answer
(realm_core/benchmarks.py docstring: DPR's has_answer, regex for CuratedTREC).

Retrievers: BM25 (bm25s); all-MiniLM-L6-v2 off the shelf (sentence-transformers: 6 layers, mean
pooling, normalised); the untrained retriever (MiniLM's first layers + random projection); a
re-initialised retriever (random BERT weights of the same config) untrained and trained here by
ICT with the pipeline's recipe; the ICT-only retriever (data/ict); the REALM-pretrained
retriever (data/pretrain, zero-shot); the fine-tuned query tower (data/finetune, not zero-shot).
Readers: closed-book (REALM's encoder with the null block only, filling [MASK] slots) and the
REALM fine-tuned span reader over its own retrieval (data/finetune), scored by EM (regex for
CuratedTREC). Writes bench/results/quality.{json,md} and a recall@k PNG, logged to the MLflow
experiment "realm-bench".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.publish import publish  # noqa: E402
from bench.quality_report import markdown_report, plot_comparisons, plot_recall_curves  # noqa: E402
from realm_core.benchmarks import (  # noqa: E402
    SQUAD_ZIP,
    VITAL_LINKED,
    VITAL_PASSAGES,
    Benchmark,
    BlockCorpus,
    answer_sets,
    cloze,
    gold_sets,
    question_file,
    squad_open,
    vital_linked,
    vital_linked_blocks,
    vital_titles,
)
from realm_core.blocks import Block, BlockStore, embed_blocks, pad_batch, query_batch  # noqa: E402
from realm_core.bm25 import bm25_retrieve  # noqa: E402
from realm_core.config import Params, load_params  # noqa: E402
from realm_core.finetune import OpenQA  # noqa: E402
from realm_core.ict import train_ict  # noqa: E402
from realm_core.index import DenseIndex  # noqa: E402
from realm_core.metrics import exact_match, hit_table, recall_at_k, regex_match  # noqa: E402
from realm_core.modeling import (  # noqa: E402
    Embedder,
    KnowledgeAugmentedEncoder,
    Retriever,
    backbone_dir,
    load_embedder,
    load_encoder,
    load_reader,
    load_retriever,
    load_tokenizer,
)
from realm_core.questions import QAExample  # noqa: E402

KS = (1, 5, 20)
PASSAGE_TOKENS = 256
CPU = torch.device("cpu")


@dataclass
class Models:
    """The compared checkpoints (the workspace's last pipeline run by default)."""

    minilm: Path  # a sentence-transformers (or plain BERT) directory, used whole
    backbone: Path  # the BERT the pipeline starts from: untrained and re-initialised retrievers
    num_hidden_layers: int | None
    ict: Path  # ICT retriever: query/, doc/
    pretrain: Path  # retriever/{query,doc}/, encoder/
    finetune: Path  # query/, reader/
    blocks: Path  # the pipeline's blocks.jsonl: ICT of the re-initialised retriever runs on it
    orqa: Path | None = None  # an ORQA-style fine-tune (`finetune.init: ict`): query/, reader/ over the ICT doc tower
    ablations: dict[str, Path] = field(default_factory=dict)  # name -> another pre-training's output (retriever/)

    @classmethod
    def workspace(
        cls, root: Path, params: Params, orqa: Path | None = None, ablations: dict[str, Path] | None = None
    ) -> "Models":
        data = root / "data"
        return cls(
            backbone_dir("minilm"),
            backbone_dir(params.model.backbone),
            params.model.num_hidden_layers,
            data / "ict" / "retriever",
            data / "pretrain",
            data / "finetune",
            data / "corpus" / "blocks.jsonl",
            orqa,
            dict(ablations or {}),
        )


@dataclass
class Settings:
    depth: int = 100  # rankings this deep: recall@k curve up to k = depth
    reader_questions: int = 700  # seeded sample per benchmark for the readers (all if fewer)
    reinit_ict_steps: int | None = (
        None  # None = params.ict.steps (the pipeline's ICT recipe); 0 = no random_init_ict row
    )
    batch_size: int = 64
    only: frozenset[str] | None = None  # score only these systems (retrievers and readers); None = all

    def selected(self, name: str) -> bool:
        return self.only is None or name in self.only


# ============================================================================ retrieval


def passage_store(bench: Benchmark, tokenizer) -> BlockStore:
    """Each passage as one block (no sentence packing), cut to PASSAGE_TOKENS when encoded."""
    return BlockStore(
        [Block(i, p.title, p.text, [], []) for i, p in enumerate(bench.passages)], tokenizer, PASSAGE_TOKENS
    )


def passage_texts(bench: Benchmark) -> list[str]:
    """What BM25 and MiniLM read: title and text (as BEIR feeds both to either)."""
    return [f"{p.title} {p.text}".strip() for p in bench.passages]


def dense_rankings(doc_emb: np.ndarray, query_emb: np.ndarray, depth: int) -> list[list[int]]:
    """Exact maximum inner product search (faiss IndexFlatIP): passage positions, best first."""
    _, ids = DenseIndex(doc_emb, np.arange(len(doc_emb), dtype=np.int64)).search(query_emb, depth)
    return ids.tolist()


@torch.inference_mode()
def embed_questions(
    embedder: Embedder, store: BlockStore, questions: list[QAExample], max_query_tokens: int, batch_size: int
) -> np.ndarray:
    """Query tower embeddings of `[CLS] question [SEP]`: [Q, d]."""
    embedder.eval()
    out = []
    for start in range(0, len(questions), batch_size):
        ids = [store.query_ids(q.question, max_query_tokens) for q in questions[start : start + batch_size]]
        out.append(embedder(**query_batch(store, ids, CPU)).float().numpy())
    return np.concatenate(out)


def encode_minilm(model, texts: list[str], batch_size: int) -> np.ndarray:
    """sentence-transformers encoding as the model's authors use it: mean pooling, L2-normalised."""
    return model.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=len(texts) > 500,
    )


def random_init_retriever(
    backbone: Path, num_hidden_layers: int | None, dim: int, pooling: str, seed: int
) -> Retriever:
    """Same architecture as the pipeline's retriever, BERT weights re-initialised (BERT's init):
    tests whether retrieval skill comes from unsupervised training rather than MiniLM's
    supervised QA training. Both towers start from the same BERT, as Retriever.from_backbone."""
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(str(backbone))
    if num_hidden_layers is not None:
        config.num_hidden_layers = num_hidden_layers
    torch.manual_seed(seed)
    bert = BertModel(config, add_pooling_layer=True)
    return Retriever(Embedder(bert, dim, pooling), Embedder(copy.deepcopy(bert), dim, pooling))


def towers(retriever: Retriever) -> tuple[Embedder, Embedder]:
    return retriever.query, retriever.doc


def realm_retrievers(
    models: Models, params: Params, settings: Settings, tokenizer
) -> dict[str, tuple[str, Callable[[], tuple[Embedder, Embedder]]]]:
    """name -> (what it is, a loader of its (query, doc) towers), in report order."""
    m, ict = params.model, params.ict
    steps = ict.steps if settings.reinit_ict_steps is None else settings.reinit_ict_steps
    layers = "all" if models.num_hidden_layers is None else models.num_hidden_layers

    def seeded(build: Callable[[], Retriever]) -> Callable[[], tuple[Embedder, Embedder]]:
        def load() -> tuple[Embedder, Embedder]:
            torch.manual_seed(params.seed)
            return towers(build())

        return load

    def reinit_ict() -> Retriever:
        r = random_init_retriever(models.backbone, models.num_hidden_layers, m.retriever_dim, m.pooling, params.seed)
        store = BlockStore.load(models.blocks, tokenizer, params.corpus.max_block_tokens)
        return train_ict(
            r,
            store,
            ict.model_copy(update={"steps": steps}),
            max_query_tokens=m.max_query_tokens,
            seed=params.seed,
            device=CPU,
        )

    return {
        "untrained": (
            f"backbone ({layers} layers) + random projection, no retrieval training",
            seeded(
                lambda: Retriever.from_backbone(models.backbone, models.num_hidden_layers, m.retriever_dim, m.pooling)
            ),
        ),
        "random_init": (
            f"random BERT weights ({layers} layers), no training: chance level",
            seeded(
                lambda: random_init_retriever(
                    models.backbone, models.num_hidden_layers, m.retriever_dim, m.pooling, params.seed
                )
            ),
        ),
        **(
            {
                "random_init_ict": (
                    f"random BERT weights + ICT here ({steps} steps x {ict.batch_size}, the pipeline's recipe)",
                    seeded(reinit_ict),
                )
            }
            if steps
            else {}
        ),
        "ict": ("backbone + ICT (data/ict/retriever)", lambda: towers(load_retriever(models.ict))),
        "realm_pretrained": (
            "ICT + REALM pre-training (data/pretrain/retriever), zero-shot",
            lambda: towers(load_retriever(models.pretrain / "retriever")),
        ),
        "realm_finetuned": (
            "fine-tuned query tower (data/finetune/query) over the pre-trained doc tower; NOT zero-shot",
            lambda: (load_embedder(models.finetune / "query"), load_embedder(models.pretrain / "retriever" / "doc")),
        ),
        **(
            {
                "orqa_finetuned": (
                    f"ORQA-style fine-tuned query tower ({models.orqa}/query) over the ICT doc tower; NOT zero-shot",
                    lambda: (load_embedder(models.orqa / "query"), load_embedder(models.ict / "doc")),
                )
            }
            if models.orqa
            else {}
        ),
        **{
            f"ablation_{name}": (
                f"an ablation's REALM pre-training ({path}/retriever), zero-shot",
                lambda path=path: towers(load_retriever(path / "retriever")),
            )
            for name, path in models.ablations.items()
        },
    }


def ablation_comparisons(models: Models) -> tuple[tuple[str, str, str], ...]:
    """Each ablation's zero-shot recall@5 against the REALM pre-trained retriever it departs from (Table 2)."""
    return tuple(("zero_shot_recall_at_5", f"ablation_{name}", "realm") for name in models.ablations)


# The doc tower each retriever embeds the passages with, when another system shares it: embedded
# once per corpus. The readers retrieve from the same embeddings (REALM's frozen index).
DOC_TOWER = {"ict": "ict", "orqa_finetuned": "ict", "realm_pretrained": "pretrain", "realm_finetuned": "pretrain"}


def recall_summary(
    rankings: list[list[int]], relevant: dict[str, list[set[int]]], sources: list[str], depth: int
) -> dict:
    """recall@{1,5,20} and the recall@1..depth curve per relevance rule, plus recall@5 per source."""
    out: dict = {"curve": {}, "by_source": {}}
    for rule, sets in relevant.items():
        hits = hit_table(rankings, sets)
        curve = recall_at_k(hits, range(1, depth + 1))
        out[rule] = {
            key: 100.0 * v for key, v in recall_at_k(hits, KS).items()
        }  # rankings shorter than k count as they are
        out["curve"][rule] = [round(100.0 * curve[f"recall@{k}"], 3) for k in range(1, depth + 1)]
        for tag in sorted(set(sources)):
            rows = [h for h, s in zip(hits, sources) if s == tag]
            out["by_source"].setdefault(tag, {})[f"{rule}_recall@5"] = 100.0 * recall_at_k(rows, [5])["recall@5"]
    return out


# ============================================================================ readers


def answer_score(prediction: str, q: QAExample) -> float:
    """EM after SQuAD normalisation, or for CuratedTREC a regex matched at the prediction's start."""
    return regex_match(prediction, q.answers) if q.regex else exact_match(prediction, q.answers)


@torch.inference_mode()
def closed_book_predictions(
    encoder: KnowledgeAugmentedEncoder,
    tokenizer,
    questions: list[QAExample],
    max_query_tokens: int,
    max_answer_tokens: int = 3,
    batch_size: int = 32,
) -> list[str]:
    """No retrieval: REALM's knowledge-augmented encoder given only the null block (section 3.4),
    `[CLS] question [MASK]*n [SEP] [SEP]`, fills the n slots greedily (special tokens excluded);
    the n in 1..max_answer_tokens with the best mean log-probability wins. A cloze question's own
    `[MASK]` is where the n slots go (its answer is the masked span); other questions get them at
    the end. An extractive reader has nothing to extract from the null block, so this is the
    closed-book answer REALM can give."""
    encoder.eval()
    banned = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    pieces = tokenizer.convert_ids_to_tokens(list(range(encoder.mlm.config.vocab_size)))
    continuation = torch.tensor([str(t).startswith("##") for t in pieces])  # may not start an answer
    best: list[tuple[float, str]] = [(-float("inf"), "")] * len(questions)
    for n in range(1, max_answer_tokens + 1):
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            parts = [
                slot_context(tokenizer, q.question, max(1, max_query_tokens - 3 - n)) for q in chunk
            ]  # (before, after) the slots
            seqs = [
                [
                    tokenizer.cls_token_id,
                    *before,
                    *[tokenizer.mask_token_id] * n,
                    *after,
                    tokenizer.sep_token_id,
                    tokenizer.sep_token_id,
                ]
                for before, after in parts
            ]
            segs = [[0] * (len(s) - 1) + [1] for s in seqs]
            hidden = encoder.bert(**pad_batch(seqs, segs, tokenizer.pad_token_id, CPU)).last_hidden_state  # [B, L, h]
            pos = torch.tensor([[1 + len(before) + j for j in range(n)] for before, _ in parts])  # [B, n]
            logits = encoder.mlm.cls(hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, hidden.size(-1))))  # [B, n, V]
            logits[..., banned] = -float("inf")
            logits[:, 0, continuation] = -float("inf")
            top = logits.log_softmax(-1).max(-1)  # values/indices [B, n]
            for b, (score, ids) in enumerate(zip(top.values.mean(-1).tolist(), top.indices.tolist())):
                if score > best[start + b][0]:
                    best[start + b] = (score, tokenizer.decode(ids).strip())
    return [text for _, text in best]


def slot_context(tokenizer, question: str, budget: int) -> tuple[list[int], list[int]]:
    """The wordpieces before and after where a closed-book answer goes: a cloze question's first
    `[MASK]`, else the question's end; cut to `budget` wordpieces in all, the far end of `after` first."""
    head, mask, tail = question.partition(tokenizer.mask_token)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    before, after = encode(head.strip()), encode(tail.strip()) if mask else []
    after = after[: max(0, budget - len(before))]
    return before[-budget:], after


def realm_reader_predictions(
    query: Embedder,
    reader,
    store: BlockStore,
    doc_emb: np.ndarray,
    questions: list[QAExample],
    params: Params,
    batch_size: int = 16,
) -> list[str]:
    """REALM fine-tuned: the reader's best span over the top-k passages its query tower retrieves
    from the frozen pre-trained doc embeddings, as the evaluate stage does (OpenQA.predict)."""
    index = DenseIndex(doc_emb, np.arange(len(doc_emb), dtype=np.int64))
    model = OpenQA(
        query,
        reader,
        store,
        index,
        device=CPU,
        max_query_tokens=params.model.max_query_tokens,
        max_span=params.finetune.max_span_tokens,
    )
    out: list[str] = []
    for start in tqdm(range(0, len(questions), batch_size), desc="realm reader", unit="batch", mininterval=5.0):
        chunk = [q.question for q in questions[start : start + batch_size]]
        out += [p["answer"] for p in model.predict(chunk, params.evaluate.top_k, params.evaluate.top_k)]
    return out


def reader_summary(predictions: list[str], questions: list[QAExample], sources: list[str]) -> dict:
    scores = [answer_score(p, q) for p, q in zip(predictions, questions)]
    by_source = {
        tag: 100.0 * float(np.mean([s for s, t in zip(scores, sources) if t == tag])) for tag in sorted(set(sources))
    }
    return {
        "em": 100.0 * float(np.mean(scores)),
        "questions": len(scores),
        "by_source": by_source,
        "examples": [
            {"question": q.question, "prediction": p, "answers": list(q.answers)}
            for p, q in list(zip(predictions, questions))[:5]
        ],
    }


# ============================================================================ the whole benchmark


def run(benchmarks: list[Benchmark], models: Models, params: Params, settings: Settings) -> dict:
    """Every retriever and reader on every benchmark; returns the results dict (quality.json)."""
    from sentence_transformers import SentenceTransformer

    tokenizer = load_tokenizer(models.backbone)
    results: dict = {"benchmarks": {}, "retrievers": {}, "readers": {}}
    scores: dict[
        tuple[str, str, str], np.ndarray
    ] = {}  # (benchmark, system, metric) -> per-question 0/1: the paired comparisons
    stores, relevant, reader_ids, doc_cache = {}, {}, {}, {}
    for b in benchmarks:
        shared = next((stores[o.name] for o in benchmarks if o.passages is b.passages and o.name in stores), None)
        stores[b.name] = shared or passage_store(b, tokenizer)
        relevant[b.name] = {"gold": gold_sets(b), "answer": answer_sets(b)}
        n = min(settings.reader_questions, len(b.questions))
        reader_ids[b.name] = sorted(random.Random(params.seed).sample(range(len(b.questions)), n))
        results["benchmarks"][b.name] = {
            "passages": len(b.passages),
            "questions": len(b.questions),
            "reader_questions": n,
            "questions_by_source": {t: b.sources.count(t) for t in sorted(set(b.sources))},
            "passages_over_256_wordpieces": sum(
                3 + len(t) + len(x) > PASSAGE_TOKENS for t, x in zip(stores[b.name].title_ids, stores[b.name].body_ids)
            ),
            "questions_with_an_answer_passage": sum(bool(s) for s in relevant[b.name]["answer"]),
        }

    def record(name: str, what: str, rank: Callable[[Benchmark], list[list[int]]]) -> None:
        if not settings.selected(name):
            return
        start = time.perf_counter()
        entry = results["retrievers"].setdefault(name, {"description": what})
        for b in benchmarks:
            rankings = rank(b)
            entry[b.name] = recall_summary(rankings, relevant[b.name], b.sources, settings.depth)
            scores.update(per_question_recall(b.name, name, rankings, relevant[b.name]["gold"]))
        entry["seconds"] = round(time.perf_counter() - start, 1)
        print(
            f"[quality] {name}: "
            + ", ".join(
                f"{b.name} R@5 gold {entry[b.name]['gold']['recall@5']:.1f} answer {entry[b.name]['answer']['recall@5']:.1f}"
                for b in benchmarks
            ),
            flush=True,
        )

    record(
        "bm25",
        "BM25 (bm25s, Lucene k1=1.5 b=0.75), no training",
        lambda b: bm25_retrieve(passage_texts(b), [q.question for q in b.questions], settings.depth),
    )
    if settings.selected("minilm"):
        minilm = SentenceTransformer(str(models.minilm), device="cpu")
        minilm.max_seq_length = PASSAGE_TOKENS
        record(
            "minilm",
            "all-MiniLM-L6-v2 off the shelf (6 layers, mean pooling, cosine); SUPERVISED on NQ/SQuAD-train etc.",
            lambda b: dense_rankings(
                encode_minilm(minilm, passage_texts(b), settings.batch_size),
                encode_minilm(minilm, [q.question for q in b.questions], settings.batch_size),
                settings.depth,
            ),
        )
    for name, (what, load) in realm_retrievers(models, params, settings, tokenizer).items():
        if not settings.selected(name):
            continue
        query, doc = load()

        def rank(b: Benchmark, query=query, doc=doc, name=name) -> list[list[int]]:
            key = (id(b.passages), DOC_TOWER.get(name, name))  # benchmarks over one corpus share its passages list
            if key not in doc_cache:
                doc_cache[key] = embed_blocks(
                    doc, stores[b.name], CPU, settings.batch_size, progress=f"{name} {b.name}"
                )
            emb = doc_cache[key]
            q = embed_questions(query, stores[b.name], b.questions, params.model.max_query_tokens, settings.batch_size)
            return dense_rankings(emb, q, settings.depth)

        record(name, what, rank)
    readers = {
        "closed_book": (
            "no retrieval: REALM's pre-trained encoder, null block only, fills 1-3 [MASK] slots (a cloze question's own)",
            "none",
            None,
        ),
        "realm_finetuned": (
            f"REALM fine-tuned span reader over its top-{params.evaluate.top_k} passages (data/finetune)",
            "realm_finetuned",
            models.finetune,
        ),
        **(
            {
                "orqa": (
                    f"ORQA-style: ICT retriever, fine-tuned without REALM pre-training ({models.orqa}), top-{params.evaluate.top_k} passages",
                    "orqa_finetuned",
                    models.orqa,
                )
            }
            if models.orqa
            else {}
        ),
    }
    encoder = load_encoder(models.pretrain / "encoder")
    for name, (what, retrieval, trained) in readers.items():
        if not settings.selected(name):
            continue
        if trained is not None and not settings.selected(retrieval):
            raise SystemExit(f"error: --only {name} also needs the retriever it reads from: add {retrieval}")
        start = time.perf_counter()
        entry = results["readers"].setdefault(name, {"description": what, "retrieval": retrieval})
        if trained:
            query, reader = load_embedder(trained / "query"), load_reader(trained / "reader")
        for b in benchmarks:
            qs, src = [b.questions[i] for i in reader_ids[b.name]], [b.sources[i] for i in reader_ids[b.name]]
            preds = (
                closed_book_predictions(encoder, tokenizer, qs, params.model.max_query_tokens)
                if trained is None
                else realm_reader_predictions(
                    query, reader, stores[b.name], doc_cache[(id(b.passages), DOC_TOWER[retrieval])], qs, params
                )
            )
            entry[b.name] = reader_summary(preds, qs, src)
            scores[(b.name, name, "exact_match")] = np.array([answer_score(p, q) for p, q in zip(preds, qs)])
        entry["seconds"] = round(time.perf_counter() - start, 1)
        print(
            f"[quality] reader {name}: " + ", ".join(f"{b.name} EM {entry[b.name]['em']:.2f}" for b in benchmarks),
            flush=True,
        )
    results["comparisons"] = paired_comparisons(scores, seed=params.seed, extra=ablation_comparisons(models))
    return results


# ============================================================================ paired comparisons

# The paper's claims (REALM Table 2) and the references, as (metric, a, b): a is expected to beat b.
# System names are the report's (`realm` is the pre-trained retriever for recall, the fine-tuned
# reader for exact match); SYSTEMS maps them to this bench's retriever and reader names.
COMPARISONS: tuple[tuple[str, str, str], ...] = (
    *((f"zero_shot_recall_at_{k}", "realm", "ict") for k in KS),  # REALM pre-training improves the ICT retriever
    *((f"zero_shot_recall_at_{k}", "ict", "untrained") for k in KS),  # ICT learns to retrieve (ORQA)
    *((f"zero_shot_recall_at_{k}", "realm", "bm25") for k in KS),  # the sparse reference
    ("exact_match", "realm", "orqa"),  # REALM pre-training helps the fine-tuned reader (Table 1)
    ("exact_match", "orqa", "closed_book"),  # retrieval helps the reader answer
    ("exact_match", "realm", "closed_book"),
)
SYSTEMS = {"recall": {"realm": "realm_pretrained"}, "exact_match": {"realm": "realm_finetuned"}}


def per_question_recall(
    bench: str, system: str, rankings: list[list[int]], gold: list[set[int]]
) -> dict[tuple[str, str, str], np.ndarray]:
    """Per-question hit@k (1/0) of the gold passage for each k in KS, keyed as `paired_comparisons` reads them."""
    hits = np.array([[any(h[:k]) for k in KS] for h in hit_table(rankings, gold)], dtype=np.float64).reshape(
        -1, len(KS)
    )  # [Q, len(KS)]
    return {(bench, system, f"zero_shot_recall_at_{k}"): hits[:, j] for j, k in enumerate(KS)}


def paired_comparisons(
    scores: dict[tuple[str, str, str], np.ndarray], seed: int, extra: tuple[tuple[str, str, str], ...] = ()
) -> list[dict]:
    """Each COMPARISONS row on each benchmark where both systems were scored: the difference of
    a and b in points with its paired bootstrap 95% interval (realm_core/stats.py)."""
    from realm_core.stats import paired_bootstrap

    out = []
    for bench in sorted({key[0] for key in scores}):
        for metric, a, b in (*COMPARISONS, *extra):
            names = SYSTEMS["exact_match" if metric == "exact_match" else "recall"]
            ka, kb = (bench, names.get(a, a), metric), (bench, names.get(b, b), metric)
            if ka in scores and kb in scores:
                d = paired_bootstrap(scores[ka], scores[kb], seed=seed)
                out.append({"set": bench, "metric": metric, "a": a, "b": b, **d.as_dict()})
    return out


def training_overlap(benchmarks: list[Benchmark], blocks: Path) -> dict[str, int]:
    """Passages of each benchmark whose title is a title of the pipeline's training blocks
    (ICT and pre-training saw their text, unsupervised; REALM does the same with Wikipedia)."""
    if not blocks.exists():
        return {}
    titles = {json.loads(line)["title"] for line in blocks.open(encoding="utf-8") if line.strip()}
    return {b.name: sum(p.title in titles for p in b.passages) for b in benchmarks}


# ============================================================================ MLflow and main


def log_to_mlflow(results: dict, files: list[Path], quick: bool, root: Path = ROOT) -> str:
    """One run in the "realm-bench" experiment: params, flattened metrics, the JSON, table and plot."""
    from mlflow.entities import Metric

    from flows.tracking import log_bench_run

    now = int(time.time() * 1000)
    metrics = []
    for name, entry in results["retrievers"].items():
        for b in results["benchmarks"]:
            for rule in ("gold", "answer"):
                metrics += [
                    Metric(f"{b}.{name}.{rule}_{k.replace('@', '_at_')}", v, now, 0) for k, v in entry[b][rule].items()
                ]
                # the recall@k curve, k as the step: MLflow's chart view draws it
                metrics += [
                    Metric(f"{b}.{name}.{rule}_recall_curve", v, now, k)
                    for k, v in enumerate(entry[b]["curve"][rule], start=1)
                ]
    metrics += [
        Metric(f"{b}.reader.{name}.em", entry[b]["em"], now, 0)
        for name, entry in results["readers"].items()
        for b in results["benchmarks"]
    ]
    metrics += [
        Metric(f"{c['set']}.{c['a']}_minus_{c['b']}.{c['metric']}.{k}", c[k], now, 0)
        for c in results.get("comparisons", [])
        for k in ("diff", "ci_low", "ci_high")
    ]
    return log_bench_run("quality", results["config"], metrics, files, quick=quick, root=root)


def pipeline_summary(params: Params) -> str:
    """What the compared checkpoints were trained with (the workspace's params.yaml), for the report."""
    m, c = params.model, params.corpus
    passages = (
        "all 10,033 vital passages"
        if c.max_passages is None
        else f"a {c.max_passages}-passage sample of the vital articles"
    )
    return (
        f"{m.num_hidden_layers or 'all'}-layer towers and encoder, trained on {passages}: ICT {params.ict.steps} steps, encoder warm-up "
        f"{params.encoder_warmup.steps}, REALM pre-training {params.pretrain.steps} (refresh every {params.pretrain.refresh_every}), "
        f"fine-tuning {params.finetune.steps} steps of {params.finetune.batch_size} questions"
    )


def check_data(data: Path) -> None:
    """Stop with one line, before any model loads, when --data lacks a file the question sets read."""
    if not data.is_dir():
        raise SystemExit(
            f"error: --data {data}: no such folder; pass --data DIR, the shared data folder (SOURCES.md; default ../shared/data)"
        )
    missing = [
        name
        for name in (VITAL_PASSAGES, *(n for n, _ in VITAL_LINKED.values()), SQUAD_ZIP)
        if not (data / name).is_file()
    ]
    if missing:
        raise SystemExit(
            f"error: --data {data}: missing {', '.join(missing)}; pass --data DIR, the shared data folder (SOURCES.md)"
        )


def question_sets(args: argparse.Namespace, params: Params) -> list[Benchmark]:
    """cloze and vital_linked over the pipeline's own blocks (vital_linked over its sampled corpus
    when the blocks lack linked articles), SQuAD-open's test half, then each --questions file."""
    corpus_dir = ROOT / "data" / "corpus"
    blocks = BlockCorpus.load(corpus_dir / "blocks.jsonl") if (corpus_dir / "blocks.jsonl").is_file() else None
    quick = 100 if args.quick else None
    out = []
    if blocks and (corpus_dir / "qa_dev.jsonl").is_file():  # the pipeline's own held-out cloze questions
        out.append(cloze(blocks, corpus_dir / "qa_dev.jsonl", quick, params.seed))
    linked = vital_linked_blocks(args.data, blocks, 50 if args.quick else None, params.seed) if blocks else None
    if linked is None:
        linked = (
            vital_linked(args.data, 150, params.seed, max_questions=50)
            if args.quick
            else vital_linked(args.data, args.vital_passages, params.seed)
        )
    out.append(linked)
    out.append(
        squad_open(args.data, max_questions=100, max_passages=150, seed=params.seed, half="test")
        if args.quick
        else squad_open(args.data, half="test")
    )
    if (args.questions or args.regex_questions) and blocks is None:
        raise SystemExit(
            "error: --questions are scored over the pipeline's blocks: run `realm run` first (data/corpus/blocks.jsonl)"
        )
    aliases = vital_titles(args.data) if (args.data / VITAL_PASSAGES).is_file() else {}
    for path, regex in [*((p, False) for p in args.questions), *((p, True) for p in args.regex_questions)]:
        out.append(question_file(path, blocks, regex=regex, aliases=aliases))
    names = [b.name for b in out]
    if len(set(names)) != len(names):
        raise SystemExit(f"error: two question sets share a name ({names}); rename one of the files")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="small subsets, 1 ICT step: a smoke test of the whole bench"
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder (SOURCES.md)"
    )
    parser.add_argument(
        "--vital-passages", type=int, default=2000, help="vital-linked corpus size (linked passages + seeded others)"
    )
    parser.add_argument(
        "--reader-questions",
        type=int,
        default=Settings.reader_questions,
        help="questions per benchmark for the readers (seeded sample)",
    )
    parser.add_argument(
        "--orqa",
        type=Path,
        help="an ORQA-style fine-tune (query/, reader/) of a `finetune.init=ict` run: the orqa reader row",
    )
    parser.add_argument(
        "--questions",
        type=Path,
        nargs="*",
        default=[],
        help="more question files (any format of realm_core/questions.py), each its own set over the pipeline's blocks",
    )
    parser.add_argument(
        "--regex-questions",
        type=Path,
        nargs="*",
        default=[],
        help="question files whose answers are regexes (CuratedTREC), as --questions",
    )
    parser.add_argument(
        "--reinit-ict-steps",
        type=int,
        help="ICT steps of the re-initialised retriever (default: ict.steps; 0 = leave that row out)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results",
        help="where quality.{json,md} and the PNG go (the committed report: reports/)",
    )
    parser.add_argument(
        "--ablation",
        nargs="*",
        default=[],
        metavar="NAME=DIR",
        help="another pre-training's output (DIR/retriever, e.g. a bench/pretrain_scan.py variant's out/): a zero-shot "
        "row ablation_NAME, compared with the REALM pre-trained retriever (Table 2)",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        metavar="SYSTEM",
        help="score only these retrievers/readers, e.g. `--only ict realm_pretrained ablation_NAME` to score "
        "ablations quickly (default: every system)",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = parser.parse_args()
    check_data(args.data)
    ablations = {}
    for item in args.ablation:
        name, sep, path = item.partition("=")
        if not sep or not (Path(path) / "retriever").is_dir():
            raise SystemExit(
                f"error: --ablation {item!r}: expected NAME=DIR with a DIR/retriever/ (a pre-training's output)"
            )
        ablations[name] = Path(path)
    from flows.env import configure

    configure(ROOT)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    params = load_params(ROOT / "params.yaml")
    settings = Settings(
        reader_questions=20 if args.quick else args.reader_questions,
        reinit_ict_steps=1 if args.quick else args.reinit_ict_steps,
        only=frozenset(args.only) if args.only else None,
    )
    started = time.perf_counter()
    benchmarks = question_sets(args, params)
    models = Models.workspace(ROOT, params, args.orqa, ablations)
    results = run(benchmarks, models, params, settings)
    results["config"] = {
        "quick": args.quick,
        "vital_passages": len(next(b for b in benchmarks if b.name == "vital_linked").passages),
        "reader_questions": settings.reader_questions,
        "pipeline": pipeline_summary(params),
        "orqa": str(args.orqa) if args.orqa else None,
        "ablations": {name: str(path) for name, path in ablations.items()},
        "question_files": [str(p) for p in [*args.questions, *args.regex_questions]],
        "passage_tokens": PASSAGE_TOKENS,
        "depth": settings.depth,
        "seed": params.seed,
        "reinit_ict_steps": params.ict.steps if settings.reinit_ict_steps is None else settings.reinit_ict_steps,
        "threads": torch.get_num_threads(),
    }
    results["training_overlap_by_title"] = training_overlap(benchmarks, models.blocks)
    results["seconds"] = round(time.perf_counter() - started, 1)
    out = args.out
    files = [out / "quality.json", out / "quality.md", out / "quality_recall_at_k.png", out / "quality_comparisons.png"]
    plots = lambda r, recall_png: (plot_recall_curves(r, recall_png), plot_comparisons(r, files[3]))  # noqa: E731
    publish(
        results,
        files,
        markdown_report,
        plots,
        None if args.no_mlflow else (lambda r, f: log_to_mlflow(r, f, args.quick)),
    )


if __name__ == "__main__":
    main()
