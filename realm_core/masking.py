"""Pre-training queries: one sentence with one span masked, and the blocks that bear its answer.

Salient span masking (REALM section 3.4): a named entity or date of the sentence, all of its
wordpieces replaced by [MASK] (no 80/10/10), at most `max_masks` of them. Random token and
random span masks are the Table 2 ablations.

`answer_bearing_blocks` finds, for each query, the other blocks whose body holds the masked
wordpieces as whole words. They are the evidence the encoder warm-up reads (reading.py), the
probe of the evidence gain, and the `query_filter: answer_elsewhere` rule: a query whose answer
is in no other block can only be learnt by heart, and gives the retriever no signal.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import torch

from realm_core.blocks import BlockStore, pad_batch


@dataclass
class MaskedQuery:
    """A pre-training query: one sentence of `block_id` with one salient span masked.

    `block_id` is the source block (never retrieved, section 3.4); -1 for a query that is no
    sentence of the corpus (the synthetic mechanics benchmark)."""

    block_id: int
    input_ids: list[int]  # [CLS] masked sentence [SEP]
    mask_positions: list[int]  # positions of the [MASK] tokens in input_ids
    targets: list[int]  # the original wordpieces there


MASKINGS = ("salient", "random_tokens", "random_spans")


def masked_query(store: BlockStore, block_id: int, sentence: list[int], masked: list[int]) -> MaskedQuery:
    """`[CLS] sentence [SEP]` with every wordpiece at `masked` (0-based in the sentence) -> [MASK]."""
    tok = store.tokenizer
    ids = [tok.cls_token_id, *sentence, tok.sep_token_id]
    targets = [ids[p + 1] for p in masked]
    for p in masked:
        ids[p + 1] = tok.mask_token_id
    return MaskedQuery(block_id, ids, [p + 1 for p in masked], targets)


def _sentences(store: BlockStore, max_query_tokens: int):
    """(block, sentence start/end chars, sentence wordpieces cut to the query length, their offsets)."""
    for block in store.blocks:
        for s_start, s_end in block.sentences:
            i, j = store.sentence_token_range(block.id, s_start, s_end)
            j = min(j, i + max_query_tokens - 2)
            if j > i:
                yield block, s_start, s_end, store.body_ids[block.id][i:j], store.body_offsets[block.id][i:j]


def salient_span_queries(store: BlockStore, max_query_tokens: int, max_masks: int) -> list[MaskedQuery]:
    """All (sentence, salient span) pairs as masked queries (section 3.4).

    Every wordpiece of the span becomes [MASK] (no 80/10/10); spans of more than `max_masks`
    wordpieces, and spans that the query length limit would cut, are skipped.
    """
    queries = []
    for block, s_start, s_end, sentence, offsets in _sentences(store, max_query_tokens):
        for a, b, _label in block.spans:
            if not (s_start <= a and b <= s_end):
                continue
            masked = [p for p, (oa, ob) in enumerate(offsets) if oa < b and ob > a]
            if not masked or len(masked) > max_masks or (b > offsets[-1][1]):  # none, too long, or cut off
                continue
            queries.append(masked_query(store, block.id, sentence, masked))
    return queries


def random_token_queries(
    store: BlockStore, max_query_tokens: int, max_masks: int, seed: int, prob: float = 0.15
) -> list[MaskedQuery]:
    """Ablation "random token masks" (REALM Table 2): 15% of a sentence's wordpieces (at least 1,
    at most `max_masks`), chosen uniformly, all replaced by [MASK]; one query per sentence."""
    rng = random.Random(seed)
    queries = []
    for block, _, _, sentence, _ in _sentences(store, max_query_tokens):
        n = max(1, min(max_masks, round(prob * len(sentence))))
        queries.append(masked_query(store, block.id, sentence, sorted(rng.sample(range(len(sentence)), n))))
    return queries


def random_span_queries(
    store: BlockStore, max_query_tokens: int, max_masks: int, seed: int, p: float = 0.2
) -> list[MaskedQuery]:
    """Ablation "random span masks" (REALM Table 2, after SpanBERT): one contiguous span per
    sentence, length ~ Geometric(p) clipped to `max_masks` and the sentence, uniform start."""
    rng = random.Random(seed)
    queries = []
    for block, _, _, sentence, _ in _sentences(store, max_query_tokens):
        length = 1
        while rng.random() > p and length < min(max_masks, len(sentence)):
            length += 1
        start = rng.randrange(len(sentence) - length + 1)
        queries.append(masked_query(store, block.id, sentence, list(range(start, start + length))))
    return queries


def make_queries(
    store: BlockStore, masking: str, max_query_tokens: int, max_masks: int, seed: int
) -> list[MaskedQuery]:
    """The pre-training queries for `pretrain.masking` (salient = REALM; the others are its ablations)."""
    if masking == "salient":
        return salient_span_queries(store, max_query_tokens, max_masks)
    if masking == "random_tokens":
        return random_token_queries(store, max_query_tokens, max_masks, seed)
    if masking == "random_spans":
        return random_span_queries(store, max_query_tokens, max_masks, seed)
    raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")


def answer_bearing_blocks(store: BlockStore, queries: list[MaskedQuery], limit: int = 16) -> list[list[int]]:
    """For each query, up to `limit` non-source blocks whose body holds its masked wordpieces as whole words,
    most related first: ranked by the BM25 score of the masked sentence against the block.

    Whole words: the match neither starts nor ends inside a word (the wordpiece after it does
    not start with ##), so "paris" does not match inside "parisian". A span such as "France"
    occurs in many blocks, most of which say nothing about the sentence; the BM25 order puts
    first the ones that share its other words, the evidence a good retriever would find.
    """
    first: dict[int, list[tuple[int, int]]] = defaultdict(list)  # wordpiece -> (block, position)
    for z, body in enumerate(store.body_ids):
        for i, t in enumerate(body[: store.max_block_tokens]):
            first[t].append((z, i))
    continuation = _continuation_ids(store)
    out = []
    for q in queries:
        target, found = q.targets, []
        for z, i in first.get(target[0], ()):
            body = store.body_ids[z]
            if z == q.block_id or (found and found[-1] == z) or body[i : i + len(target)] != target:
                continue
            if i + len(target) < len(body) and body[i + len(target)] in continuation:
                continue
            found.append(z)
        out.append(found)
    return _rank_by_overlap(store, queries, out, limit)


def _bm25_scores(store: BlockStore, queries: list[MaskedQuery], wanted: list[bool]):
    """BM25 scores [N] of each wanted query's masked sentence (masks dropped) against every block; None otherwise."""
    from realm_core.bm25 import bm25_tokenize, build_bm25

    docs = bm25_tokenize([f"{b.title} {b.text}" for b in store.blocks])
    if not any(docs) or not any(wanted):
        return [None] * len(queries)
    bm25 = build_bm25(docs)
    special = set(store.tokenizer.all_special_ids)
    texts = [
        store.tokenizer.decode([t for t in q.input_ids if t not in special]) if w else ""
        for q, w in zip(queries, wanted)
    ]
    out = []
    for w, tokens in zip(wanted, bm25_tokenize(texts)):
        ids = bm25.get_tokens_ids(tokens) if w else []
        out.append(bm25.get_scores_from_ids(ids) if ids else None)
    return out


def _rank_by_overlap(
    store: BlockStore, queries: list[MaskedQuery], found: list[list[int]], limit: int
) -> list[list[int]]:
    out = []
    for f, scores in zip(found, _bm25_scores(store, queries, [len(f) > 1 for f in found])):
        if scores is not None:
            f = sorted(f, key=lambda z: (-float(scores[z]), z))
        out.append(f[:limit])
    return out


def answer_near(store: BlockStore, queries: list[MaskedQuery], evidence: list[list[int]], n: int) -> list[bool]:
    """True where an answer-bearing block is among the `n` BM25-closest non-source blocks of the masked
    sentence: evidence that a retriever can find, not only evidence that exists somewhere."""
    import numpy as np

    out = []
    for q, ev, scores in zip(queries, evidence, _bm25_scores(store, queries, [bool(e) for e in evidence])):
        if scores is None or not ev:
            out.append(False)
            continue
        if 0 <= q.block_id < len(scores):
            scores = scores.copy()
            scores[q.block_id] = -np.inf
        best = scores[ev].max()
        out.append(bool(best > 0 and (scores > best).sum() < n))
    return out


def related_blocks_without_answer(
    store: BlockStore, queries: list[MaskedQuery], evidence: list[list[int]], limit: int = 4
) -> list[list[int]]:
    """For each query, up to `limit` of the BM25-closest blocks that are neither its source nor answer-bearing.

    The hard negatives of the encoder warm-up: blocks that look like what pre-training retrieves
    but cannot fill the span, so the encoder learns that such a block must not lower p(y) below
    the null block's (reading.py).
    """
    import numpy as np

    out = []
    for q, ev, scores in zip(queries, evidence, _bm25_scores(store, queries, [True] * len(queries))):
        if scores is None:
            out.append([])
            continue
        banned = set(ev) | {q.block_id}
        order = np.argsort(-scores, kind="stable")[: limit + len(banned) + 1]
        out.append([int(z) for z in order if int(z) not in banned and scores[z] > 0][:limit])
    return out


def _continuation_ids(store: BlockStore) -> set[int]:
    vocab = store.tokenizer.get_vocab()
    return {i for w, i in vocab.items() if w.startswith("##")}


def encoder_inputs(
    store: BlockStore, queries: list[MaskedQuery], contexts: list[list[int | None]], device: torch.device
) -> dict[str, torch.Tensor]:
    """The knowledge-augmented encoder's batch: `[CLS] masked x [SEP] body(z) [SEP]` for every query
    and each of its contexts (None = the null block), with the masked positions and targets.

    Returns input_ids/attention_mask/token_type_ids [B*k, L], mask_positions/targets [B*k, M]
    (the query's row repeated for each of its k contexts) and token_mask [B, M].
    """
    k = len(contexts[0])
    pairs = [store.pair_sequence(q.input_ids, z) for q, row in zip(queries, contexts) for z in row]
    inputs = pad_batch([p[0] for p in pairs], [p[1] for p in pairs], store.tokenizer.pad_token_id, device)
    m = max(len(q.mask_positions) for q in queries)
    positions = torch.zeros(len(queries), m, dtype=torch.long)
    targets = torch.zeros(len(queries), m, dtype=torch.long)
    token_mask = torch.zeros(len(queries), m)
    for i, q in enumerate(queries):
        positions[i, : len(q.mask_positions)] = torch.tensor(q.mask_positions)
        targets[i, : len(q.targets)] = torch.tensor(q.targets)
        token_mask[i, : len(q.targets)] = 1
    return {
        **inputs,
        "mask_positions": positions.repeat_interleave(k, 0).to(device),  # [B*k, M]
        "targets": targets.repeat_interleave(k, 0).to(device),
        "token_mask": token_mask.to(device),  # [B, M]
    }
