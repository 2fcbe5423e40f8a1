"""bench/quality.py on tiny data: its pure functions by hand, and one whole run with tiny random
models standing in for every checkpoint (seconds, no real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.quality import (
    Models,
    Settings,
    answer_score,
    closed_book_predictions,
    dense_rankings,
    random_init_retriever,
    recall_summary,
    run,
    slot_context,
)
from bench.quality_report import markdown_report, plot_comparisons, plot_recall_curves
from realm_core.benchmarks import Benchmark
from realm_core.config import Params
from realm_core.corpus import Passage
from realm_core.modeling import (
    KnowledgeAugmentedEncoder,
    Retriever,
    SpanReader,
    load_bert,
    load_tokenizer,
    save_encoder,
    save_reader,
    save_retriever,
)
from realm_core.questions import QAExample
from tests.tiny import SENTENCES, make_tiny_bert, write_blocks


def test_recall_summary_by_hand() -> None:
    rankings = [[0, 1, 2], [2, 1, 0], [1, 2, 0]]
    relevant = {"gold": [{1}, {0}, {1}], "answer": [{0, 1}, set(), {0}]}
    out = recall_summary(rankings, relevant, ["a", "a", "b"], depth=3)
    assert out["gold"] == {"recall@1": pytest.approx(100 / 3), "recall@5": 100.0, "recall@20": 100.0}
    assert out["curve"]["gold"] == [pytest.approx(33.333), pytest.approx(66.667), 100.0]
    assert out["curve"]["answer"] == [pytest.approx(33.333), pytest.approx(33.333), pytest.approx(66.667)]
    assert out["by_source"] == {
        "a": {"gold_recall@5": 100.0, "answer_recall@5": 50.0},
        "b": {"gold_recall@5": 100.0, "answer_recall@5": 100.0},
    }


def test_dense_rankings_are_exact_inner_product_order() -> None:
    docs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]).numpy()
    assert dense_rankings(docs, torch.tensor([[1.0, 0.1], [0.0, 2.0]]).numpy(), depth=5) == [[0, 2, 1], [1, 2, 0]]


def test_answer_score_em_or_regex_at_start() -> None:
    assert answer_score("the Beatles", QAExample("q", ("Beatles",))) == 1.0
    assert (
        answer_score("The Beatles", QAExample("q", ("beatles",), regex=True)) == 0.0
    )  # regex at the start of the prediction
    assert answer_score("Dec. 25", QAExample("q", (r"Dec.*\b2[45]\b",), regex=True)) == 1.0


def test_random_init_retriever_is_reinitialised_and_seeded(tiny_models) -> None:
    bert_dir = tiny_models.backbone
    a = random_init_retriever(bert_dir, None, 16, "mean", seed=3)
    b = random_init_retriever(bert_dir, None, 16, "mean", seed=3)
    pretrained = load_bert(bert_dir).embeddings.word_embeddings.weight
    assert torch.equal(a.query.bert.embeddings.word_embeddings.weight, b.query.bert.embeddings.word_embeddings.weight)
    assert not torch.equal(a.query.bert.embeddings.word_embeddings.weight, pretrained)
    assert torch.equal(
        a.query.bert.encoder.layer[0].attention.self.query.weight,
        a.doc.bert.encoder.layer[0].attention.self.query.weight,
    )
    assert a.query.bert.config.num_hidden_layers == load_bert(bert_dir).config.num_hidden_layers


def test_closed_book_fills_words_not_special_tokens(tiny_models) -> None:
    tokenizer = load_tokenizer(tiny_models.backbone)
    torch.manual_seed(0)
    encoder = KnowledgeAugmentedEncoder.from_backbone(tiny_models.backbone, None)
    out = closed_book_predictions(
        encoder,
        tokenizer,
        [QAExample("who wrote hamlet?", ("Shakespeare",)), QAExample("x " * 80, ("y",))],
        max_query_tokens=16,
    )
    assert len(out) == 2
    for text in out:
        assert text and not any(t in text for t in ("[MASK]", "[CLS]", "[SEP]", "[PAD]")) and not text.startswith("##")
        assert 1 <= len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 3


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Models:
    """Every checkpoint the bench loads, as tiny random models in the layout the pipeline writes."""
    root = tmp_path_factory.mktemp("bench")
    bert = make_tiny_bert(root / "bert")
    torch.manual_seed(0)
    save_retriever(Retriever.from_backbone(bert, None, 16, "mean"), root / "ict" / "retriever")
    save_retriever(Retriever.from_backbone(bert, None, 16, "mean"), root / "pretrain" / "retriever")
    save_encoder(KnowledgeAugmentedEncoder.from_backbone(bert, None), root / "pretrain" / "encoder")
    finetuned = Retriever.from_backbone(bert, None, 16, "mean")
    save_retriever(finetuned, root / "tmp")
    (root / "finetune").mkdir()
    (root / "tmp" / "query").rename(root / "finetune" / "query")
    save_reader(SpanReader(load_bert(bert, pooler=False), hidden=8), root / "finetune" / "reader")
    save_retriever(
        Retriever.from_backbone(bert, None, 16, "mean"), root / "orqa"
    )  # an ORQA-style fine-tune: query/ (+ an unused doc/)
    save_reader(SpanReader(load_bert(bert, pooler=False), hidden=8), root / "orqa" / "reader")
    return Models(
        bert,
        bert,
        None,
        root / "ict" / "retriever",
        root / "pretrain",
        root / "finetune",
        write_blocks(root / "blocks.jsonl"),
        root / "orqa",
    )


def _tiny_benchmarks() -> list[Benchmark]:
    passages = [Passage(title, title, " ".join(sentences)) for title, sentences in SENTENCES]
    questions = [
        QAExample("What is the capital of France?", ("Paris",), gold_ids=("Paris",)),
        QAExample("When did the Berlin Wall fall?", ("1989",), gold_ids=("Berlin",)),
        QAExample("Who taught in Athens?", (r"Socrat(es)?",), regex=True, gold_ids=("Athens",)),
    ]
    return [
        Benchmark("tiny", passages, questions, ["nq", "nq", "trec"]),
        Benchmark("tiny2", passages[:6], questions[:2], ["squad", "squad"]),
    ]


def test_whole_bench_on_tiny_models(tiny_models, tmp_path) -> None:
    params = Params()
    params.ict.batch_size = 4
    results = run(
        _tiny_benchmarks(), tiny_models, params, Settings(depth=4, reader_questions=2, reinit_ict_steps=1, batch_size=8)
    )
    expected = {
        "bm25",
        "minilm",
        "untrained",
        "random_init",
        "random_init_ict",
        "ict",
        "realm_pretrained",
        "realm_finetuned",
        "orqa_finetuned",
    }
    assert set(results["retrievers"]) == expected
    assert set(results["readers"]) == {"closed_book", "realm_finetuned", "orqa"}
    for entry in results["retrievers"].values():
        for bench in ("tiny", "tiny2"):
            for rule in ("gold", "answer"):
                curve = entry[bench]["curve"][rule]
                assert len(curve) == 4 and curve == sorted(curve) and 0 <= curve[0] and curve[-1] <= 100
    # BM25 finds each question's own city first: "France", "Berlin Wall", "Athens" occur in one block each.
    assert results["retrievers"]["bm25"]["tiny"]["gold"]["recall@1"] == 100.0
    assert results["benchmarks"]["tiny"]["questions_with_an_answer_passage"] == 3
    assert results["readers"]["realm_finetuned"]["tiny"]["questions"] == 2
    assert all(0.0 <= r[b]["em"] <= 100.0 for r in results["readers"].values() for b in ("tiny", "tiny2"))
    comparisons = {(c["set"], c["metric"], c["a"], c["b"]): c for c in results["comparisons"]}
    assert (
        len(comparisons) == 2 * 12
    )  # 9 recall rows and the 3 EM rows (realm > orqa > closed book), on both benchmarks
    assert comparisons[("tiny", "exact_match", "realm", "orqa")]["questions"] == 2
    realm_vs_bm25 = comparisons[("tiny", "zero_shot_recall_at_1", "realm", "bm25")]
    assert realm_vs_bm25["b_score"] == 100.0 and realm_vs_bm25["questions"] == 3
    assert realm_vs_bm25["a_score"] == pytest.approx(
        results["retrievers"]["realm_pretrained"]["tiny"]["gold"]["recall@1"], abs=1e-3
    )
    assert realm_vs_bm25["diff"] == pytest.approx(realm_vs_bm25["a_score"] - 100.0, abs=1e-3)
    assert all(c["ci_low"] <= c["diff"] + 1e-9 and c["diff"] <= c["ci_high"] + 1e-9 for c in comparisons.values())
    assert comparisons[("tiny", "exact_match", "realm", "closed_book")]["questions"] == 2  # the readers' sample
    results["config"] = {"quick": True, "reader_questions": 2, "passage_tokens": 256, "threads": 1}
    report = markdown_report(results)
    assert "| tiny | zero_shot_recall_at_5 | realm - ict |" in report
    assert all(f"| {name} |" in report for name in expected | {"closed_book", "orqa"})
    assert "tiny by source" in report and "tiny2 by source" not in report  # per-source table only with several sources
    png = plot_recall_curves(results, tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert plot_comparisons(results, tmp_path / "comparisons.png").read_bytes()[:4] == b"\x89PNG"
    _check_mlflow_run(results, png, tmp_path)


def test_only_scores_the_named_systems_and_the_report_still_renders(tiny_models, tmp_path) -> None:
    params = Params()
    only = frozenset({"ict", "realm_pretrained"})
    results = run(_tiny_benchmarks()[:1], tiny_models, params, Settings(depth=4, reader_questions=2, only=only))
    assert set(results["retrievers"]) == only and results["readers"] == {}
    assert {(c["a"], c["b"]) for c in results["comparisons"]} == {("realm", "ict")}
    results["config"] = {"quick": True, "reader_questions": 2, "passage_tokens": 256, "threads": 1}
    assert "| tiny | zero_shot_recall_at_5 | realm - ict |" in markdown_report(results)
    assert plot_comparisons(results, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="add orqa_finetuned"):  # a reader without the retriever it reads from
        run(_tiny_benchmarks()[:1], tiny_models, params, Settings(depth=4, only=frozenset({"orqa"})))


def _check_mlflow_run(results: dict, png, tmp_path) -> None:
    """The run lands in the "realm-bench" experiment with metrics, the recall curve by step and the plot."""
    import os

    from mlflow import MlflowClient

    from bench.quality import log_to_mlflow

    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlruns.db'}"
    try:
        run_id = log_to_mlflow(results, [png], quick=True, root=tmp_path)
        client = MlflowClient()
        run = client.get_run(run_id)
        assert client.get_experiment(run.info.experiment_id).name == "realm-bench"
        assert run.data.metrics["tiny.bm25.gold_recall_at_1"] == 100.0
        curve = client.get_metric_history(run_id, "tiny.bm25.gold_recall_curve")
        assert [m.step for m in sorted(curve, key=lambda m: m.step)] == [1, 2, 3, 4]
        assert [a.path for a in client.list_artifacts(run_id)] == ["curve.png"]
        assert (tmp_path / "mlartifacts").is_dir()
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def test_paired_comparisons_pair_the_papers_systems_on_the_same_questions() -> None:
    from bench.quality import paired_comparisons

    better, worse = np.array([1.0, 1, 1, 0, 1, 1, 0, 1]), np.array([0.0, 1, 0, 0, 1, 0, 0, 1])
    scores = {
        ("set", "realm_pretrained", "zero_shot_recall_at_5"): better,
        ("set", "ict", "zero_shot_recall_at_5"): worse,
        ("set", "realm_finetuned", "exact_match"): worse[:4],
        ("set", "closed_book", "exact_match"): worse[:4],
    }
    rows = {(c["metric"], c["a"], c["b"]): c for c in paired_comparisons(scores, seed=0)}
    assert set(rows) == {
        ("zero_shot_recall_at_5", "realm", "ict"),
        ("exact_match", "realm", "closed_book"),
    }  # only pairs scored
    r5 = rows[("zero_shot_recall_at_5", "realm", "ict")]
    assert (r5["a_score"], r5["b_score"], r5["diff"]) == (75.0, 37.5, 37.5) and r5["ci_low"] > 0
    em = rows[("exact_match", "realm", "closed_book")]
    assert em["diff"] == em["ci_low"] == em["ci_high"] == 0.0


def test_an_ablation_row_is_compared_with_the_realm_pretrained_retriever(tmp_path) -> None:
    from bench.quality import Models, ablation_comparisons, paired_comparisons, realm_retrievers

    (tmp_path / "no_null" / "retriever").mkdir(parents=True)
    models = Models.workspace(tmp_path, Params(), ablations={"no_null": tmp_path / "no_null"})
    assert "ablation_no_null" in realm_retrievers(models, Params(), Settings(reinit_ict_steps=0), None)
    extra = ablation_comparisons(models)
    realm, ablated = np.array([1.0, 1, 1, 0, 1, 1, 0, 1]), np.array([0.0, 1, 0, 0, 1, 0, 0, 1])
    scores = {
        ("set", "realm_pretrained", "zero_shot_recall_at_5"): realm,
        ("set", "ablation_no_null", "zero_shot_recall_at_5"): ablated,
    }
    rows = {(c["a"], c["b"]): c for c in paired_comparisons(scores, seed=0, extra=extra)}
    assert rows[("ablation_no_null", "realm")]["diff"] == -37.5
    assert ("ablation_no_null", "realm") not in {(c["a"], c["b"]) for c in paired_comparisons(scores, seed=0)}


def test_cloze_benchmark_takes_the_named_articles_blocks_as_gold(tmp_path) -> None:
    import json

    from realm_core.benchmarks import cloze, gold_sets

    blocks = [
        {"id": 0, "title": "Paris", "text": "Paris is on the Seine."},
        {"id": 1, "title": "Rome", "text": "Rome has seven hills."},
        {"id": 2, "title": "Paris", "text": "The Louvre is in Paris."},
        {"id": 3, "title": "Mercury (planet)", "text": "It is small."},
    ]
    (tmp_path / "blocks.jsonl").write_text("".join(json.dumps(b) + "\n" for b in blocks))
    (tmp_path / "qa.jsonl").write_text(
        json.dumps({"question": "It is the capital of [MASK]. (Paris)", "answer": ["France"]})
        + "\n"
        + json.dumps({"question": "no title here [MASK].", "answer": ["x"]})
        + "\n"
        + json.dumps({"question": "It orbits the [MASK]. (Mercury (planet))", "answer": ["Sun"]})
        + "\n"
    )
    bench = cloze(tmp_path / "blocks.jsonl", tmp_path / "qa.jsonl")
    assert bench.name == "cloze" and [p.id for p in bench.passages] == ["0", "1", "2", "3"]
    assert gold_sets(bench) == [{0, 2}, set(), {3}]


def test_closed_book_answer_slots_go_where_a_cloze_question_masks_its_answer(tiny_models) -> None:
    tokenizer = load_tokenizer(tiny_models.backbone)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    before, after = slot_context(tokenizer, "Paris is the capital of [MASK]. (Paris)", 32)
    assert (before, after) == (encode("Paris is the capital of"), encode(". (Paris)"))
    assert slot_context(tokenizer, "who wrote hamlet?", 32) == (encode("who wrote hamlet?"), [])
    before, after = slot_context(tokenizer, "a b c [MASK] d e f g", 5)  # the budget cuts the far end of `after` first
    assert before == encode("a b c") and after == encode("d e") and len(before) + len(after) == 5


def test_any_question_file_is_scored_over_the_pipelines_blocks_with_linked_gold(tmp_path) -> None:
    import json

    from realm_core.benchmarks import BlockCorpus, answer_sets, gold_sets, question_file
    from realm_core.io import InputError

    blocks = [
        {"id": 0, "passage_id": "p-paris", "title": "Paris", "text": "Paris is on the Seine."},
        {"id": 1, "passage_id": "p-rome", "title": "Rome", "text": "Rome has seven hills."},
        {"id": 2, "passage_id": "p-paris", "title": "Paris", "text": "The Louvre is in Paris."},
    ]
    (tmp_path / "blocks.jsonl").write_text("".join(json.dumps(b) + "\n" for b in blocks))
    corpus = BlockCorpus.load(tmp_path / "blocks.jsonl")
    rows = [
        {"question": "where is the louvre?", "answers": ["Paris"], "linked_passage_ids": ["p-paris"]},
        {"question": "how many hills has rome?", "answers": ["seven"], "linked_passage_ids": ["vital-7"]},
        {"question": "unlinked: a river?", "answers": ["Seine"]},
    ]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = question_file(tmp_path / "mine.jsonl", corpus, aliases={"vital-7": "Rome"})
    assert bench.name == "mine" and bench.passages is corpus.passages
    assert gold_sets(bench) == [{0, 2}, {1}, set()]
    assert answer_sets(bench)[2] == {0}
    with pytest.raises(InputError, match="mine.jsonl.*not in the corpus"):
        question_file(tmp_path / "mine.jsonl", corpus)  # vital-7 means nothing without the alias


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(
    not (SHARED / "wiki_vital_summaries" / "vital_passages.jsonl").is_file(), reason="needs ../shared/data"
)
def test_vital_linked_questions_move_onto_the_pipelines_blocks_only_when_they_hold_every_linked_article() -> None:
    from realm_core.benchmarks import BlockCorpus, Passage, vital_linked_blocks, vital_titles

    titles = sorted(set(vital_titles(SHARED).values()))
    full = BlockCorpus([Passage(str(i), t, f"text of {t}") for i, t in enumerate(titles)], {t: t for t in titles})
    bench = vital_linked_blocks(SHARED, full)
    assert bench is not None and bench.passages is full.passages and len(bench.questions) == 696
    assert all(q.gold_ids for q in bench.questions) and set(bench.sources) == {"nq", "wq", "trec", "squad"}
    assert all(q.regex == (tag == "trec") for q, tag in zip(bench.questions, bench.sources))
    linked = {full.passages[int(g)].title for q in bench.questions for g in q.gold_ids}
    without_one = BlockCorpus(
        [p for p in full.passages if p.title != min(linked)], {t: t for t in titles if t != min(linked)}
    )
    assert vital_linked_blocks(SHARED, without_one) is None
