"""Block embedding split into shards, and the merge back into one index (DPR / pyserini style).

    python -c "from realm_core.sharding import shard_range; print(shard_range(1519, 1, 4))"

REALM re-embeds its whole corpus (13.35M blocks) with a snapshot of the document embedder at
every index refresh, in jobs separate from the trainer (Guu et al. 2020, section 3.3); DPR splits
the same work with `shard_id` / `num_shards`. Here shard i of n is a contiguous range of block
ids (sizes differ by at most one, the split `realm_core.corpus.shard` uses). Each shard is
embedded on its own (a Prefect task on whatever worker runs it, tasks/embedding.py), written to
one safetensors file, and the files are merged in id order. The merge checks that every shard
is there exactly once and that the ids are exactly 0..N-1, so a lost or repeated shard fails
loudly instead of silently shifting rows of the index.

Shard file (safetensors, no pickle):
    embeddings  float32 [n_i, d]
    ids         int64 [n_i]
    metadata    {"shard": i, "num_shards": n, "total": N, "worker": "host:pid"}   (strings, as
                safetensors requires; `worker` is the process that wrote it, for provenance)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from transformers import PreTrainedTokenizerBase

from realm_core.blocks import Block, BlockStore, embed_blocks

META_KEYS = ("shard", "num_shards", "total")


@dataclass
class Shard:
    """The embeddings of one shard of the corpus; `source` names its file in error messages."""

    index: int
    num_shards: int
    total: int  # blocks in the whole corpus
    ids: np.ndarray  # [n_i] int64
    embeddings: np.ndarray  # [n_i, d] float32 ([0, 0] for an empty shard)
    source: str = "<memory>"
    worker: str = ""  # host:pid of the process that wrote the shard file


def shard_range(total: int, shard: int, num_shards: int) -> range:
    """Block ids of shard `shard` of `num_shards`: contiguous, sizes differ by at most one.

    Contiguous ranges keep each shard file in id order and make the merge a concatenation; a
    shard is empty when num_shards > total.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in 0..{num_shards - 1}, got {shard}")
    size, extra = divmod(total, num_shards)
    start = shard * size + min(shard, extra)
    return range(start, start + size + (shard < extra))


def embed_shard(
    embedder: torch.nn.Module,
    blocks: Sequence[Block],
    tokenizer: PreTrainedTokenizerBase,
    max_block_tokens: int,
    shard: int,
    num_shards: int,
    device: torch.device,
    batch_size: int = 64,
    precision: str = "fp32",
) -> Shard:
    """Embed only the blocks of one shard; only they are tokenised.

    `blocks` is the whole corpus (ids 0..N-1, as `blocks.read_blocks` returns them). The shard's
    BlockStore holds block ids[p] at position p, so row p of its embeddings belongs to ids[p].
    """
    ids = shard_range(len(blocks), shard, num_shards)
    part = list(blocks[ids.start : ids.stop])
    if not part:
        return Shard(shard, num_shards, len(blocks), np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32))
    store = BlockStore(part, tokenizer, max_block_tokens)
    emb = embed_blocks(
        embedder, store, device, batch_size, progress=f"embed shard {shard}/{num_shards}", precision=precision
    )  # [n_i, d]
    return Shard(shard, num_shards, len(blocks), np.array([b.id for b in part], dtype=np.int64), emb)


def this_worker() -> str:
    """host:pid of this process, as a shard's `worker` records it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def save_shard(shard: Shard, path: str | Path) -> Path:
    """Write one shard file atomically (temporary name, then rename); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {
        "embeddings": np.ascontiguousarray(shard.embeddings, dtype=np.float32),
        "ids": np.ascontiguousarray(shard.ids, dtype=np.int64),
    }
    meta = {
        "shard": str(shard.index),
        "num_shards": str(shard.num_shards),
        "total": str(shard.total),
        "worker": this_worker(),
    }
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)
    return path


def load_shard(path: str | Path) -> Shard:
    """Read a shard file written by `save_shard`; a bad file raises ValueError naming it."""
    path = Path(path)
    fix = "delete it and re-embed the shard"
    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            ids, emb = f.get_tensor("ids"), f.get_tensor("embeddings")
        index, num_shards, total = (int(meta[k]) for k in META_KEYS)
    except (OSError, SafetensorError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable shard file ({type(exc).__name__}: {exc}); {fix}") from None
    if ids.dtype != np.int64 or ids.ndim != 1 or emb.dtype != np.float32 or emb.ndim != 2 or len(emb) != len(ids):
        raise ValueError(
            f"{path}: expected ids int64 [n] and embeddings float32 [n, d], got {ids.dtype} {ids.shape} and {emb.dtype} {emb.shape}; {fix}"
        )
    return Shard(index, num_shards, total, ids, emb, source=str(path), worker=meta.get("worker", ""))


def merge_shards(shards: Sequence[Shard]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate shards in id order: (embeddings [N, d] float32, ids [N] int64 = 0..N-1).

    Checks that all shards describe the same split, that each of shards 0..n-1 is present once,
    that every shard holds exactly the ids `shard_range` gives it, and that dimensions agree.
    """
    if not shards:
        raise ValueError("no shard files to merge; the embedding map produced nothing")
    first = shards[0]
    for s in shards:
        if (s.num_shards, s.total) != (first.num_shards, first.total):
            raise ValueError(
                f"shards disagree: {first.source} is one of {first.num_shards} shards of {first.total} blocks, "
                f"{s.source} one of {s.num_shards} of {s.total}; delete the stale shard files and re-embed"
            )
    seen: dict[int, str] = {}
    for s in shards:
        if s.index in seen:
            raise ValueError(f"shard {s.index} given twice ({seen[s.index]} and {s.source}); merge each shard once")
        seen[s.index] = s.source
    missing = sorted(set(range(first.num_shards)) - set(seen))
    if missing:
        raise ValueError(f"missing shard(s) {missing} of {first.num_shards}; embed them before merging")
    ordered = sorted(shards, key=lambda s: s.index)
    for s in ordered:
        expected = shard_range(s.total, s.index, s.num_shards)
        if not np.array_equal(s.ids, np.arange(expected.start, expected.stop)):
            raise ValueError(
                f"{s.source}: shard {s.index} should hold block ids {expected.start}..{expected.stop - 1} in order; re-embed it"
            )
    non_empty = [s for s in ordered if len(s.ids)]
    if not non_empty:
        raise ValueError(f"all {first.num_shards} shards are empty: the corpus has no blocks")
    if len({s.embeddings.shape[1] for s in non_empty}) != 1:
        raise ValueError(
            "embedding dimensions disagree across shards: "
            + ", ".join(f"{s.source}: {s.embeddings.shape}" for s in non_empty)
        )
    return np.concatenate([s.embeddings for s in non_empty]), np.concatenate([s.ids for s in non_empty])
