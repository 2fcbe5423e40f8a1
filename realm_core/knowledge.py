"""Knowledge updated without retraining: passages added to, or removed from, what a fine-tuned
model retrieves.

REALM's abstract promises knowledge stored "in a more modular and interpretable way": the
knowledge sits in the corpus Z, not in the weights. In Open-QA fine-tuning the document tower
is frozen (ORQA section 6; REALM section 3.4), so a new passage is packed into blocks as the
corpus stage packs them (realm_core/corpus.py), embedded once with that same frozen tower, and
appended to the block store and the index; a removed passage's blocks leave both. Nothing is
retrained, and the question tower and reader read the new blocks as they read the old.

The change is an overlay beside the finetune stage's outputs, never inside them:

    <dir>/blocks.jsonl     added blocks, ids base_blocks + 0, 1, ... (blocks.jsonl's record format)
    <dir>/embeddings.npy   [added, d] float32, row i = added block i, from the frozen doc tower
    <dir>/knowledge.json   base_blocks, the doc tower it was embedded with, removed passage ids

so the pipeline's DVC outputs stay what their stages wrote, and the overlay is versioned on its
own (flows/cli.py: `realm index add` / `remove` run `dvc add` on it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from realm_core.blocks import Block, BlockStore
from realm_core.index import DenseIndex
from realm_core.io import InputError, atomic_dir, read_jsonl

if TYPE_CHECKING:  # corpus.py brings spaCy; only `realm index add` needs it
    from realm_core.corpus import Passage

META = "knowledge.json"


@dataclass
class Knowledge:
    base_blocks: int  # blocks in the corpus the index was built over
    doc_tower: str  # the frozen document tower the additions were embedded with (data/-relative)
    added: list[dict] = field(default_factory=list)  # block records, ids base_blocks + i, with passage_id
    embeddings: np.ndarray | None = None  # [len(added), d] float32
    removed: list[str] = field(default_factory=list)  # corpus passage ids whose blocks are not retrieved
    base_index: str = ""  # index_signature of the index it extends: a rebuilt index invalidates the overlay

    @property
    def added_passages(self) -> list[str]:
        return list(dict.fromkeys(b["passage_id"] for b in self.added))


def index_signature(index: DenseIndex) -> str:
    """Cheap identity of a block index: its size and a hash of its first vectors, which any new
    document tower or corpus changes (hashing all of a 13M-block index at every load would not be cheap)."""
    head = np.ascontiguousarray(index.embeddings[: min(64, len(index))], dtype=np.float32)
    return f"{len(index)}:{hashlib.sha256(head.tobytes()).hexdigest()[:16]}"


def load_knowledge(directory: Path) -> Knowledge | None:
    """The overlay in `directory`, or None when there is none."""
    meta_file = directory / META
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        added = (
            [row for _, row in read_jsonl(directory / "blocks.jsonl")] if (directory / "blocks.jsonl").is_file() else []
        )
        embeddings = np.load(directory / "embeddings.npy", allow_pickle=False) if added else None
        k = Knowledge(
            int(meta["base_blocks"]),
            str(meta["doc_tower"]),
            added,
            embeddings,
            list(meta["removed"]),
            str(meta.get("base_index", "")),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"{directory}: unreadable knowledge overlay ({exc!r}); delete it or re-add the passages"
        ) from None
    if added and (embeddings is None or embeddings.shape[0] != len(added)):
        raise InputError(
            f"{directory}: {len(added)} added blocks but {0 if embeddings is None else embeddings.shape[0]} embeddings"
        )
    return k


def save_knowledge(directory: Path, k: Knowledge) -> None:
    """Write the overlay at once (a crash leaves the previous one whole)."""
    with atomic_dir(directory) as out:
        meta = {
            "base_blocks": k.base_blocks,
            "base_index": k.base_index,
            "doc_tower": k.doc_tower,
            "removed": k.removed,
            "added_blocks": len(k.added),
            "added_passages": k.added_passages,
        }
        (out / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if k.added:
            (out / "blocks.jsonl").write_text(
                "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in k.added), encoding="utf-8"
            )
            assert k.embeddings is not None
            np.save(out / "embeddings.npy", k.embeddings.astype(np.float32))


def passage_ids(blocks_file: Path) -> list[str]:
    """The passage id of each block of a blocks.jsonl, in block order."""
    return [str(row.get("passage_id", row["id"])) for _, row in read_jsonl(blocks_file)]


def _block(row: dict) -> Block:
    return Block(
        int(row["id"]),
        row["title"],
        row["text"],
        [tuple(s) for s in row["sentences"]],
        [tuple(s) for s in row["spans"]],
    )


def add_passages(
    k: Knowledge,
    passages: Sequence[Passage],
    base_passage_ids: set[str],
    pack: Callable[[Sequence[Passage]], list[dict]],
    embed: Callable[[BlockStore], np.ndarray],
    store_of: Callable[[list[Block]], BlockStore],
) -> tuple[Knowledge, int]:
    """Pack `passages` into blocks (`pack`: corpus.process_shard), embed them (`embed`: the frozen
    doc tower over a store of just those blocks) and append them. Returns (new overlay, #blocks added).
    A passage id already present (and not removed) is an error: remove it first to replace it."""
    present = (base_passage_ids - set(k.removed)) | set(k.added_passages)
    clash = [p.id for p in passages if p.id in present]
    if clash:
        raise InputError(
            f"passage ids already in the index: {', '.join(clash[:5])}; `realm index remove --ids ...` them first to replace them"
        )
    records = pack(passages)
    if not records:
        raise InputError("the passages produced no blocks (no sentences)")
    start = k.base_blocks + len(k.added)
    rows = [{"id": start + i, **{key: v for key, v in r.items() if key != "id"}} for i, r in enumerate(records)]
    local = [_block({**r, "id": i}) for i, r in enumerate(rows)]  # BlockStore wants ids 0..n-1
    emb = embed(store_of(local))  # [n, d]
    embeddings = emb if k.embeddings is None else np.concatenate([k.embeddings, emb])
    # a removed corpus passage stays removed: a new passage of the same id replaces it, never revives it
    return replace(k, added=k.added + rows, embeddings=embeddings), len(rows)


def remove_passages(k: Knowledge, ids: Sequence[str], base_passage_ids: set[str]) -> tuple[Knowledge, int]:
    """Take passages out: added ones leave the overlay, the corpus's own are marked removed.
    Returns (new overlay, #passages removed); an id in neither is an error naming it."""
    added = set(k.added_passages)
    unknown = [i for i in ids if i not in added and (i not in base_passage_ids or i in k.removed)]
    if unknown:
        raise InputError(
            f"no such passage in the index: {', '.join(unknown[:5])} (`realm index list` shows the changes)"
        )
    keep = [j for j, b in enumerate(k.added) if b["passage_id"] not in set(ids)]
    rows = [{**k.added[j], "id": k.base_blocks + n} for n, j in enumerate(keep)]
    embeddings = k.embeddings[keep] if (k.embeddings is not None and keep) else None
    removed = k.removed + [i for i in ids if i in base_passage_ids and i not in k.removed]
    return replace(k, added=rows, embeddings=embeddings, removed=removed), len(set(ids))


def apply_knowledge(
    blocks: list[Block], passage_ids: list[str], index: DenseIndex, k: Knowledge
) -> tuple[list[Block], DenseIndex]:
    """The corpus blocks with the overlay appended, and an index over every block not removed.

    blocks/passage_ids: the corpus's blocks and each one's passage id; index: built over them.
    """
    if k.base_blocks != len(blocks) or (k.base_index and k.base_index != index_signature(index)):
        raise InputError(
            f"the knowledge overlay (data/knowledge) extends another index ({k.base_blocks} blocks, {k.base_index}) "
            f"than the current one ({len(blocks)} blocks, {index_signature(index)}): the pipeline was rerun since; "
            "delete data/knowledge and add the passages again (`realm index add`)"
        )
    all_blocks = blocks + [_block(r) for r in k.added]
    owner = passage_ids + [r["passage_id"] for r in k.added]
    removed = set(k.removed)
    by_id = np.empty(len(blocks), dtype=np.int64)  # row of each corpus block in the saved index
    by_id[index.ids] = np.arange(len(index.ids))
    base = index.embeddings[by_id]  # [N, d], row i = block i
    embeddings = base if k.embeddings is None else np.concatenate([base, k.embeddings.astype(np.float32)])
    # `removed` names corpus passages; an added passage of the same id is their replacement
    keep = np.array([i >= len(blocks) or owner[i] not in removed for i in range(len(all_blocks))])
    if not keep.any():
        raise InputError("every passage is removed: nothing is left to retrieve (`realm index list` shows the changes)")
    ids = np.arange(len(all_blocks), dtype=np.int64)
    merged = DenseIndex.build(
        np.ascontiguousarray(embeddings[keep]), ids[keep], index.spec, meta=dict(index.meta), progress=None
    )
    return all_blocks, merged
