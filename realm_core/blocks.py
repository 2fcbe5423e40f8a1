"""The evidence blocks, tokenised once, and the model inputs REALM builds from them.

    retriever block input:  [CLS] title [SEP] body [SEP]      segments 0 / 1   (DESIGN.md 1)
    encoder / reader input: [CLS] x [SEP] body [SEP]          title dropped     (section 3.2)
    null block:             [CLS] [SEP] [SEP]  (retriever) and [CLS] x [SEP] [SEP] (encoder)

Blocks are tokenised a single time (ids plus character offsets into the body) so that
pre-training can mask spans and the reader can map a wordpiece span back to text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from realm_core.io import InputError, read_jsonl
from realm_core.precision import embedding_tower, resolve_embed_precision


@dataclass
class Block:
    id: int
    title: str
    text: str
    sentences: list[tuple[int, int]]
    spans: list[tuple[int, int, str]]


def read_blocks(path: Path) -> list[Block]:
    """The block records of blocks.jsonl (not tokenised); ids must be 0..N-1 in file order."""
    blocks: list[Block] = []
    for lineno, row in read_jsonl(path):
        try:
            block = Block(
                int(row["id"]),
                row["title"],
                row["text"],
                [tuple(s) for s in row["sentences"]],
                [tuple(s) for s in row["spans"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"{path}:{lineno}: malformed block record ({exc!r}); regenerate it with `dvc repro corpus`"
            ) from None
        if block.id != len(blocks):
            raise InputError(
                f"{path}:{lineno}: block ids must be 0..N-1 in order, got {block.id} at position {len(blocks)}"
            )
        blocks.append(block)
    if not blocks:
        raise InputError(f"{path}: no blocks; the corpus stage produced an empty corpus")
    return blocks


class BlockStore:
    """All blocks of the corpus with their wordpieces; index i holds the block with id i."""

    def __init__(self, blocks: list[Block], tokenizer: PreTrainedTokenizerBase, max_block_tokens: int):
        self.blocks = blocks
        self.tokenizer = tokenizer
        self.max_block_tokens = max_block_tokens
        self.source: Path | None = None  # the blocks file, when loaded from one
        body = tokenizer([b.text for b in blocks], add_special_tokens=False, return_offsets_mapping=True)
        titles = tokenizer([b.title for b in blocks], add_special_tokens=False)
        self.body_ids: list[list[int]] = body["input_ids"]
        self.body_offsets: list[list[tuple[int, int]]] = body["offset_mapping"]
        self.title_ids: list[list[int]] = titles["input_ids"]

    @classmethod
    def load(cls, path: Path, tokenizer: PreTrainedTokenizerBase, max_block_tokens: int) -> "BlockStore":
        store = cls(read_blocks(path), tokenizer, max_block_tokens)
        store.source = Path(path)
        check_block_lengths(store, Path(path))
        return store

    def __len__(self) -> int:
        return len(self.blocks)

    def sentence_token_range(self, block_id: int, start: int, end: int) -> tuple[int, int]:
        """Wordpiece positions [i, j) of the body tokens that overlap characters [start, end)."""
        offsets = self.body_offsets[block_id]
        inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start]
        return (inside[0], inside[-1] + 1) if inside else (0, 0)

    # ------------------------------------------------------------------ model inputs

    def doc_sequence(self, block_id: int | None, drop: tuple[int, int] | None = None) -> tuple[list[int], list[int]]:
        """[CLS] title [SEP] body [SEP] with segment ids; None is the null block; `drop` removes body tokens."""
        tok = self.tokenizer
        if block_id is None:
            return [tok.cls_token_id, tok.sep_token_id, tok.sep_token_id], [0, 0, 1]  # empty title (0), empty body (1)
        body = self.body_ids[block_id]
        if drop is not None:
            body = body[: drop[0]] + body[drop[1] :]
        title = self.title_ids[block_id]
        budget = self.max_block_tokens - 3
        title = title[:budget]
        body = body[: max(budget - len(title), 0)]
        ids = [tok.cls_token_id, *title, tok.sep_token_id, *body, tok.sep_token_id]
        return ids, [0] * (len(title) + 2) + [1] * (len(body) + 1)

    def pair_sequence(self, query_ids: Sequence[int], block_id: int | None) -> tuple[list[int], list[int], int]:
        """[CLS] x [SEP] body [SEP] (title dropped) and the position where the body starts.

        `query_ids` already holds [CLS] x [SEP]; the null block has an empty body.
        """
        body = [] if block_id is None else self.body_ids[block_id][: self.max_block_tokens]
        ids = [*query_ids, *body, self.tokenizer.sep_token_id]
        return ids, [0] * len(query_ids) + [1] * (len(body) + 1), len(query_ids)

    def query_ids(self, text: str, max_tokens: int) -> list[int]:
        return self.tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"]


def check_block_lengths(store: BlockStore, path: Path) -> None:
    """Every block must fit `[CLS] title [SEP] body [SEP]` in max_block_tokens wordpieces, as the
    corpus stage packs them (REALM section 4: 288); a longer one means blocks.jsonl was built
    with other params and would be silently truncated, so it is an error naming its line."""
    for i, (title, body) in enumerate(zip(store.title_ids, store.body_ids)):
        n = 3 + len(title) + len(body)
        if n > store.max_block_tokens:
            line = next((lineno for lineno, row in read_jsonl(path) if str(row.get("id")) == str(i)), i + 1)
            raise InputError(
                f"{path}:{line}: block {i} ({store.blocks[i].title!r}) has {n} wordpieces with its title, more than "
                f"corpus.max_block_tokens={store.max_block_tokens}; rebuild the blocks with the current params (`dvc repro -f corpus`)"
            )


def pad_batch(
    sequences: Sequence[Sequence[int]], segments: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids, attention_mask, token_type_ids [N, L]."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, (seq, seg) in enumerate(zip(sequences, segments)):
        ids[i, : len(seq)] = torch.tensor(seq)
        types[i, : len(seg)] = torch.tensor(seg)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "token_type_ids": types.to(device)}


def query_batch(store: BlockStore, sequences: Sequence[Sequence[int]], device: torch.device) -> dict[str, torch.Tensor]:
    return pad_batch(sequences, [[0] * len(s) for s in sequences], store.tokenizer.pad_token_id, device)


def doc_batch(store: BlockStore, block_ids: Sequence[int | None], device: torch.device) -> dict[str, torch.Tensor]:
    seqs = [store.doc_sequence(b) for b in block_ids]
    return pad_batch([s[0] for s in seqs], [s[1] for s in seqs], store.tokenizer.pad_token_id, device)


def embed_blocks(
    embedder: torch.nn.Module,
    store: BlockStore,
    device: torch.device,
    batch_size: int = 64,
    progress: str | None = "embed blocks",
    precision: str = "fp32",
) -> np.ndarray:
    """Embed every block with the document embedder: [N, d] float32, row i = block i.

    Blocks are processed in order of length so each batch pads little. `precision` is the
    kernel (realm_core/precision.py: fp32 | bf16 | fp16 | int8, or auto): anything but fp32
    embeds with a bf16 / fp16 / int8 copy of the embedder's current weights, which stay untouched.
    """
    was_training = embedder.training
    embedder.eval()
    with torch.no_grad():
        tower = embedding_tower(embedder, resolve_embed_precision(precision, device))
    order = sorted(range(len(store)), key=lambda i: len(store.body_ids[i]) + len(store.title_ids[i]))
    out: np.ndarray | None = None
    bar = tqdm(total=len(order), desc=progress, unit="block", disable=progress is None, mininterval=2.0)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            emb = tower(**doc_batch(store, chunk, device)).float().cpu().numpy()
            if out is None:
                out = np.zeros((len(store), emb.shape[1]), dtype=np.float32)
            out[chunk] = emb
            bar.update(len(chunk))
    bar.close()
    embedder.train(was_training)
    assert out is not None
    return out
