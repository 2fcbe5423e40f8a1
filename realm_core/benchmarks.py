"""Open-QA benchmarks over real public data: SQuAD v1.1, Pyserini corpora, and the two benchmarks
of `bench/quality.py` (each passage is one retrieval unit; relevance by gold id or by answer).

    cloze         the pipeline's held-out cloze questions over its own blocks (gold: the blocks of
                  the article the question names)
    SQuAD-open    the 2,067 SQuAD v1.1 dev paragraphs as the corpus, its 10,570 questions
                  (Chen et al. 2017's setting, as ORQA Table 4 over the dev paragraphs only);
                  the gold passage of a question is the paragraph it was written on.
    vital-linked  questions of NQ-open dev, WebQuestions test, CuratedTREC test and SQuAD dev
                  linked to a vital-article passage that holds their answer, over the pipeline's
                  own blocks when they hold every linked article (the full corpus), else over
                  the linked passages plus a seeded random sample of other vital passages.
    question files  any question file over the pipeline's blocks (question_file): linked ids
                  give gold blocks, every question gets answer recall and EM.

Relevance is measured two ways, both as recall@k (metrics.recall_at_k):
- "gold": a retrieved passage is one of the question's gold / linked passages;
- "answer": a retrieved passage contains an answer by DPR's token rule (metrics.has_answer), or
  for CuratedTREC's regex answers by DPR's regex rule (metrics.has_answer_regex), over the
  passage text without its title, as DPR's validation does.

Inputs follow the shared data's formats (../shared/data/SOURCES.md); every malformed input
raises InputError naming the file (and line, or JSON path) and the fix.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from realm_core import metrics
from realm_core.corpus import Passage, read_jsonl_corpus
from realm_core.io import InputError, read_jsonl
from realm_core.questions import QAExample, read_questions, read_squad

# ../shared/data layout (SOURCES.md): file -> (dataset tag, answers are regexes)
SQUAD_ZIP = "squad_open/dev-v1.1.json.zip"
VITAL_PASSAGES = "wiki_vital_summaries/vital_passages.jsonl"
VITAL_LINKED = {
    "nq": ("wiki_vital_summaries/linked_qa/vital_linked_nq_open_dev.jsonl", False),
    "wq": ("wiki_vital_summaries/linked_qa/vital_linked_wq_test.jsonl", False),
    "trec": ("wiki_vital_summaries/linked_qa/vital_linked_trec_test.jsonl", True),
    "squad": ("wiki_vital_summaries/linked_qa/vital_linked_squad_dev.jsonl", False),
}


@dataclass
class Benchmark:
    """A corpus of passages (each one retrieval unit) and questions; `sources[i]` tags question i."""

    name: str
    passages: list[Passage]
    questions: list[QAExample]
    sources: list[str]


# ============================================================================ readers


def read_pyserini_corpus(path: str | Path) -> list[Passage]:
    """Pyserini JsonCollection lines {"id", "contents"}, contents = 'Title\\ntext' with the title
    sometimes in double quotes (DPR passages as FlashRAG ships them; FlashRAG splits the same way).
    A contents without a line break gets an empty title."""
    path = Path(path)
    passages: list[Passage] = []
    seen: dict[str, int] = {}
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        pid, contents = row.get("id"), row.get("contents")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)) or not str(pid).strip():
            raise InputError(
                f'{where}: missing or bad "id" ({pid!r:.40}); every line must be {{"id": str, "contents": str}}'
            )
        if not isinstance(contents, str) or not contents.strip():
            raise InputError(
                f'{where}: "contents" must be a non-empty string; every line must be {{"id": str, "contents": str}}'
            )
        if str(pid) in seen:
            raise InputError(
                f"{where}: duplicate passage id {str(pid)!r} (first seen on line {seen[str(pid)]}); ids must be unique"
            )
        seen[str(pid)] = lineno
        first, newline, rest = contents.partition("\n")
        title, text = (first.strip().strip('"'), rest) if newline and rest.strip() else ("", contents)
        passages.append(Passage(str(pid), title.strip(), text.strip()))
    if not passages:
        raise InputError(f'{path}:1: no passages (empty file); expected lines {{"id": str, "contents": str}}')
    return passages


# ============================================================================ training questions

SQUAD_SPLIT_SEED = 0  # the article split is fixed: it must never move with a run's seed
# Real training splits (../shared/data): none of them is an evaluation set of bench/quality.py.
# DPR's NQ "dev" is carved from NQ *train* (NQ-open dev, the papers' NQ test, stays out);
# CuratedTREC's train answers are regexes, which cannot locate a training span, so it stays out.
TRAINING_FILES = ("nq_open/dpr_nq_dev.jsonl", "webquestions/drqa_WebQuestions-train.txt")
EVALUATION_FILES = (
    *(name for name, _ in VITAL_LINKED.values()),
    "nq_open/NQ-open.dev.jsonl",
    "webquestions/dpr_wq_test.jsonl",
    "curatedtrec/dpr_curated_test.jsonl",
)


def squad_article(question: QAExample) -> str:
    """The SQuAD article of a question: its gold paragraph id `squad-dev-AA-PPP` without the paragraph."""
    if not question.gold_ids:
        raise InputError(f"SQuAD question {question.question!r} has no gold paragraph id; read it with read_squad")
    return question.gold_ids[0].rsplit("-", 1)[0]


def squad_article_half(questions: Sequence[QAExample], half: str) -> list[QAExample]:
    """SQuAD questions split *by article* into two fixed halves ("train" or "test"): a question's
    paragraph and its article's other paragraphs are on one side only, so a reader trained on one
    half is scored on text it never saw questions about (never split SQuAD by row)."""
    if half not in ("train", "test"):
        raise ValueError(f"half must be 'train' or 'test', got {half!r}")
    articles = sorted({squad_article(q) for q in questions})
    random.Random(SQUAD_SPLIT_SEED).shuffle(articles)
    test = set(articles[: len(articles) // 2])
    return [q for q in questions if (squad_article(q) in test) == (half == "test")]


def _question_key(text: str) -> str:
    return " ".join(text.lower().split()).rstrip("?").strip()


def training_questions(data_dir: Path) -> tuple[list[QAExample], dict[str, int]]:
    """Real training questions for fine-tuning (`corpus.qa_train_extra`): TRAINING_FILES plus the
    SQuAD dev train half, minus any question whose text is in an evaluation set (the vital-linked
    sets draw on SQuAD dev too); with the count from each source."""
    data_dir = Path(data_dir)
    held = {
        _question_key(q.question) for name in EVALUATION_FILES for q in read_questions(data_dir / name)
    }  # only their texts matter
    _, squad = read_squad(data_dir / SQUAD_ZIP)
    held |= {_question_key(q.question) for q in squad_article_half(squad, "test")}
    sources = {name: read_questions(data_dir / name) for name in TRAINING_FILES}
    sources["squad_open/dev-v1.1.json.zip (train half of the articles)"] = squad_article_half(squad, "train")
    out, counts = [], {}
    for name, questions in sources.items():
        kept = [q for q in questions if _question_key(q.question) not in held]
        counts[name] = len(kept)
        counts[f"{name} (dropped: also an evaluation question)"] = len(questions) - len(kept)
        out += kept
    return out, counts


# ============================================================================ benchmarks


def with_distractors(passages: Sequence[Passage], keep: set[str], total: int, seed: int) -> list[Passage]:
    """Every passage whose id is in `keep`, plus a seeded random sample of the others up to `total`
    (more if `keep` alone is larger), in corpus order."""
    unknown = keep - {p.id for p in passages}
    if unknown:
        raise InputError(
            f"gold passage ids not in the corpus: {sorted(unknown)[:5]}; the question and passage files do not belong together"
        )
    others = [i for i, p in enumerate(passages) if p.id not in keep]
    picked = set(random.Random(seed).sample(others, max(0, min(len(others), total - len(keep)))))
    return [p for i, p in enumerate(passages) if p.id in keep or i in picked]


@dataclass
class BlockCorpus:
    """The pipeline's own blocks (data/corpus/blocks.jsonl), one passage each (id = the block id):
    the corpus its models were trained on. The benchmarks over it share this `passages` list, so
    a bench embeds the blocks once for all of them."""

    passages: list[Passage]
    article_of: dict[str, str]  # source passage id (a block's "passage_id") -> its article title

    @classmethod
    def load(cls, blocks: Path) -> "BlockCorpus":
        rows = [row for _, row in read_jsonl(blocks)]
        return cls(
            [Passage(str(row["id"]), row["title"], row["text"]) for row in rows],
            {str(row.get("passage_id", row["title"])): row["title"] for row in rows},
        )

    def benchmark(
        self, name: str, questions: Sequence[QAExample], sources: list[str], articles: Sequence[Sequence[str]]
    ) -> Benchmark:
        """`questions` over these blocks; the gold passages of question i: every block of `articles[i]`."""
        by_title: dict[str, list[str]] = {}
        for p in self.passages:
            by_title.setdefault(p.title, []).append(p.id)
        out = [
            QAExample(q.question, q.answers, q.regex, tuple(b for t in titles for b in by_title.get(t, ())), q.id)
            for q, titles in zip(questions, articles)
        ]
        return Benchmark(name, self.passages, out, sources)


def cloze(blocks: "Path | BlockCorpus", questions: Path, max_questions: int | None = None, seed: int = 0) -> Benchmark:
    """The pipeline's held-out cloze questions (data/corpus/qa_dev.jsonl: sentences removed from the
    corpus before any training) over its own blocks (data/corpus/blocks.jsonl). A question names
    its article in its trailing "(title)"; the gold passages are that article's blocks."""
    corpus = blocks if isinstance(blocks, BlockCorpus) else BlockCorpus.load(blocks)
    titles = set(corpus.article_of.values())
    loaded = read_questions(questions)
    if max_questions is not None and max_questions < len(loaded):
        loaded = random.Random(seed).sample(loaded, max_questions)
    articles = []
    for q in loaded:
        # the trailing "(title)"; a title may hold parentheses itself ("Mercury (planet)")
        opens = [i for i, c in enumerate(q.question) if c == "("] if q.question.endswith(")") else []
        articles.append(
            [next((q.question[i + 1 : -1] for i in reversed(opens) if q.question[i + 1 : -1] in titles), "")]
        )
    return corpus.benchmark("cloze", loaded, ["cloze"] * len(loaded), articles)


def vital_titles(data_dir: Path) -> dict[str, str]:
    """vital passage id ("vital-00042", the ids of the linked questions) -> article title; the
    vital corpus the pipeline embeds holds the same 10,033 articles under these titles."""
    return {p.id: p.title for p in read_jsonl_corpus(Path(data_dir) / VITAL_PASSAGES)}


def question_file(
    path: Path,
    corpus: BlockCorpus,
    *,
    regex: bool = False,
    aliases: dict[str, str] | None = None,
    name: str | None = None,
    sources: list[str] | None = None,
) -> Benchmark:
    """Any question file (questions.read_questions' formats) over the pipeline's blocks. A linked
    question's gold passages are the blocks of the articles its `linked_passage_ids` (or
    `gold_passage_id`) name: ids of the corpus's own passages, or ids `aliases` maps to a title
    (vital_titles). Unlinked questions have no gold passages: only answer recall and EM score them."""
    path = Path(path)
    loaded = read_questions(path, regex=regex)
    known = {**(aliases or {}), **corpus.article_of}
    articles = []
    for q in loaded:
        unknown = [g for g in q.gold_ids if g not in known]
        if unknown:
            raise InputError(
                f"{path}: question {q.question!r:.60} links passage ids {unknown[:3]} that are not in the corpus "
                f"(data/corpus/blocks.jsonl passage_id); link the corpus's own passage ids"
            )
        articles.append([known[g] for g in q.gold_ids])
    return corpus.benchmark(name or path.stem, loaded, sources or [path.stem] * len(loaded), articles)


def vital_linked_blocks(
    data_dir: Path, corpus: BlockCorpus, max_questions: int | None = None, seed: int = 0
) -> Benchmark | None:
    """The vital-linked questions over the pipeline's own blocks, when they hold every linked article
    (the full vital corpus does; a sample does not: None, and vital_linked's own corpus serves)."""
    data_dir = Path(data_dir)
    aliases = vital_titles(data_dir)
    parts = [
        question_file(data_dir / name, corpus, regex=regex, aliases=aliases) for name, regex in VITAL_LINKED.values()
    ]
    questions = [q for part in parts for q in part.questions]
    sources = [tag for tag, part in zip(VITAL_LINKED, parts) for _ in part.questions]
    if any(not q.gold_ids for q in questions):
        return None
    if max_questions is not None and max_questions < len(questions):
        keep = sorted(random.Random(seed).sample(range(len(questions)), max_questions))
        questions, sources = [questions[i] for i in keep], [sources[i] for i in keep]
    return Benchmark("vital_linked", corpus.passages, questions, sources)


def squad_open(
    data_dir: Path,
    max_questions: int | None = None,
    max_passages: int | None = None,
    seed: int = 0,
    half: str | None = None,
) -> Benchmark:
    """SQuAD-open from the original SQuAD v1.1 dev release; optionally only one `half` of its
    articles (squad_article_half: "test" when the reader trained on the other), and a seeded subset
    of the questions over their gold paragraphs plus random others up to `max_passages` (quick runs).
    The corpus is every paragraph either way."""
    passages, questions = read_squad(Path(data_dir) / SQUAD_ZIP)
    if half is not None:
        questions = squad_article_half(questions, half)
    if max_questions is not None and max_questions < len(questions):
        questions = random.Random(seed).sample(questions, max_questions)
    if max_passages is not None:
        passages = with_distractors(passages, {g for q in questions for g in q.gold_ids}, max_passages, seed)
    return Benchmark("squad_open", passages, questions, ["squad"] * len(questions))


def vital_linked(
    data_dir: Path, total_passages: int = 2000, seed: int = 0, max_questions: int | None = None
) -> Benchmark:
    """The vital-linked questions (NQ, WQ, CuratedTREC as regexes, SQuAD) over their linked
    passages plus a seeded random sample of other vital passages, `total_passages` in all."""
    data_dir = Path(data_dir)
    questions: list[QAExample] = []
    sources: list[str] = []
    for tag, (name, regex) in VITAL_LINKED.items():
        loaded = read_questions(data_dir / name, regex=regex)
        questions += loaded
        sources += [tag] * len(loaded)
    if max_questions is not None and max_questions < len(questions):
        keep = sorted(random.Random(seed).sample(range(len(questions)), max_questions))
        questions, sources = [questions[i] for i in keep], [sources[i] for i in keep]
    for q, tag in zip(questions, sources):
        if not q.gold_ids:
            raise InputError(
                f"{data_dir / VITAL_LINKED[tag][0]}: question {q.question!r} has no linked_passage_ids; every linked question needs them"
            )
    corpus = read_jsonl_corpus(data_dir / VITAL_PASSAGES)
    passages = with_distractors(corpus, {g for q in questions for g in q.gold_ids}, total_passages, seed)
    return Benchmark("vital_linked", passages, questions, sources)


# ============================================================================ relevance


def gold_sets(bench: Benchmark) -> list[set[int]]:
    """Per question, the positions (in bench.passages) of its gold passages."""
    position = {p.id: i for i, p in enumerate(bench.passages)}
    return [{position[g] for g in q.gold_ids if g in position} for q in bench.questions]


def answer_sets(bench: Benchmark) -> list[set[int]]:
    """Per question, the positions of the passages whose text holds an answer (module docstring)."""
    return metrics.answer_sets(
        [p.text for p in bench.passages], [q.answers for q in bench.questions], [q.regex for q in bench.questions]
    )
