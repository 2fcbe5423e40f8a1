"""A dense block index: exact maximum-inner-product search over faiss, saved without pickle.

REALM scores a block by the inner product f(x, z) = Embed_input(x) . Embed_doc(z) and retrieves
the top k by maximum inner product search (Guu et al. 2020, section 3.2 and 3.3); ORQA and DPR
do the same with an exact (brute-force) index, here `faiss.IndexFlatIP`.

The on-disk layout follows DPR's `DenseIndexer.serialize`, which writes the faiss index and the
id map together and checks their sizes on load:

    <dir>/index.faiss      faiss.write_index of the IndexFlatIP
    <dir>/ids.npy          int64 [N]: row i of the index is block ids[i]
    <dir>/embeddings.npy   float32 [N, d]: the vectors (fine-tuning keeps them as frozen block embeddings)
    <dir>/index.json       {"format", "dim", "count", "meta": {...caller's fields, e.g. step}}

`save` writes into a temporary sibling directory and renames it into place (io.atomic_dir), so a
killed writer never leaves a half-written index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from realm_core.io import atomic_dir, write_json

FORMAT_VERSION = 1
FILES = ("index.faiss", "ids.npy", "embeddings.npy", "index.json")


class DenseIndex:
    """Exact inner-product index over block embeddings, with an id per row.

    embeddings: [N, d] float32; ids: [N] int64. `search` returns the ids (not row numbers).
    The vectors are kept both in faiss and as `self.embeddings` (not copied when already float32
    and C-contiguous: do not modify them afterwards), so memory is about 2 * N * d * 4 bytes.
    `faiss_index` is for `load`: an index already holding exactly these vectors.
    """

    def __init__(self, embeddings: np.ndarray, ids: np.ndarray, meta: dict[str, Any] | None = None, faiss_index: faiss.Index | None = None):
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
            raise ValueError(f"embeddings must be a non-empty [N, d] array, got shape {embeddings.shape}")
        if ids.shape != (embeddings.shape[0],):
            raise ValueError(f"ids must have shape [N] = [{embeddings.shape[0]}], got {ids.shape}")
        self.embeddings = embeddings  # [N, d]
        self.ids = ids  # [N]
        self.meta: dict[str, Any] = dict(meta or {})
        if faiss_index is None:
            faiss_index = faiss.IndexFlatIP(embeddings.shape[1])
            faiss_index.add(embeddings)
        self.faiss_index = faiss_index

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores [Q, k'] float32, ids [Q, k'] int64), best first, k' = min(k, N).

        faiss would pad k > N with id -1 and score -3.4e38; clipping k avoids padding altogether.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape [Q, {self.dim}], got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), len(self))
        scores, rows = self.faiss_index.search(queries, k)  # [Q, k], [Q, k] row numbers
        return scores.astype(np.float32, copy=False), self.ids[rows]

    def save(self, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write the index atomically to `directory` (replacing it); `meta` (e.g. {"step": 500}) goes to index.json."""
        if meta is not None:
            self.meta = dict(meta)
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            faiss.write_index(self.faiss_index, str(tmp / "index.faiss"))
            np.save(tmp / "ids.npy", self.ids, allow_pickle=False)
            np.save(tmp / "embeddings.npy", self.embeddings, allow_pickle=False)
            write_json(tmp / "index.json", {"format": FORMAT_VERSION, "dim": self.dim, "count": len(self), "meta": self.meta})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> DenseIndex:
        """Read an index written by `save`; raise ValueError naming `directory` if anything disagrees."""
        directory = Path(directory)
        missing = [name for name in FILES if not (directory / name).is_file()]
        if missing:
            raise ValueError(f"{directory}: not a saved DenseIndex (missing {', '.join(missing)}); rebuild the index")
        try:
            header = json.loads((directory / "index.json").read_text(encoding="utf-8"))
            ids = np.load(directory / "ids.npy", allow_pickle=False)
            embeddings = np.load(directory / "embeddings.npy", allow_pickle=False)
            faiss_index = faiss.read_index(str(directory / "index.faiss"))
        except (OSError, ValueError, RuntimeError) as exc:  # faiss raises RuntimeError on a bad file
            raise ValueError(f"{directory}: unreadable index file ({type(exc).__name__}: {exc}); rebuild the index") from None
        _check_consistent(directory, header, ids, embeddings, faiss_index)
        return cls(embeddings, ids, meta=header.get("meta"), faiss_index=faiss_index)


def _check_consistent(directory: Path, header: dict[str, Any], ids: np.ndarray, embeddings: np.ndarray, faiss_index: faiss.Index) -> None:
    """The four files must describe the same N vectors of the same dimension (DPR checks id map vs index size)."""
    problems = []
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        problems.append(f"index.json is not format {FORMAT_VERSION}: {header!r:.200}")
    if ids.dtype != np.int64 or ids.ndim != 1:
        problems.append(f"ids.npy is {ids.dtype} {ids.shape}, expected int64 [N]")
    if embeddings.dtype != np.float32 or embeddings.ndim != 2:
        problems.append(f"embeddings.npy is {embeddings.dtype} {embeddings.shape}, expected float32 [N, d]")
    if not isinstance(faiss_index, faiss.IndexFlatIP):
        problems.append(f"index.faiss holds a {type(faiss_index).__name__}, expected IndexFlatIP")
    if problems:  # wrong kinds of file: sizes are meaningless
        raise ValueError(f"{directory}: inconsistent DenseIndex: " + "; ".join(problems) + "; rebuild the index")
    counts = {"ids.npy": len(ids), "embeddings.npy": len(embeddings), "index.faiss": faiss_index.ntotal, "index.json": header.get("count")}
    if len(ids) == 0:
        problems.append("ids.npy is empty")
    if len(set(counts.values())) != 1:
        problems.append("row counts disagree: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    dims = {"embeddings.npy": embeddings.shape[1], "index.faiss": faiss_index.d, "index.json": header.get("dim")}
    if len(set(dims.values())) != 1:
        problems.append("dimensions disagree: " + ", ".join(f"{k}={v}" for k, v in dims.items()))
    if not problems:  # same vectors? compare the first and last rows (cheap spot check)
        for row in {0, len(ids) - 1}:
            if not np.array_equal(faiss_index.reconstruct(row), embeddings[row]):
                problems.append(f"row {row} of index.faiss differs from embeddings.npy")
    if problems:
        raise ValueError(f"{directory}: inconsistent DenseIndex: " + "; ".join(problems) + "; rebuild the index")
