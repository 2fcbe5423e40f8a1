"""Questions for the default demo, derived offline from the corpus (cloze), or read from files.

A seeded share of the sentences holding a salient span is *removed* from the corpus and turned
into a cloze question "sentence with one span replaced by [MASK] (title)", answer = the span,
kept only if the answer still occurs in a remaining block. Held-out sentences never appear in any
block, so pre-training (REALM section 3.4, salient span masking) cannot memorise them. Given
question files (`corpus.qa_train` / `corpus.qa_dev`) those are used instead.

Question files in the standard open-QA formats (`read_questions` picks the reader by suffix):

    .jsonl      NQ-open / DrQA / DPR JSON lines {"question": str, "answer": [str, ...]}; the answer
                key may also be "answers" (DPR, SQuAD-derived) or "golden_answers" (FlashRAG);
                optional "gold_passage_id" / "linked_passage_ids" and "id"
    .tsv .csv   DPR `*.qa.csv` / anserini topics: question<TAB>["a", "b"] (a JSON or Python list)
    .txt        DrQA datasets are JSON lines, anserini topics are TSV: sniffed from the first line
    .json .zip  SQuAD v1.1 (read_squad, below): its questions

CuratedTREC answers are regular expressions (`regex=True`): each must compile, and scoring uses
metrics.regex_match / metrics.has_answer_regex instead of exact match / has_answer. Every
malformed row raises InputError naming file:line and the fix.
"""

from __future__ import annotations

import ast
import csv
import json
import random
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from realm_core.corpus import Passage, join_pieces, resolve_input
from realm_core.io import InputError, decode_line, read_jsonl
from realm_core.metrics import AnswerIndex, has_answer

MASK = "[MASK]"


def _rebuild(block: dict[str, Any], drop: set[int]) -> dict[str, Any] | None:
    """The block without the sentences at indices `drop` (offsets recomputed); None if nothing is left."""
    text, pieces, prev = block["text"], [], None
    for j, (s, e) in enumerate(block["sentences"]):
        if j in drop:
            continue
        sep = text[block["sentences"][j - 1][1] : s] if prev == j - 1 else " "
        pieces.append((sep, text[s:e], [(a - s, b - s, lab) for a, b, lab in block["spans"] if s <= a and b <= e]))
        prev = j
    if not pieces:
        return None
    new_text, sentences, spans = join_pieces(pieces)
    return {**block, "text": new_text, "sentences": sentences, "spans": spans}


def _cloze_options(block: dict[str, Any], j: int, max_question_words: int) -> list[tuple[str, str]]:
    """(question, answer) for each usable span of sentence j: the answer must not show in the
    question (elsewhere in the sentence or in the title) and the question must stay short."""
    text, title = block["text"], block["title"]
    s, e = block["sentences"][j]
    options = []
    for a, b, _ in block["spans"]:
        if not (s <= a and b <= e):
            continue
        answer = text[a:b]
        masked = f"{text[s:a]}{MASK}{text[b:e]}"
        question = f"{masked} ({title})" if title else masked
        if len(question.split()) > max_question_words or has_answer(question, [answer]):
            continue
        options.append((question, answer))
    return options


def make_cloze_questions(
    blocks: Sequence[dict[str, Any]],
    qa_fraction: float,
    qa_dev_fraction: float,
    seed: int,
    max_question_words: int = 32,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    """Hold out a seeded `qa_fraction` of the sentences with a usable salient span as cloze questions.

    Question = the sentence with one (seeded) span replaced by [MASK], then " (title)" so pronoun
    subjects stay answerable; answer = [span text]. The sentence is removed from its block (empty
    blocks dropped), and a question is kept only if its answer still occurs in some remaining
    block (DPR has_answer). Sentences occurring more than once in the corpus are never held out.
    Returns (remaining blocks, train questions, dev questions, stats); blocks keep their order.
    """
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    for block in blocks:
        for s, e in block["sentences"]:
            counts[block["text"][s:e]] = counts.get(block["text"][s:e], 0) + 1
    candidates = [
        (i, j)
        for i, block in enumerate(blocks)
        for j, (s, e) in enumerate(block["sentences"])
        if counts[block["text"][s:e]] == 1 and _cloze_options(block, j, max_question_words)
    ]
    picked = sorted(rng.sample(candidates, round(qa_fraction * len(candidates))))
    drop: dict[int, set[int]] = {}
    drafts = []
    for i, j in picked:
        question, answer = rng.choice(_cloze_options(blocks[i], j, max_question_words))
        drafts.append((question, answer))
        drop.setdefault(i, set()).add(j)
    remaining = [r for i, b in enumerate(blocks) if (r := _rebuild(b, drop.get(i, set()))) is not None]
    index = AnswerIndex([b["text"] for b in remaining])
    questions, seen, unanswerable = [], set(), 0
    for question, answer in drafts:
        if question in seen:
            continue
        seen.add(question)
        if not index.found(answer):
            unanswerable += 1
            continue
        questions.append({"question": question, "answer": [answer]})
    order = list(range(len(questions)))
    rng.shuffle(order)
    n_dev = round(qa_dev_fraction * len(questions))
    if len(questions) >= 2:
        n_dev = min(max(n_dev, 1), len(questions) - 1)
    dev_ids = set(order[:n_dev])
    train = [q for k, q in enumerate(questions) if k not in dev_ids]
    dev = [q for k, q in enumerate(questions) if k in dev_ids]
    stats = {
        "qa_candidates": len(candidates),
        "qa_held_out_sentences": len(picked),
        "qa_unanswerable": unanswerable,
        "qa_blocks_dropped": len(blocks) - len(remaining),
        "qa_train": len(train),
        "qa_dev": len(dev),
    }
    return remaining, train, dev, stats


def load_qa_files(
    qa_train: str, qa_dev: str, root: Path | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The question files given in params (any format `read_questions` reads), as NQ-open rows."""
    out = []
    for name, value in (("qa_train", qa_train), ("qa_dev", qa_dev)):
        path = resolve_input(value, root)
        if not path.is_file():
            raise InputError(f"{path}: corpus.{name} file not found; give an NQ-open style JSONL path or null")
        out.append([{"question": q.question, "answer": list(q.answers)} for q in read_questions(path)])
    return out[0], out[1]


def load_extra_questions(files: list[str], root: Path | None = None) -> list[dict[str, Any]]:
    """`corpus.qa_train_extra`: every file's questions as NQ-open rows, in order."""
    out = []
    for value in files:
        path = resolve_input(value, root)
        if not path.is_file():
            raise InputError(
                f"{path}: corpus.qa_train_extra file not found; give question files (.jsonl, .tsv/.csv, .txt, SQuAD .json/.zip) or []"
            )
        out += [{"question": q.question, "answer": list(q.answers)} for q in read_questions(path)]
    return out


# ============================================================================ question files


@dataclass(frozen=True)
class QAExample:
    """One open-QA question with its reference answers (strings, or regexes when `regex`) and,
    when the file gives them, the ids of its gold passages (SQuAD's paragraph, vital links)."""

    question: str
    answers: tuple[str, ...]
    regex: bool = False
    gold_ids: tuple[str, ...] = ()
    id: str = ""


ANSWER_KEYS = ("answer", "answers", "golden_answers")  # NQ-open/DrQA, DPR/SQuAD-derived, FlashRAG
QA_FORMATS = ".jsonl (NQ-open JSON lines), .tsv/.csv (DPR question<TAB>[answers]), .txt (DrQA JSON lines or anserini TSV), .json/.zip (SQuAD v1.1)"


def check_answers(value: Any, where: str, key: str, regex: bool) -> tuple[str, ...]:
    """A non-empty list of non-empty strings (each a valid regex when `regex`); `where` is file:line."""
    if isinstance(value, str):
        raise InputError(f"{where}: {key!r} must be a list of strings, got a single string; wrap it as [{value!r}]")
    if not isinstance(value, list) or not value:
        raise InputError(
            f"{where}: {key!r} must be a non-empty list of answer strings, got {value!r:.80}; give at least one answer"
        )
    for answer in value:
        if not isinstance(answer, str) or not answer.strip():
            raise InputError(f"{where}: {key!r} holds {answer!r:.80}; every answer must be a non-empty string")
        if regex:
            try:
                re.compile(answer)
            except re.error as exc:
                raise InputError(
                    f"{where}: answer regex {answer!r} does not compile ({exc}); CuratedTREC answers are regular expressions, escape special characters"
                ) from None
    return tuple(value)


def _check_question(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: 'question' must be a non-empty string, got {value!r:.80}")
    return value.strip()


def _gold_ids(row: dict[str, Any], where: str) -> tuple[str, ...]:
    """`gold_passage_id` (one id) or `linked_passage_ids` (a list); both optional."""
    if "gold_passage_id" in row:
        gold = row["gold_passage_id"]
        if not isinstance(gold, (str, int)) or isinstance(gold, bool) or not str(gold).strip():
            raise InputError(f"{where}: 'gold_passage_id' must be a passage id (string or integer), got {gold!r:.80}")
        return (str(gold),)
    linked = row.get("linked_passage_ids", [])
    if not isinstance(linked, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in linked):
        raise InputError(f"{where}: 'linked_passage_ids' must be a list of passage ids, got {linked!r:.80}")
    return tuple(str(x) for x in linked)


def read_qa_jsonl(path: str | Path, *, regex: bool = False) -> list[QAExample]:
    """NQ-open / DrQA / DPR JSON lines: {"question": str, "answer": [str, ...]} (see module docstring)."""
    path = Path(path)
    out = []
    for lineno, row in read_jsonl(path):  # InputError on missing file, bad UTF-8 or JSON, naming file:line
        where = f"{path}:{lineno}"
        question = _check_question(row.get("question"), where)
        keys = [k for k in ANSWER_KEYS if k in row]
        if len(keys) != 1:
            found = f"found {keys}" if keys else "found none"
            raise InputError(
                f'{where}: expected exactly one answer key of {list(ANSWER_KEYS)} ({found}); write lines {{"question": str, "answer": [str, ...]}}'
            )
        qid = row.get("id", "")
        out.append(
            QAExample(
                question, check_answers(row[keys[0]], where, keys[0], regex), regex, _gold_ids(row, where), str(qid)
            )
        )
    if not out:
        raise InputError(
            f'{path}:1: no questions (empty file); expected lines {{"question": str, "answer": [str, ...]}}'
        )
    return out


def read_qa_tsv(path: str | Path, *, regex: bool = False) -> list[QAExample]:
    """DPR `*.qa.csv` / anserini topics: question<TAB>answers, answers a JSON or Python list literal.

    Parsed with csv (tab-delimited, DPR quotes some fields) and `ast.literal_eval` (literals only,
    never code); a header row `question<TAB>answers` is skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    out: list[QAExample] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_line(raw, path, lineno).rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            cols = next(csv.reader([line], delimiter="\t"))
            if not out and [c.strip().lower() for c in cols] in (["question", "answers"], ["question", "answer"]):
                continue
            if len(cols) != 2:
                hint = (
                    "no tab found"
                    if len(cols) == 1
                    else "a tab inside the question? replace it by a space or quote the field"
                )
                raise InputError(
                    f"{where}: expected 2 tab-separated columns question<TAB>[answers], found {len(cols)} ({hint})"
                )
            try:
                answers = ast.literal_eval(cols[1].strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise InputError(
                    f"{where}: answers column {cols[1]!r:.80} is not a list literal; write it as [\"a\", \"b\"] or ['a', 'b']"
                ) from None
            out.append(
                QAExample(_check_question(cols[0], where), check_answers(answers, where, "answers", regex), regex)
            )
    if not out:
        raise InputError(f"{path}:1: no questions (empty file or header only); expected rows question<TAB>[answers]")
    return out


def _looks_like_json_lines(path: Path) -> bool:
    """DrQA's .txt files are JSON lines, anserini's topic .txt files are TSV: look at the first line."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                return raw.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{")  # after a UTF-8 byte order mark
    return True


def _squad_json(path: Path) -> Any:
    """The parsed JSON of a SQuAD file, or of the single .json inside a .zip (the original release)."""
    try:
        if path.suffix.lower() == ".zip":
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith(".json")]
                if len(names) != 1:
                    raise InputError(f"{path}: expected exactly one .json file inside the zip, found {names}")
                raw = zf.read(names[0])
        else:
            raw = path.read_bytes()
        return json.loads(raw.decode("utf-8-sig"))  # a byte order mark is not JSON
    except zipfile.BadZipFile:
        raise InputError(f"{path}: not a valid zip file; re-download the SQuAD release") from None
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8"
        ) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def _expect(value: Any, kind: type, where: str, what: str) -> Any:
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise InputError(f"{where}: expected {what}, got {value!r:.80}; the file must follow the SQuAD v1.1 schema")
    return value


def read_squad(path: str | Path, id_prefix: str = "squad-dev") -> tuple[list[Passage], list[QAExample]]:
    """SQuAD v1.1 JSON (or its zip): paragraphs as passages, questions as QA with their paragraph as gold.

    Passage ids are `{id_prefix}-{article:02d}-{paragraph:03d}`, titles have "_" replaced by
    spaces (the ids and titles of ../shared/data/squad_open/squad_dev_paragraphs.jsonl). Each
    question's answers are its annotators' answer texts (duplicates kept, as the dev file has them).
    Errors name the file and the JSON path of the bad item (data[a].paragraphs[p].qas[q]).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    doc = _squad_json(path)
    articles = _expect(
        doc.get("data") if isinstance(doc, dict) else None, list, f"{path}", 'a top-level {"data": [...]} list'
    )
    passages: list[Passage] = []
    questions: list[QAExample] = []
    for a, article in enumerate(articles):
        where = f"{path}: data[{a}]"
        _expect(article, dict, where, "an article object")
        title = _expect(article.get("title"), str, f"{where}.title", "a title string").replace("_", " ").strip()
        for p, paragraph in enumerate(
            _expect(article.get("paragraphs"), list, f"{where}.paragraphs", "a list of paragraphs")
        ):
            pw = f"{where}.paragraphs[{p}]"
            _expect(paragraph, dict, pw, "a paragraph object")
            pid = f"{id_prefix}-{a:02d}-{p:03d}"
            passages.append(
                Passage(
                    pid, title, _expect(paragraph.get("context"), str, f"{pw}.context", "a non-empty context string")
                )
            )
            for q, qa in enumerate(_expect(paragraph.get("qas"), list, f"{pw}.qas", "a list of questions")):
                qw = f"{pw}.qas[{q}]"
                _expect(qa, dict, qw, "a question object")
                question = _expect(qa.get("question"), str, f"{qw}.question", "a non-empty question string").strip()
                raw = _expect(
                    qa.get("answers"),
                    list,
                    f"{qw}.answers",
                    "a list of answers (SQuAD 2.0 unanswerable questions are not supported)",
                )
                texts = [ans.get("text") if isinstance(ans, dict) else ans for ans in raw]
                answers = check_answers(texts, qw, "answers[].text", regex=False)
                questions.append(QAExample(question, answers, False, (pid,), str(qa.get("id", ""))))
    if not passages:
        raise InputError(f"{path}: no paragraphs; expected SQuAD v1.1 JSON with data[].paragraphs[]")
    return passages, questions


def read_questions(path: str | Path, *, regex: bool = False) -> list[QAExample]:
    """Read a question file in any of the standard open-QA formats, by suffix (module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if suffix == ".jsonl" or (suffix == ".txt" and _looks_like_json_lines(path)):
        return read_qa_jsonl(path, regex=regex)
    if suffix in (".tsv", ".csv", ".txt"):
        return read_qa_tsv(path, regex=regex)
    if suffix in (".json", ".zip"):
        return read_squad(path)[1]
    raise InputError(f"{path}: unknown question file type {suffix!r}; accepted: {QA_FORMATS}")
