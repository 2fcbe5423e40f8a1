"""DenseIndex: exact MIPS equals brute force, a safe save/load round trip, clear errors, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from realm_core.index import DenseIndex


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
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["embeddings.npy", "ids.npy", "index.faiss", "index.json"]
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
