"""Readers of the standard open-QA formats: good rows parse, every malformed row is an InputError
naming file:line (or the JSON path) and the fix; the real files of ../shared/data parse with the
row counts their SOURCES.md gives (skipped when the folder is absent)."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import pytest

from realm_core.benchmarks import (
    Benchmark,
    answer_sets,
    gold_sets,
    read_pyserini_corpus,
    squad_open,
    vital_linked,
    with_distractors,
)
from realm_core.corpus import Passage, read_jsonl_corpus, read_tsv
from realm_core.io import InputError
from realm_core.metrics import has_answer, has_answer_regex
from realm_core.questions import QAExample, load_qa_files, read_qa_jsonl, read_qa_tsv, read_questions, read_squad

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


# ============================================================================ JSON lines (NQ-open, DrQA, DPR)


def test_jsonl_answer_keys_gold_ids_and_blank_lines(tmp_path: Path) -> None:
    rows = [
        '{"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]}',
        "",
        '{"question": "q2", "answers": ["a"], "gold_passage_id": "p7", "id": 12}',
        '{"question": "q3", "golden_answers": ["b"], "linked_passage_ids": ["v1", "v2"]}',
    ]
    got = read_qa_jsonl(_write(tmp_path, "nq.jsonl", "\n".join(rows) + "\n"))
    assert got == [
        QAExample("who wrote hamlet", ("Shakespeare", "William Shakespeare")),
        QAExample("q2", ("a",), gold_ids=("p7",), id="12"),
        QAExample("q3", ("b",), gold_ids=("v1", "v2")),
    ]


@pytest.mark.parametrize(
    ("content", "line", "words"),
    [
        ('{"question": "q", "answer": ["a"]}\n{not json}\n', 2, "not valid JSON"),
        ('["q", ["a"]]\n', 1, "JSON object"),
        ('{"answer": ["a"]}\n', 1, "'question' must be a non-empty string"),
        ('{"question": "  ", "answer": ["a"]}\n', 1, "'question' must be a non-empty string"),
        ('{"question": "q"}\n', 1, "exactly one answer key"),
        ('{"question": "q", "answer": ["a"], "answers": ["a"]}\n', 1, "exactly one answer key"),
        ('{"question": "q", "answer": "Paris"}\n', 1, "wrap it as ['Paris']"),
        ('{"question": "q", "answer": []}\n', 1, "non-empty list"),
        ('{"question": "q", "answer": ["a", 3]}\n', 1, "non-empty string"),
        ('{"question": "q", "answer": ["a", " "]}\n', 1, "non-empty string"),
        ('{"question": "q", "answer": ["a"], "gold_passage_id": ["p1"]}\n', 1, "gold_passage_id"),
        ('{"question": "q", "answer": ["a"], "linked_passage_ids": "v1"}\n', 1, "linked_passage_ids"),
        ("", 1, "no questions"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, content: str, line: int, words: str) -> None:
    path = _write(tmp_path, "bad.jsonl", content)
    with pytest.raises(InputError, match=rf"bad\.jsonl:{line}:") as err:
        read_qa_jsonl(path)
    assert words in str(err.value)


def test_jsonl_bad_utf8_and_missing_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "latin.jsonl", b'{"question": "q", "answer": ["a"]}\n{"question": "caf\xe9", "answer": ["a"]}\n'
    )
    with pytest.raises(InputError, match=r"latin\.jsonl:2: not valid UTF-8"):
        read_qa_jsonl(path)
    with pytest.raises(InputError, match="not found"):
        read_questions(tmp_path / "missing.jsonl")


def test_curatedtrec_regex_answers_are_validated_only_as_regexes(tmp_path: Path) -> None:
    good = _write(tmp_path, "trec.jsonl", '{"question": "How tall?", "answer": ["20\\\\s?,?320 f(ee|oo)t"]}\n')
    assert read_qa_jsonl(good, regex=True) == [QAExample("How tall?", (r"20\s?,?320 f(ee|oo)t",), regex=True)]
    bad = _write(
        tmp_path,
        "trec_bad.jsonl",
        '{"question": "q", "answer": ["ok"]}\n{"question": "q2", "answer": ["Sievert \\\\(Sv\\\\)\\\\"]}\n',
    )
    with pytest.raises(InputError, match=r"trec_bad\.jsonl:2: answer regex .*does not compile"):
        read_qa_jsonl(bad, regex=True)
    assert read_qa_jsonl(bad)[1].answers == ("Sievert \\(Sv\\)\\",)  # as plain strings it is fine


# ============================================================================ TSV (DPR .qa.csv, anserini topics)


def test_tsv_json_and_python_lists_quoting_and_header(tmp_path: Path) -> None:
    text = (
        "question\tanswers\n"
        'who sang it\t["Linda Davis", "Reba"]\n'
        "what is 30+1\t['31']\n"
        '"a ""quoted"" question"\t["x"]\n'
    )
    got = read_qa_tsv(_write(tmp_path, "nq.qa.csv", text))
    assert got == [
        QAExample("who sang it", ("Linda Davis", "Reba")),
        QAExample("what is 30+1", ("31",)),
        QAExample('a "quoted" question', ("x",)),
    ]


@pytest.mark.parametrize(
    ("content", "line", "words"),
    [
        ("q1\t['a']\nonly a question\n", 2, "no tab found"),
        ("q\twith\t['a']\n", 1, "found 3"),
        ("q\t[a b]\n", 1, "not a list literal"),
        ("q\t__import__('os')\n", 1, "not a list literal"),  # literal_eval never runs code
        ("q\t'Paris'\n", 1, "wrap it as ['Paris']"),
        ("q\t[1, 2]\n", 1, "non-empty string"),
        ("q\t[]\n", 1, "non-empty list"),
        ("\t['a']\n", 1, "'question' must be a non-empty string"),
        ("question\tanswers\n", 1, "no questions"),
    ],
)
def test_tsv_errors_name_file_and_line(tmp_path: Path, content: str, line: int, words: str) -> None:
    path = _write(tmp_path, "bad.tsv", content)
    with pytest.raises(InputError, match=rf"bad\.tsv:{line}:") as err:
        read_qa_tsv(path)
    assert words in str(err.value)


def test_read_questions_dispatch_and_txt_sniffing(tmp_path: Path) -> None:
    drqa = _write(tmp_path, "WebQuestions-test.txt", '{"question": "q", "answer": ["a"]}\n')
    anserini = _write(tmp_path, "topics.nq.dev.txt", "q\t['a']\n")
    assert read_questions(drqa) == read_questions(anserini) == [QAExample("q", ("a",))]
    with pytest.raises(InputError, match=r"unknown question file type '\.xml'; accepted: .*jsonl"):
        read_questions(_write(tmp_path, "q.xml", "<q/>"))


def test_load_qa_files_accepts_dpr_tsv(tmp_path: Path) -> None:
    tsv = _write(tmp_path, "dev.qa.csv", "who wrote hamlet\t['Shakespeare']\n")
    train, dev = load_qa_files(str(tsv), str(tsv))
    assert train == dev == [{"question": "who wrote hamlet", "answer": ["Shakespeare"]}]


# ============================================================================ SQuAD v1.1 JSON


def _squad(articles: list) -> str:
    return json.dumps({"version": "1.1", "data": articles})


SQUAD = [
    {
        "title": "Super_Bowl_50",
        "paragraphs": [
            {
                "context": "Denver beat Carolina.",
                "qas": [
                    {
                        "id": "q1",
                        "question": "Who won?",
                        "answers": [{"answer_start": 0, "text": "Denver"}, {"answer_start": 0, "text": "Denver"}],
                    }
                ],
            },
            {"context": "It was in Santa Clara.", "qas": []},
        ],
    },
    {
        "title": "Warsaw",
        "paragraphs": [
            {
                "context": "Warsaw is in Poland.",
                "qas": [
                    {"id": "q2", "question": "Where is Warsaw?", "answers": [{"answer_start": 13, "text": "Poland"}]}
                ],
            }
        ],
    },
]


def test_squad_paragraphs_are_passages_and_questions_point_at_them(tmp_path: Path) -> None:
    plain = _write(tmp_path, "dev.json", _squad(SQUAD))
    zipped = tmp_path / "dev.json.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("dev.json", _squad(SQUAD))
    for path in (plain, zipped):
        passages, questions = read_squad(path)
        assert passages == [
            Passage("squad-dev-00-000", "Super Bowl 50", "Denver beat Carolina."),
            Passage("squad-dev-00-001", "Super Bowl 50", "It was in Santa Clara."),
            Passage("squad-dev-01-000", "Warsaw", "Warsaw is in Poland."),
        ]
        assert questions == [
            QAExample("Who won?", ("Denver", "Denver"), gold_ids=("squad-dev-00-000",), id="q1"),
            QAExample("Where is Warsaw?", ("Poland",), gold_ids=("squad-dev-01-000",), id="q2"),
        ]
    assert read_questions(zipped) == questions


@pytest.mark.parametrize(
    ("articles", "where", "words"),
    [
        ([{"paragraphs": []}], r"\.title", "a title string"),
        ([{"title": "T", "paragraphs": [{"qas": []}]}], r"\.paragraphs\[0\]\.context", "context"),
        (
            [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": []}]}]}],
            r"paragraphs\[0\]\.qas\[0\]",
            "non-empty list",
        ),
        (
            [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"question": "q", "answers": [{"text": ""}]}]}]}],
            r"qas\[0\]",
            "non-empty string",
        ),
        (
            [{"title": "T", "paragraphs": [{"context": "c", "qas": [{"answers": [{"text": "a"}]}]}]}],
            r"qas\[0\]\.question",
            "question string",
        ),
    ],
)
def test_squad_errors_name_the_json_path(tmp_path: Path, articles: list, where: str, words: str) -> None:
    with pytest.raises(InputError, match=rf"bad\.json: data\[0\]\S*{where}") as err:
        read_squad(_write(tmp_path, "bad.json", _squad(articles)))
    assert words in str(err.value)


def test_squad_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"broken\.json:3: not valid JSON"):
        read_squad(_write(tmp_path, "broken.json", '{"data": [\n{"title": "T",\n  oops}\n]}'))
    with pytest.raises(InputError, match="top-level"):
        read_squad(_write(tmp_path, "list.json", "[]"))
    with pytest.raises(InputError, match="not a valid zip"):
        read_squad(_write(tmp_path, "fake.zip", "not a zip"))
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zf:
        zf.writestr("a.json", "{}")
        zf.writestr("b.json", "{}")
    with pytest.raises(InputError, match="exactly one .json"):
        read_squad(two)


# ============================================================================ Pyserini JsonCollection corpus


def test_pyserini_corpus_titles_and_errors(tmp_path: Path) -> None:
    good = _write(
        tmp_path,
        "c.jsonl",
        '{"id": "0", "contents": "\\"Evan Morris\\"\\nEvan Morris was a lobbyist."}\n'
        '{"id": 1, "contents": "no title line"}\n{"id": "2", "contents": "Absalon\\ndragged forth."}\n',
    )
    assert read_pyserini_corpus(good) == [
        Passage("0", "Evan Morris", "Evan Morris was a lobbyist."),
        Passage("1", "", "no title line"),
        Passage("2", "Absalon", "dragged forth."),
    ]
    for content, line, words in [
        ('{"id": "0"}\n', 1, '"contents" must be a non-empty string'),
        ('{"contents": "x"}\n', 1, 'missing or bad "id"'),
        ('{"id": "0", "contents": "x"}\n{"id": "0", "contents": "y"}\n', 2, "duplicate passage id '0'"),
    ]:
        with pytest.raises(InputError, match=rf"bad\.jsonl:{line}:") as err:
            read_pyserini_corpus(_write(tmp_path, "bad.jsonl", content))
        assert words in str(err.value)


# ============================================================================ benchmark assembly and relevance


def test_with_distractors_keeps_gold_is_seeded_and_checks_ids() -> None:
    passages = [Passage(f"p{i}", "", f"text {i}") for i in range(50)]
    picked = with_distractors(passages, {"p3", "p40"}, 10, seed=1)
    assert len(picked) == 10 and {"p3", "p40"} <= {p.id for p in picked}
    assert picked == sorted(picked, key=lambda p: int(p.id[1:]))  # corpus order
    assert (
        picked
        == with_distractors(passages, {"p3", "p40"}, 10, seed=1)
        != with_distractors(passages, {"p3", "p40"}, 10, seed=2)
    )
    with pytest.raises(InputError, match="not in the corpus"):
        with_distractors(passages, {"nope"}, 10, seed=1)


def test_relevance_sets_by_gold_and_by_answer() -> None:
    passages = [
        Passage("a", "Paris", "Paris is the capital of France."),
        Passage("b", "Art", "A smart move in 1,990."),
        Passage("c", "Everest", "Mount Everest is 8,849 m high."),
    ]
    questions = [
        QAExample("capital of France?", ("Paris",), gold_ids=("a",)),
        QAExample("art?", ("art",), gold_ids=("b",)),
        QAExample("how high?", (r"8,?849\s*m",), regex=True, gold_ids=("c",)),
        QAExample("nothing", ("Tokyo",)),
    ]
    bench = Benchmark("t", passages, questions, ["x"] * 4)
    assert gold_sets(bench) == [{0}, {1}, {2}, set()]
    assert answer_sets(bench) == [{0}, set(), {2}, set()]  # "art" is not a whole token of "smart"


# ============================================================================ the real files (../shared/data)

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")


@needs_data
@pytest.mark.parametrize(
    ("name", "rows", "regex"),
    [
        ("nq_open/NQ-open.dev.jsonl", 3610, False),
        ("nq_open/dpr_nq_dev.jsonl", 8757, False),
        ("nq_open/dpr_nq_dev.tsv", 8757, False),
        ("webquestions/dpr_wq_test.jsonl", 2032, False),
        ("webquestions/drqa_WebQuestions-train.txt", 3778, False),
        ("curatedtrec/dpr_curated_test.jsonl", 694, True),
        ("squad_open/dpr_squad_test.jsonl", 10570, False),
        ("squad_open/squad_dev_questions.jsonl", 10570, False),
        ("wiki_vital_summaries/linked_qa/vital_linked_nq_open_dev.jsonl", 142, False),
        ("wiki_vital_summaries/linked_qa/vital_linked_wq_test.jsonl", 212, False),
        ("wiki_vital_summaries/linked_qa/vital_linked_trec_test.jsonl", 98, True),
        ("wiki_vital_summaries/linked_qa/vital_linked_squad_dev.jsonl", 244, False),
        # SOURCES.md says 16 rows: wc -l counts 16 because the 17th line has no final newline.
        ("wiki_dpr_sample/flashrag_nq_test16.jsonl", 17, False),
    ],
)
def test_real_question_files_row_counts(name: str, rows: int, regex: bool) -> None:
    assert len(read_questions(DATA / name, regex=regex)) == rows


@needs_data
def test_real_dpr_tsv_equals_its_jsonl_conversion() -> None:
    tsv, jsonl = read_questions(DATA / "nq_open/dpr_nq_dev.tsv"), read_questions(DATA / "nq_open/dpr_nq_dev.jsonl")
    assert [(q.question, q.answers) for q in tsv] == [(q.question, q.answers) for q in jsonl]


@needs_data
def test_real_curatedtrec_train_has_one_invalid_regex() -> None:
    """DrQA's CuratedTrec-train.txt line 701 ends its pattern with a lone backslash; ORQA/DrQA score
    it as a silent miss, we stop and name it."""
    with pytest.raises(InputError, match=r"drqa_CuratedTrec-train\.txt:701: answer regex .*Sievert"):
        read_questions(DATA / "curatedtrec/drqa_CuratedTrec-train.txt", regex=True)


@needs_data
def test_real_squad_zip_equals_the_derived_jsonl_files() -> None:
    passages, questions = read_squad(DATA / "squad_open/dev-v1.1.json.zip")
    assert (len(passages), len(questions), len({p.title for p in passages})) == (2067, 10570, 48)
    derived = read_jsonl_corpus(DATA / "squad_open/squad_dev_paragraphs.jsonl")
    assert [(p.id, p.title, p.text.strip()) for p in passages] == [(p.id, p.title, p.text) for p in derived]
    rows = read_questions(DATA / "squad_open/squad_dev_questions.jsonl")
    assert [(q.id, q.question, q.answers, q.gold_ids) for q in questions] == [
        (q.id, q.question, q.answers, q.gold_ids) for q in rows
    ]
    dpr = read_questions(DATA / "squad_open/dpr_squad_test.jsonl")
    assert [(q.question, q.answers) for q in questions] == [(q.question, q.answers) for q in dpr]


@needs_data
def test_real_corpora_with_the_corpus_readers(tmp_path: Path) -> None:
    assert len(read_jsonl_corpus(DATA / "wiki_vital_summaries/vital_passages.jsonl")) == 10033
    sample = read_pyserini_corpus(DATA / "wiki_dpr_sample/flashrag_sample_data.jsonl")
    assert len(sample) == 1000 and all(p.title and p.text for p in sample)
    with (tmp_path / "passages.tsv").open("w", newline="", encoding="utf-8") as f:  # as DPR writes psgs_w100.tsv
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["id", "text", "title"])
        writer.writerows([p.id, p.text, p.title] for p in sample)
    assert read_tsv(tmp_path / "passages.tsv") == sample


@needs_data
def test_real_benchmarks_hold_their_gold_passages() -> None:
    squad = squad_open(DATA)
    assert (len(squad.passages), len(squad.questions)) == (2067, 10570)
    vital = vital_linked(DATA, total_passages=2000, seed=13)
    assert len(vital.passages) == 2000 and len(vital.questions) == 142 + 212 + 98 + 244
    assert {vital.sources.count(t) for t in ("nq", "wq", "trec", "squad")} == {142, 212, 98, 244}
    gold = gold_sets(vital)
    assert all(gold)  # every linked passage is in the corpus
    answers = answer_sets(vital)
    supported = sum(bool(g & a) for g, a in zip(gold, answers)) / len(gold)
    assert supported > 0.9  # SOURCES.md: the answer occurs in a linked passage (heuristic link)
    for q, a in list(zip(vital.questions, answers))[:60]:  # the inverted index equals brute force
        rule = has_answer_regex if q.regex else has_answer
        assert a == {i for i, p in enumerate(vital.passages) if rule(p.text, q.answers)}
