"""DenseIndex: exact MIPS equals brute force, a safe save/load round trip, clear errors, atomic writes;
the index types (flat / hnsw / ivf_pq), shards equal one index, mmap equals in-memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest
from pydantic import ValidationError

import realm_core.index as index_module
from realm_core.config import IndexParams
from realm_core.index import FAISS_TYPES, DenseIndex


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread() -> Iterator[None]:
    """faiss's OpenMP k-means on a few thousand vectors is ~15x slower with 2 threads than 1 when
    other processes share the 2 cores (spinning barriers); results do not depend on it."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _random_index(n: int = 200, d: int = 16, seed: int = 0) -> tuple[DenseIndex, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    ids = rng.permutation(np.arange(1000, 1000 + n)).astype(np.int64)  # ids are not row numbers
    return DenseIndex(emb, ids), emb, ids


def test_search_equals_brute_force_top_k() -> None:
    index, emb, ids = _random_index()
    queries = np.random.default_rng(1).standard_normal((7, emb.shape[1])).astype(np.float32)
    scores, got = index.search(queries, 10)
    assert scores.shape == got.shape == (7, 10)
    assert scores.dtype == np.float32 and got.dtype == np.int64
    brute = queries @ emb.T  # [Q, N]
    rows = np.argsort(-brute, axis=1)[:, :10]  # random floats: no ties
    np.testing.assert_array_equal(got, ids[rows])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, rows, axis=1), rtol=1e-5, atol=1e-5)


def test_k_is_clipped_to_the_index_size_and_inputs_are_checked() -> None:
    index, emb, ids = _random_index(n=5, d=4)
    scores, got = index.search(emb[:2], 50)
    assert got.shape == (2, 5) and (got >= 1000).all()  # no faiss -1 padding
    assert np.isfinite(scores).all()
    assert all(sorted(row) == sorted(ids) for row in got.tolist())  # all N rows, each once
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    with pytest.raises(ValueError, match=r"\[Q, 4\]"):
        index.search(np.zeros((2, 3), np.float32), 1)
    with pytest.raises(ValueError, match="k must be"):
        index.search(emb[:1], 0)
    with pytest.raises(ValueError, match="ids must have shape"):
        DenseIndex(emb, ids[:3])


def test_save_load_round_trip(tmp_path: Path) -> None:
    index, emb, ids = _random_index(n=50, d=8)
    index.save(tmp_path / "index", meta={"step": 500, "source": "test"})
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "embeddings.npy",
        "ids.npy",
        "index.faiss",
        "index.json",
    ]
    header = json.loads((tmp_path / "index" / "index.json").read_text())
    assert (header["dim"], header["count"], header["meta"]) == (8, 50, {"step": 500, "source": "test"})

    loaded = DenseIndex.load(tmp_path / "index")
    np.testing.assert_array_equal(loaded.embeddings, emb)
    np.testing.assert_array_equal(loaded.ids, ids)
    assert loaded.meta == {"step": 500, "source": "test"}
    queries = emb[:4] + 0.01
    for a, b in zip(index.search(queries, 6), loaded.search(queries, 6)):
        np.testing.assert_array_equal(a, b)
    assert not list(tmp_path.glob(".index.tmp-*"))


def _save(tmp_path: Path) -> Path:
    _random_index(n=20, d=4)[0].save(tmp_path / "index", meta={"step": 1})
    return tmp_path / "index"


def test_mismatched_id_map_is_a_clear_error(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    np.save(directory / "ids.npy", np.arange(19, dtype=np.int64))
    with pytest.raises(ValueError, match=r"index.*row counts disagree.*ids.npy=19.*embeddings.npy=20") as info:
        DenseIndex.load(directory)
    assert str(directory) in str(info.value)


def test_different_vectors_in_faiss_and_npy_is_an_error(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    other = faiss.IndexFlatIP(4)
    other.add(np.ones((20, 4), np.float32))
    faiss.write_index(other, str(directory / "index.faiss"))
    with pytest.raises(ValueError, match="differs from embeddings.npy"):
        DenseIndex.load(directory)


def test_corrupted_or_incomplete_directory_is_a_clear_error(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    (directory / "index.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(ValueError, match=rf"{directory}: unreadable index file"):
        DenseIndex.load(directory)
    (directory / "embeddings.npy").unlink()
    with pytest.raises(ValueError, match=r"missing embeddings.npy"):
        DenseIndex.load(directory)
    with pytest.raises(ValueError, match="missing"):
        DenseIndex.load(tmp_path / "nowhere")


def test_pickled_arrays_are_refused(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    np.save(directory / "ids.npy", np.array([object()] * 20), allow_pickle=True)
    with pytest.raises(ValueError, match="unreadable index file"):
        DenseIndex.load(directory)


def test_failed_save_leaves_the_old_index_and_no_partial_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _save(tmp_path)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _random_index(n=30, d=4, seed=3)[0].save(directory, meta={"step": 2})
    with pytest.raises(OSError, match="disk full"):
        _random_index(n=30, d=4, seed=3)[0].save(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temp dir, no "fresh"
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


# ---------------------------------------------------------------------------- index.type: flat / hnsw / ivf_pq

SPECS = {
    "flat": IndexParams(),
    "hnsw": IndexParams.model_validate({"type": "hnsw", "hnsw": {"m": 16, "ef_construction": 40, "ef_search": 64}}),
    "ivf_pq": IndexParams.model_validate(
        {
            "type": "ivf_pq",
            "ivf_pq": {"nlist": 32, "m": 8, "nbits": 6, "nprobe": 8, "refine_factor": 10, "train_size": 4000},
        }
    ),
}


def _clustered(n: int, d: int = 32, clusters: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Base vectors and 200 queries from one Gaussian mixture (DESIGN.md 3b: approximate recall is
    meaningless on random vectors, where every point is about equally far from every other)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    draw = lambda m: (centres[rng.integers(0, clusters, m)] + 0.3 * rng.standard_normal((m, d))).astype(np.float32)  # noqa: E731
    return draw(n), draw(200)


def _recall_at(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(got.tolist(), exact.tolist())]))


@pytest.mark.parametrize("kind", list(SPECS))
def test_each_type_builds_searches_saves_and_loads(tmp_path: Path, kind: str) -> None:
    emb, queries = _clustered(3000)
    ids = np.arange(3000, dtype=np.int64)[::-1] + 100  # ids are not row numbers
    index = DenseIndex.build(emb, ids, SPECS[kind], seed=5, meta={"step": 3})
    assert isinstance(index.faiss_index, FAISS_TYPES[kind])
    scores, got = index.search(queries, 10)
    assert scores.shape == got.shape == (200, 10) and scores.dtype == np.float32 and got.dtype == np.int64
    assert np.isin(got, ids).all() and all(len(set(row)) == 10 for row in got.tolist())
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    rows = got - 100  # reversed ids -> rows
    np.testing.assert_allclose(
        scores, np.einsum("qd,qkd->qk", queries, emb[2999 - rows]), rtol=1e-4, atol=1e-4
    )  # true inner products

    index.save(tmp_path / "index")
    header = json.loads((tmp_path / "index" / "index.json").read_text())
    assert header["index"]["type"] == kind and "mmap" not in header["index"]
    for loaded in (DenseIndex.load(tmp_path / "index"), DenseIndex.load(tmp_path / "index", SPECS[kind])):
        assert loaded.spec.type == kind and loaded.meta == {"step": 3}
        for a, b in zip(index.search(queries, 10), loaded.search(queries, 10)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["hnsw", "ivf_pq"])
def test_approximate_types_reach_recall_at_10_on_clustered_data(kind: str) -> None:
    emb, queries = _clustered(5000, seed=1)
    ids = np.arange(5000, dtype=np.int64)
    _, exact = DenseIndex(emb, ids).search(queries, 10)
    _, got = DenseIndex.build(emb, ids, SPECS[kind], seed=2).search(queries, 10)
    assert _recall_at(got, exact) >= 0.9


def test_ivf_pq_without_reranking_is_worse_and_reranking_restores_recall() -> None:
    """refine_factor is what makes PQ usable: PQ order alone loses neighbours inside a cluster."""
    emb, queries = _clustered(5000, d=64, seed=3)
    ids = np.arange(5000, dtype=np.int64)
    _, exact = DenseIndex(emb, ids).search(queries, 10)
    coarse = SPECS["ivf_pq"].model_copy(
        update={"ivf_pq": SPECS["ivf_pq"].ivf_pq.model_copy(update={"m": 4, "refine_factor": 1})}
    )
    fine = coarse.model_copy(update={"ivf_pq": coarse.ivf_pq.model_copy(update={"refine_factor": 10})})
    pq_only = _recall_at(DenseIndex.build(emb, ids, coarse).search(queries, 10)[1], exact)
    reranked = _recall_at(DenseIndex.build(emb, ids, fine).search(queries, 10)[1], exact)
    assert pq_only < 0.9 <= reranked


def test_ivf_pq_training_is_seeded() -> None:
    emb, queries = _clustered(3000, seed=4)
    ids = np.arange(3000, dtype=np.int64)
    a, b = (DenseIndex.build(emb, ids, SPECS["ivf_pq"], seed=7) for _ in range(2))
    np.testing.assert_array_equal(
        a.faiss_index.quantizer.reconstruct_n(0, 32), b.faiss_index.quantizer.reconstruct_n(0, 32)
    )
    np.testing.assert_array_equal(a.search(queries, 5)[1], b.search(queries, 5)[1])


def test_too_few_ivf_candidates_fall_back_to_exact_search() -> None:
    """nprobe = 1 over 32 cells: a cell holds ~90 vectors, so k = 200 cannot be filled from it."""
    emb, queries = _clustered(3000, seed=5)
    ids = np.arange(3000, dtype=np.int64) + 1
    spec = SPECS["ivf_pq"].model_copy(
        update={"ivf_pq": SPECS["ivf_pq"].ivf_pq.model_copy(update={"nprobe": 1, "refine_factor": 1})}
    )
    index = DenseIndex.build(emb, ids, spec)
    assert (index.faiss_index.search(queries, 200)[1] < 0).any()  # faiss itself pads with -1
    scores, got = index.search(queries, 200)
    assert (got > 0).all() and all(len(set(row)) == 200 for row in got.tolist())
    assert np.isfinite(scores).all()


# ---------------------------------------------------------------------------- shards and mmap


def test_two_shards_equal_the_unsharded_flat_index(tmp_path: Path) -> None:
    """pyserini's pattern: index the corpus in 2 shards, search them as one, compare with one index."""
    rng = np.random.default_rng(6)
    emb = rng.standard_normal((301, 16)).astype(np.float32)
    ids = rng.permutation(np.arange(5000, 5301)).astype(np.int64)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    whole = DenseIndex.build(emb, ids)
    cut = 120  # uneven shards
    shards = [
        DenseIndex.build(emb[:cut], ids[:cut], meta={"shard": 0}),
        DenseIndex.build(emb[cut:], ids[cut:], meta={"shard": 1}),
    ]
    sharded = DenseIndex.from_shards(shards)
    assert isinstance(sharded.faiss_index, faiss.IndexShards) and len(sharded) == 301
    for k in (1, 10, 200, 301):  # 200 > the first shard's 120 rows
        w_scores, w_ids = whole.search(queries, k)
        s_scores, s_ids = sharded.search(queries, k)
        np.testing.assert_array_equal(s_ids, w_ids)
        np.testing.assert_allclose(s_scores, w_scores, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(sharded.embeddings, emb)

    with pytest.raises(ValueError, match="saved shard by shard"):
        sharded.save(tmp_path / "all")
    dirs = [s.save(tmp_path / f"shard-{i}") for i, s in enumerate(shards)]
    reloaded = DenseIndex.load_shards(dirs, IndexParams(mmap=True))
    np.testing.assert_array_equal(reloaded.search(queries, 10)[1], whole.search(queries, 10)[1])
    with pytest.raises(ValueError, match="same dim and index type"):
        DenseIndex.from_shards([shards[0], DenseIndex(emb[:, :8], ids)])


@pytest.mark.parametrize("kind", list(SPECS))
def test_mmap_load_equals_in_memory_load(tmp_path: Path, kind: str) -> None:
    emb, queries = _clustered(3000, seed=7)
    DenseIndex.build(emb, np.arange(3000, dtype=np.int64), SPECS[kind]).save(tmp_path / "index")
    in_ram = DenseIndex.load(tmp_path / "index", SPECS[kind])
    mapped = DenseIndex.load(tmp_path / "index", SPECS[kind].model_copy(update={"mmap": True}))
    assert isinstance(mapped.embeddings, np.memmap) and not isinstance(in_ram.embeddings, np.memmap)
    assert mapped.embeddings.flags.writeable  # copy-on-write: torch.from_numpy takes it without a warning
    np.testing.assert_array_equal(mapped.embeddings, in_ram.embeddings)
    for a, b in zip(in_ram.search(queries, 10), mapped.search(queries, 10)):
        np.testing.assert_array_equal(a, b)


def test_saves_without_an_index_section_still_load_as_flat(tmp_path: Path) -> None:
    """Indexes saved before index.type existed (the pipeline's data/) have no "index" in index.json."""
    index, emb, _ = _random_index(n=40, d=8)
    index.save(tmp_path / "index", meta={"step": 9})
    header_file = tmp_path / "index" / "index.json"
    header = json.loads(header_file.read_text())
    del header["index"]
    header_file.write_text(json.dumps(header))
    for spec in (None, IndexParams(), IndexParams(mmap=True)):
        loaded = DenseIndex.load(tmp_path / "index", spec)
        assert loaded.spec.type == "flat" and loaded.meta == {"step": 9}
        np.testing.assert_array_equal(loaded.search(emb[:3], 5)[1], index.search(emb[:3], 5)[1])


# ---------------------------------------------------------------------------- bad knobs


def test_bad_knobs_are_clear_errors(tmp_path: Path) -> None:
    emb, _ = _clustered(500)
    ids = np.arange(500, dtype=np.int64)
    ivf = SPECS["ivf_pq"]

    def with_ivf(**knobs: int) -> IndexParams:
        return ivf.model_copy(update={"ivf_pq": ivf.ivf_pq.model_copy(update=knobs)})

    with pytest.raises(
        ValueError, match=r"index.ivf_pq.m = 12 must divide the embedding dimension 32; try one of \[4, 8, 16, 32\]"
    ):
        DenseIndex.build(emb, ids, with_ivf(m=12))
    with pytest.raises(ValueError, match="nprobe = 64 exceeds index.ivf_pq.nlist = 32"):
        DenseIndex.build(emb, ids, with_ivf(nprobe=64))
    with pytest.raises(
        ValueError, match=r"needs at least 1024 vectors to train \(max\(nlist = 1024, 2\*\*nbits = 64\)\), got 500"
    ):
        DenseIndex.build(emb, ids, with_ivf(nlist=1024, nprobe=8))
    with pytest.raises(ValueError, match="train_size = 40 is below the 64 vectors"):
        DenseIndex.build(emb, ids, with_ivf(train_size=40))
    with pytest.raises(ValidationError, match="type"):
        IndexParams.model_validate({"type": "ivf_flat"})
    with pytest.raises(ValidationError, match="nbits"):
        IndexParams.model_validate({"ivf_pq": {"nbits": 17}})
    with pytest.raises(ValueError, match="use DenseIndex.build"):
        DenseIndex(emb, ids, spec=SPECS["hnsw"])

    DenseIndex.build(emb, ids, SPECS["hnsw"]).save(tmp_path / "hnsw")
    with pytest.raises(ValueError, match=r"hnsw: holds a hnsw index but index.type is flat"):
        DenseIndex.load(tmp_path / "hnsw", IndexParams())
    other_m = SPECS["hnsw"].model_copy(update={"hnsw": SPECS["hnsw"].hnsw.model_copy(update={"m": 8})})
    with pytest.raises(ValueError, match=r"built with index.hnsw.m = 16 but params say 8"):
        DenseIndex.load(tmp_path / "hnsw", other_m)
    faster = SPECS["hnsw"].model_copy(update={"hnsw": SPECS["hnsw"].hnsw.model_copy(update={"ef_search": 16})})
    assert DenseIndex.load(tmp_path / "hnsw", faster).faiss_index.hnsw.efSearch == 16  # query-time knobs apply


def test_ivf_pq_codes_of_other_vectors_are_detected(tmp_path: Path) -> None:
    emb, _ = _clustered(3000, seed=8)
    directory = DenseIndex.build(emb, np.arange(3000, dtype=np.int64), SPECS["ivf_pq"]).save(tmp_path / "index")
    np.save(directory / "embeddings.npy", emb[::-1].copy())
    with pytest.raises(ValueError, match="differs from embeddings.npy"):
        DenseIndex.load(directory)


def test_reranking_in_chunks_gives_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    emb, queries = _clustered(3000, seed=9)
    index = DenseIndex.build(emb, np.arange(3000, dtype=np.int64), SPECS["ivf_pq"])
    whole = index.search(queries, 20)
    monkeypatch.setattr(index_module, "RERANK_BYTES", 1)  # one query per chunk
    for a, b in zip(whole, index.search(queries, 20)):
        np.testing.assert_array_equal(a, b)
