"""A dense block index: maximum-inner-product search over faiss, saved without pickle.

REALM scores a block by the inner product f(x, z) = Embed_input(x) . Embed_doc(z) and retrieves
the top k by maximum inner product search (Guu et al. 2020, section 3.2 and 3.3); ORQA and DPR
do the same with an exact (brute-force) index, `faiss.IndexFlatIP`, our default. For millions of
blocks (REALM: 13M) params.yaml `index.type` picks an approximate index instead (DESIGN.md 4):

    flat     IndexFlatIP: exact; N*d*4 bytes; query cost O(N*d)
    hnsw     IndexHNSWFlat(METRIC_INNER_PRODUCT): graph search; no training; vectors + ~2*M*4 bytes each
    ivf_pq   IndexIVFPQ(METRIC_INNER_PRODUCT): trained on a seeded sample; m*nbits/8 bytes a vector;
             the k*refine_factor PQ candidates are re-ranked by the exact inner product

Build through the factory, `DenseIndex.build(embeddings, ids, params.index, seed=params.seed)`
(or `make_faiss_index(spec, dim)` for a bare faiss index). `DenseIndex(embeddings, ids)` is the
exact flat index, as before. Approximate recall is measured by `bench/index.py`.

The on-disk layout follows DPR's `DenseIndexer.serialize`, which writes the faiss index and the
id map together and checks their sizes on load:

    <dir>/index.faiss      faiss.write_index of the faiss index
    <dir>/ids.npy          int64 [N]: row i of the index is block ids[i]
    <dir>/embeddings.npy   float32 [N, d]: the vectors (fine-tuning keeps them as frozen block embeddings)
    <dir>/index.json       {"format", "dim", "count", "meta": {...caller's fields, e.g. step},
                            "index": {"type", knobs}}   ("index" absent = flat: older saves load unchanged)

`save` writes into a temporary sibling directory and renames it into place (io.atomic_dir), so a
killed writer never leaves a half-written index. `load(dir, spec)` with `spec.mmap` memory-maps
index.faiss (faiss IO_FLAG_MMAP_IFC for flat/hnsw storage, IO_FLAG_MMAP for IVF lists) and
embeddings.npy (numpy copy-on-write memmap) instead of reading them into RAM; such an index is
read-only. A corpus split into shards is searched as one index with `DenseIndex.from_shards`
(faiss IndexShards): the same ids and scores as the unsharded index.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from pydantic import ValidationError
from tqdm.auto import tqdm

from realm_core.config import IndexParams
from realm_core.io import atomic_dir, write_json

FORMAT_VERSION = 1
FILES = ("index.faiss", "ids.npy", "embeddings.npy", "index.json")
FAISS_TYPES: dict[str, type] = {"flat": faiss.IndexFlatIP, "hnsw": faiss.IndexHNSWFlat, "ivf_pq": faiss.IndexIVFPQ}
BUILD_KNOBS = {
    "hnsw": ("m", "ef_construction"),
    "ivf_pq": ("nlist", "m", "nbits", "train_size"),
}  # a change needs a rebuild
ADD_CHUNK = 65536  # vectors per faiss add() call, so long builds show progress
RERANK_BYTES = 64 << 20  # candidate vectors gathered at once when re-ranking ivf_pq results


# ---------------------------------------------------------------------------- the factory


def check_spec(spec: IndexParams, dim: int) -> None:
    """Knob combinations pydantic cannot check alone (they depend on the embedding dim)."""
    if spec.type == "ivf_pq":
        p = spec.ivf_pq
        if dim % p.m:
            divisors = [m for m in (4, 8, 16, 32, 64) if dim % m == 0]
            raise ValueError(f"index.ivf_pq.m = {p.m} must divide the embedding dimension {dim}; try one of {divisors}")
        if p.nprobe > p.nlist:
            raise ValueError(f"index.ivf_pq.nprobe = {p.nprobe} exceeds index.ivf_pq.nlist = {p.nlist}; lower nprobe")


def make_faiss_index(spec: IndexParams, dim: int) -> faiss.Index:
    """An empty inner-product faiss index of `spec.type` for `dim`-d vectors (ivf_pq still untrained)."""
    check_spec(spec, dim)
    if spec.type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif spec.type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.hnsw.ef_construction
    else:
        p = spec.ivf_pq
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, p.nlist, p.m, p.nbits, faiss.METRIC_INNER_PRODUCT)
        index.set_direct_map_type(faiss.DirectMap.Array)  # row -> code, for reconstruct() in load's spot check
    set_search_knobs(index, spec)
    return index


def set_search_knobs(index: faiss.Index, spec: IndexParams) -> None:
    """Query-time knobs (no rebuild needed): HNSW efSearch, IVF nprobe."""
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = spec.hnsw.ef_search
    elif isinstance(index, faiss.IndexIVF):
        index.nprobe = min(spec.ivf_pq.nprobe, index.nlist)


def min_train_vectors(spec: IndexParams) -> int:
    """faiss k-means needs at least one vector per cell (nlist) and per PQ centroid (2**nbits)."""
    return max(spec.ivf_pq.nlist, 2**spec.ivf_pq.nbits)


def train_faiss_index(index: faiss.Index, embeddings: np.ndarray, spec: IndexParams, seed: int = 0) -> None:
    """Train an ivf_pq index on a seeded sample of at most `train_size` rows; no-op for flat/hnsw."""
    if index.is_trained:
        return
    p, need, n = spec.ivf_pq, min_train_vectors(spec), len(embeddings)
    if n < need:
        raise ValueError(
            f"index.type ivf_pq needs at least {need} vectors to train (max(nlist = {p.nlist}, 2**nbits = {2**p.nbits})), "
            f"got {n}: lower index.ivf_pq.nlist / nbits (faiss advises >= 39 * nlist vectors) or use index.type: flat"
        )
    if p.train_size < need:
        raise ValueError(
            f"index.ivf_pq.train_size = {p.train_size} is below the {need} vectors training needs; raise it"
        )
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, p.train_size), replace=False))
    index.cp.seed = index.pq.cp.seed = seed
    index.train(np.ascontiguousarray(embeddings[rows], dtype=np.float32))


def _add(index: faiss.Index, embeddings: np.ndarray, progress: str | None) -> None:
    bar = tqdm(
        total=len(embeddings),
        desc=progress,
        unit="vec",
        disable=progress is None or len(embeddings) <= ADD_CHUNK,
        mininterval=2.0,
    )
    for start in range(0, len(embeddings), ADD_CHUNK):
        chunk = np.ascontiguousarray(embeddings[start : start + ADD_CHUNK], dtype=np.float32)
        index.add(chunk)
        bar.update(len(chunk))
    bar.close()


def _checked_arrays(embeddings: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N, d] and int64 [N]; a float32 C-contiguous array (or memmap) is kept as is, not copied."""
    if not (isinstance(embeddings, np.ndarray) and embeddings.dtype == np.float32 and embeddings.flags.c_contiguous):
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"embeddings must be a non-empty [N, d] array, got shape {embeddings.shape}")
    if ids.shape != (embeddings.shape[0],):
        raise ValueError(f"ids must have shape [N] = [{embeddings.shape[0]}], got {ids.shape}")
    return embeddings, ids


# ---------------------------------------------------------------------------- the index


class DenseIndex:
    """Inner-product index over block embeddings, with an id per row.

    embeddings: [N, d] float32; ids: [N] int64. `search` returns the ids (not row numbers).
    The vectors are kept both in faiss (except ivf_pq, which keeps codes) and as `self.embeddings`
    (not copied when already float32 and C-contiguous: do not modify them afterwards), so a flat
    index takes about 2 * N * d * 4 bytes. `faiss_index` is for `load` / `build`: an index already
    holding exactly these vectors; without it the exact flat index is built.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: np.ndarray,
        meta: dict[str, Any] | None = None,
        faiss_index: faiss.Index | None = None,
        spec: IndexParams | None = None,
    ):
        self.embeddings, self.ids = _checked_arrays(embeddings, ids)  # [N, d], [N]
        self.meta: dict[str, Any] = dict(meta or {})
        self.spec = spec if spec is not None else IndexParams()
        self.shards: list[DenseIndex] = []  # set by from_shards
        if faiss_index is None:
            if self.spec.type != "flat":
                raise ValueError(
                    f"DenseIndex(...) builds only the flat index; use DenseIndex.build(embeddings, ids, spec) for {self.spec.type}"
                )
            faiss_index = make_faiss_index(self.spec, self.dim)
            faiss_index.add(self.embeddings)
        if faiss_index.ntotal != len(self) or faiss_index.d != self.dim:
            raise ValueError(
                f"faiss index holds {faiss_index.ntotal} vectors of dim {faiss_index.d}, embeddings are {self.embeddings.shape}"
            )
        self.faiss_index = faiss_index

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        ids: np.ndarray,
        spec: IndexParams | None = None,
        *,
        seed: int = 0,
        meta: dict[str, Any] | None = None,
        progress: str | None = "build index",
    ) -> DenseIndex:
        """The factory: build the faiss index `spec` (params.yaml `index`) asks for; ivf_pq trains on a sample seeded by `seed`."""
        spec = spec if spec is not None else IndexParams()
        embeddings, ids = _checked_arrays(embeddings, ids)
        index = make_faiss_index(spec, embeddings.shape[1])
        train_faiss_index(index, embeddings, spec, seed)
        _add(index, embeddings, progress)
        return cls(embeddings, ids, meta=meta, faiss_index=index, spec=spec)

    @classmethod
    def from_shards(cls, shards: Sequence[DenseIndex]) -> DenseIndex:
        """One index over shard indexes (faiss IndexShards; DESIGN.md 4): same top-k as one index of all rows.

        Shard i's rows follow shard i-1's (successive_ids). The shards' embeddings and ids are
        concatenated (a copy: memory-mapped shards are read into RAM). Save the shards, not this.
        """
        if not shards:
            raise ValueError("from_shards needs at least one shard")
        kinds = {(s.dim, s.spec.type) for s in shards}
        if len(kinds) != 1:
            raise ValueError(f"all shards must have the same dim and index type, got {sorted(kinds)}")
        combined = faiss.IndexShards(shards[0].dim, True, True)  # threaded, successive_ids
        for shard in shards:
            combined.add_shard(shard.faiss_index)
        embeddings = np.concatenate([s.embeddings for s in shards])
        ids = np.concatenate([s.ids for s in shards])
        index = cls(
            embeddings, ids, meta={"shards": [s.meta for s in shards]}, faiss_index=combined, spec=shards[0].spec
        )
        index.shards = list(shards)  # IndexShards does not own its sub-indexes: keep them alive
        return index

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores [Q, k'] float32, ids [Q, k'] int64), best first, k' = min(k, N).

        faiss pads with row -1 when k > N (clipped away here) or when an approximate index finds
        fewer than k candidates (e.g. few IVF cells probed): those queries fall back to exact search,
        so every row holds k' real ids. ivf_pq scores are exact inner products after re-ranking.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape [Q, {self.dim}], got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), len(self))
        refine = self.spec.ivf_pq.refine_factor if self.spec.type == "ivf_pq" else 1
        fetch = min(k * refine, len(self))
        scores, rows = self.faiss_index.search(queries, fetch)  # [Q, fetch], [Q, fetch] row numbers
        short = (rows < 0).any(axis=1)
        if short.any():
            scores[short], rows[short] = faiss.knn(
                queries[short], self.embeddings, fetch, metric=faiss.METRIC_INNER_PRODUCT
            )
        if self.spec.type == "ivf_pq":
            scores, rows = self._rerank(queries, rows, k)
        return scores.astype(np.float32, copy=False), self.ids[rows]

    def _rerank(self, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """PQ distances are approximate: order the candidates by the exact inner product with the stored vectors.

        Queries go in chunks so the gathered candidates stay under ~64 MB (k = 5000 with
        refine_factor 10 is 50k candidates, 25 MB, per query).
        """
        step = max(1, RERANK_BYTES // (rows.shape[1] * self.dim * 4))
        scores, best = np.empty((len(rows), k), np.float32), np.empty((len(rows), k), np.int64)
        for s in range(0, len(rows), step):
            candidates = self.embeddings[rows[s : s + step]]  # [q, fetch, d]; a memmap reads only these rows
            exact = np.einsum("qd,qkd->qk", queries[s : s + step], candidates)  # [q, fetch]
            order = np.argsort(-exact, axis=1, kind="stable")[:, :k]  # [q, k]
            scores[s : s + step] = np.take_along_axis(exact, order, axis=1)
            best[s : s + step] = np.take_along_axis(rows[s : s + step], order, axis=1)
        return scores, best

    def save(self, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write the index atomically to `directory` (replacing it); `meta` (e.g. {"step": 500}) goes to index.json."""
        if self.shards:
            raise ValueError(
                "a sharded DenseIndex is saved shard by shard: call .save() on each of .shards, read them back with DenseIndex.load_shards"
            )
        if meta is not None:
            self.meta = dict(meta)
        directory = Path(directory)
        header = {
            "format": FORMAT_VERSION,
            "dim": self.dim,
            "count": len(self),
            "meta": self.meta,
            "index": self.spec.model_dump(exclude={"mmap"}),
        }
        with atomic_dir(directory) as tmp:
            faiss.write_index(self.faiss_index, str(tmp / "index.faiss"))
            np.save(tmp / "ids.npy", np.asarray(self.ids), allow_pickle=False)
            np.save(tmp / "embeddings.npy", np.asarray(self.embeddings), allow_pickle=False)
            write_json(tmp / "index.json", header)
        return directory

    @classmethod
    def load(cls, directory: str | Path, spec: IndexParams | None = None) -> DenseIndex:
        """Read an index written by `save`; raise ValueError naming `directory` if anything disagrees.

        `spec` (params.yaml `index`) must name the saved type and build knobs; its query-time knobs
        (ef_search, nprobe, refine_factor) and `mmap` apply. Without it: the saved knobs, no mmap.
        """
        directory = Path(directory)
        missing = [name for name in FILES if not (directory / name).is_file()]
        if missing:
            raise ValueError(f"{directory}: not a saved DenseIndex (missing {', '.join(missing)}); rebuild the index")
        try:
            header = json.loads((directory / "index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"{directory}: unreadable index.json ({type(exc).__name__}: {exc}); rebuild the index"
            ) from None
        saved = _saved_spec(directory, header)
        spec = _resolve_spec(directory, saved, spec)
        try:
            ids = np.load(directory / "ids.npy", allow_pickle=False, mmap_mode="r" if spec.mmap else None)
            embeddings = np.load(directory / "embeddings.npy", allow_pickle=False, mmap_mode="c" if spec.mmap else None)
            faiss_index = faiss.read_index(str(directory / "index.faiss"), _mmap_flags(saved.type) if spec.mmap else 0)
        except (OSError, ValueError, RuntimeError) as exc:  # faiss raises RuntimeError on a bad file
            raise ValueError(
                f"{directory}: unreadable index file ({type(exc).__name__}: {exc}); rebuild the index"
            ) from None
        _check_consistent(directory, header, saved.type, ids, embeddings, faiss_index)
        set_search_knobs(faiss_index, spec)
        return cls(embeddings, ids, meta=header.get("meta"), faiss_index=faiss_index, spec=spec)

    @classmethod
    def load_shards(cls, directories: Sequence[str | Path], spec: IndexParams | None = None) -> DenseIndex:
        """Load shard indexes saved one per directory and search them as one (`from_shards`)."""
        return cls.from_shards([cls.load(d, spec) for d in directories])


# ---------------------------------------------------------------------------- load helpers


def _saved_spec(directory: Path, header: Any) -> IndexParams:
    """The index type and knobs index.json records; saves from before index.type were flat."""
    recorded = header.get("index") if isinstance(header, dict) else None
    if recorded is None:
        return IndexParams()
    try:
        return IndexParams.model_validate(recorded)
    except ValidationError as exc:
        raise ValueError(
            f"{directory}/index.json: bad 'index' section ({exc.errors()[0]['msg']}); rebuild the index"
        ) from None


def _resolve_spec(directory: Path, saved: IndexParams, requested: IndexParams | None) -> IndexParams:
    """The requested spec, if it describes the saved index (same type and build knobs)."""
    if requested is None:
        return saved
    if requested.type != saved.type:
        raise ValueError(
            f"{directory}: holds a {saved.type} index but index.type is {requested.type}; rebuild the index with the current params or set index.type: {saved.type}"
        )
    for knob in BUILD_KNOBS.get(saved.type, ()):
        have, want = getattr(getattr(saved, saved.type), knob), getattr(getattr(requested, saved.type), knob)
        if have != want:
            raise ValueError(
                f"{directory}: built with index.{saved.type}.{knob} = {have} but params say {want}; rebuild the index with the current params"
            )
    return requested


def _mmap_flags(index_type: str) -> int:
    """IVF inverted lists map with IO_FLAG_MMAP; flat / HNSW vector storage with IO_FLAG_MMAP_IFC (faiss >= 1.11)."""
    if index_type == "ivf_pq":
        return faiss.IO_FLAG_MMAP
    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", None)
    if flag is None:
        warnings.warn(
            f"faiss {faiss.__version__} cannot memory-map a {index_type} index; reading it into RAM (upgrade faiss-cpu)",
            stacklevel=3,
        )
        return 0
    return flag


def _rows_match(index_type: str, faiss_index: faiss.Index, embeddings: np.ndarray, row: int) -> bool:
    """Does row `row` of the faiss index hold embeddings[row]? PQ rows hold its code, so compare decoded codes."""
    stored = faiss_index.reconstruct(row)
    vector = np.ascontiguousarray(embeddings[row : row + 1], dtype=np.float32)
    if index_type != "ivf_pq":
        return bool(np.array_equal(stored, vector[0]))
    batch = np.repeat(vector, 32, axis=0)  # a batch, as add() assigned cells (the BLAS path)
    expected = faiss_index.sa_decode(faiss_index.sa_encode(batch))[0]
    return bool(np.allclose(stored, expected, rtol=1e-4, atol=1e-5))


def _check_consistent(
    directory: Path,
    header: dict[str, Any],
    index_type: str,
    ids: np.ndarray,
    embeddings: np.ndarray,
    faiss_index: faiss.Index,
) -> None:
    """The four files must describe the same N vectors of the same dimension (DPR checks id map vs index size)."""
    problems = []
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        problems.append(f"index.json is not format {FORMAT_VERSION}: {header!r:.200}")
    if ids.dtype != np.int64 or ids.ndim != 1:
        problems.append(f"ids.npy is {ids.dtype} {ids.shape}, expected int64 [N]")
    if embeddings.dtype != np.float32 or embeddings.ndim != 2:
        problems.append(f"embeddings.npy is {embeddings.dtype} {embeddings.shape}, expected float32 [N, d]")
    expected = FAISS_TYPES[index_type]
    if not isinstance(faiss_index, expected):
        problems.append(
            f"index.faiss holds a {type(faiss_index).__name__}, expected {expected.__name__} (index.json says {index_type})"
        )
    if problems:  # wrong kinds of file: sizes are meaningless
        raise ValueError(f"{directory}: inconsistent DenseIndex: " + "; ".join(problems) + "; rebuild the index")
    counts = {
        "ids.npy": len(ids),
        "embeddings.npy": len(embeddings),
        "index.faiss": faiss_index.ntotal,
        "index.json": header.get("count"),
    }
    if len(ids) == 0:
        problems.append("ids.npy is empty")
    if len(set(counts.values())) != 1:
        problems.append("row counts disagree: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    dims = {"embeddings.npy": embeddings.shape[1], "index.faiss": faiss_index.d, "index.json": header.get("dim")}
    if len(set(dims.values())) != 1:
        problems.append("dimensions disagree: " + ", ".join(f"{k}={v}" for k, v in dims.items()))
    if not problems:  # same vectors? compare the first and last rows (cheap spot check)
        for row in sorted({0, len(ids) - 1}):
            if not _rows_match(index_type, faiss_index, embeddings, row):
                problems.append(f"row {row} of index.faiss differs from embeddings.npy")
    if problems:
        raise ValueError(f"{directory}: inconsistent DenseIndex: " + "; ".join(problems) + "; rebuild the index")
