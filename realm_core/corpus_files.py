"""The corpus stage's files: blocks.jsonl, qa_train.jsonl, qa_dev.jsonl and stats.json.

The stage maps `realm_core.corpus.process_shard` over shards of the passages (flows/corpus.py);
`finish_corpus` then adds the questions (given files, else cloze questions from held-out
sentences, realm_core/questions.py), refuses a corpus the later stages cannot train on, numbers
the blocks 0..N-1 and writes the files. It sits above both corpus.py and questions.py, which
build on each other in that order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from realm_core.config import CorpusParams
from realm_core.corpus import (
    MIN_SENTENCE_WORDS,
    corpus_stats,
    number_blocks,
    process_shard,
    read_passages,
    resolve_input,
    shard,
)
from realm_core.io import InputError, write_json, write_jsonl
from realm_core.questions import load_extra_questions, load_qa_files, make_cloze_questions


def check_usable(
    blocks: Sequence[dict[str, Any]],
    train: Sequence[dict[str, Any]],
    dev: Sequence[dict[str, Any]],
    params: CorpusParams,
    root: Path | None = None,
) -> None:
    """Refuse, naming the input, a corpus the later stages cannot train on: the inverse cloze task
    needs two blocks of two or more sentences (realm_core.ict.ict_candidates: one sentence is the
    query, the rest its evidence), the encoder warm-up and salient span masking need salient spans
    (section 3.4), and fine-tuning and evaluation need a training and a dev question."""
    source = "corpus.source=vital" if params.source == "vital" else str(resolve_input(params.source, root))
    usable = sum(len(b["sentences"]) >= 2 for b in blocks)
    if usable < 2:
        raise InputError(
            f"{source}: {usable} of the {len(blocks)} blocks hold two or more sentences (of {MIN_SENTENCE_WORDS}+ words); the inverse cloze task "
            "(ict stage) needs at least 2 such blocks: give passages of several full sentences each"
        )
    if not any(b["spans"] for b in blocks):
        raise InputError(
            f"{source}: no sentence holds a salient span (a named entity or a date); the encoder warm-up and salient span masking "
            "need them: give passages of ordinary prose that name people, places or dates"
        )
    if params.qa_train is None and params.qa_fraction > 0 and not (train and dev):
        raise InputError(
            f"{source}: {len(train)} training and {len(dev)} dev cloze questions could be made; fine-tuning and evaluation need at least one "
            "of each: give more passages (corpus.max_passages), raise corpus.qa_fraction, or give question files (corpus.qa_train and corpus.qa_dev)"
        )


def finish_corpus(
    blocks: Sequence[dict[str, Any]],
    params: CorpusParams,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    out_dir: Path,
    n_passages: int,
    root: Path | None = None,
) -> dict[str, float]:
    """Questions (files from params, else cloze), dense ids, and the files of the stage:
    blocks.jsonl, qa_train.jsonl, qa_dev.jsonl, stats.json. Returns the numeric stats."""
    if (params.qa_train is None) != (params.qa_dev is None):
        raise InputError(
            "params.yaml corpus: give both qa_train and qa_dev (NQ-open JSONL paths) or neither (cloze questions from the corpus)"
        )
    if not blocks:
        raise InputError(f"corpus.source={params.source!r}: no blocks were produced; check the input passages")
    if params.qa_train is not None and params.qa_dev is not None:
        train, dev = load_qa_files(params.qa_train, params.qa_dev, root)
        qa_stats: dict[str, float] = {"qa_train": len(train), "qa_dev": len(dev)}
    else:
        blocks, train, dev, qa_stats = make_cloze_questions(blocks, params.qa_fraction, params.qa_dev_fraction, seed)
    if params.qa_train_extra:
        extra = load_extra_questions(params.qa_train_extra, root)
        train = [*train, *extra]
        qa_stats = {**qa_stats, "qa_train_extra": len(extra), "qa_train": len(train)}
    check_usable(blocks, train, dev, params, root)
    blocks = number_blocks(blocks)
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "blocks.jsonl", blocks)
    write_jsonl(out_dir / "qa_train.jsonl", train)
    write_jsonl(out_dir / "qa_dev.jsonl", dev)
    stats = {"passages": n_passages, **corpus_stats(blocks, tokenizer), **qa_stats}
    write_json(
        out_dir / "stats.json", {**stats, "source": params.source, "questions": "files" if params.qa_train else "cloze"}
    )
    return stats


def build_corpus(
    params: CorpusParams, tokenizer: PreTrainedTokenizerBase, seed: int, out_dir: Path, root: Path | None = None
) -> dict[str, float]:
    """The whole stage in one process (the flow maps `process_shard` over shards instead)."""
    passages = read_passages(params.source, params.max_passages, seed, root)
    blocks = [
        b for part in shard(passages, params.shards) for b in process_shard(part, tokenizer, params.max_block_tokens)
    ]
    return finish_corpus(blocks, params, tokenizer, seed, out_dir, len(passages), root)
