"""Scale-out of the shard maps: shard/merge functions, the task runner factory, and the embedding
flow on a real Dask LocalCluster of 2 worker processes (DESIGN.md 4).

The sharded index must equal the single-process one: same ids, embeddings within 1e-5
(pyserini's test: encode a tiny corpus in 2 shards, merge, compare with the unsharded result).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from realm_core.blocks import BlockStore, embed_blocks
from realm_core.config import Params, RunnerParams
from realm_core.index import DenseIndex
from realm_core.modeling import Retriever, load_embedder, load_tokenizer, save_embedder
from realm_core.sharding import Shard, embed_shard, load_shard, merge_shards, save_shard, shard_range
from tests.tiny import make_tiny_bert, write_blocks

CPU = torch.device("cpu")


def test_shard_ranges_cover_every_id_once_in_order():
    for total in range(0, 13):
        for n in range(1, 6):
            parts = [shard_range(total, i, n) for i in range(n)]
            assert [i for r in parts for i in r] == list(range(total))
            assert max(len(r) for r in parts) - min(len(r) for r in parts) <= 1
    with pytest.raises(ValueError, match="shard must be in 0..1"):
        shard_range(10, 2, 2)


@pytest.mark.parametrize("num_shards", [2, 3, 11])
def test_shards_merged_equal_the_unsharded_embeddings(tiny, tmp_path, num_shards):
    """pyserini's pattern; 11 shards of 10 blocks leaves one shard empty."""
    bert, store = tiny
    torch.manual_seed(0)
    doc = Retriever.from_backbone(bert, None, 16).doc
    full = embed_blocks(doc, store, CPU, batch_size=3, progress=None)  # [N, d]
    files = [
        save_shard(
            embed_shard(doc, store.blocks, store.tokenizer, store.max_block_tokens, i, num_shards, CPU, batch_size=3),
            tmp_path / f"{i}.safetensors",
        )
        for i in range(num_shards)
    ]
    emb, ids = merge_shards([load_shard(f) for f in reversed(files)])  # order of arrival does not matter
    assert ids.tolist() == list(range(len(store)))
    np.testing.assert_allclose(emb, full, atol=1e-5, rtol=0)


def _shard(index: int, num_shards: int, total: int, source: str = "s") -> Shard:
    r = shard_range(total, index, num_shards)
    return Shard(
        index,
        num_shards,
        total,
        np.arange(r.start, r.stop, dtype=np.int64),
        np.ones((len(r), 4), np.float32),
        source=source,
    )


def test_merge_rejects_missing_repeated_foreign_and_wrong_shards(tmp_path):
    good = [_shard(0, 2, 5), _shard(1, 2, 5)]
    assert merge_shards(good)[1].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"missing shard\(s\) \[1\] of 2"):
        merge_shards(good[:1])
    with pytest.raises(ValueError, match="shard 0 given twice"):
        merge_shards([good[0], good[0], good[1]])
    with pytest.raises(ValueError, match="shards disagree: a is one of 2 shards of 5 blocks, b one of 3 of 5"):
        merge_shards([_shard(0, 2, 5, "a"), _shard(1, 3, 5, "b")])
    wrong = _shard(1, 2, 5, "w")
    wrong.ids = wrong.ids[::-1].copy()
    with pytest.raises(ValueError, match="w: shard 1 should hold block ids 3..4 in order"):
        merge_shards([good[0], wrong])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a shard")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable shard file"):
        load_shard(bad)


def test_runner_factory_returns_the_engine_asked_for(monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.runners import make_task_runner

    thread = make_task_runner(RunnerParams(type="thread", workers=3))
    assert isinstance(thread, ThreadPoolTaskRunner) and thread._max_workers == 3
    local = make_task_runner(RunnerParams(type="dask", workers=2))
    assert (
        isinstance(local, DaskTaskRunner)
        and local.cluster_kwargs["n_workers"] == 2
        and local.cluster_kwargs["threads_per_worker"] == 1
    )
    remote = make_task_runner(RunnerParams(type="dask", address="tcp://10.0.0.1:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.1:8786"
    try:
        from prefect_ray import RayTaskRunner
    except ImportError:
        RayTaskRunner = None
    if RayTaskRunner is not None:
        ray = make_task_runner(RunnerParams(type="ray", address="ray://head:10001"))
        assert isinstance(ray, RayTaskRunner) and ray.address == "ray://head:10001"
        assert make_task_runner(RunnerParams(type="ray", workers=2)).init_kwargs["num_cpus"] == 2
    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # as if prefect-ray were not installed
    with pytest.raises(
        ImportError, match=r"needs prefect-ray, which is not installed; run: pip install -e '\.\[ray\]'"
    ):
        make_task_runner(RunnerParams(type="ray"))


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect API server for the session (entering it takes ~12 s)."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.timeout(300)
def test_embedding_flow_on_a_dask_local_cluster_equals_the_single_process_index(prefect_api, tmp_path):
    from flows.embedding import build_index

    bert = make_tiny_bert(tmp_path / "bert")
    blocks = write_blocks(tmp_path / "blocks.jsonl")
    torch.manual_seed(1)
    save_embedder(Retriever.from_backbone(bert, None, 16).doc, tmp_path / "doc")
    params = Params.model_validate(
        {
            "model": {"backbone": str(bert), "num_hidden_layers": None},
            "corpus": {"shards": 2, "max_block_tokens": 64},
            "pretrain": {"embed_batch_size": 3},
            "runner": {"type": "dask", "workers": 2},
            "index": {
                "embed_precision": "fp32"
            },  # exact equality needs one kernel; tests/test_embed_precision.py checks the others
        }
    )
    index_dir = build_index(
        params, blocks, tmp_path / "doc", tmp_path / "index", tmp_path / "shards", {"source": "test"}
    )

    index = DenseIndex.load(index_dir)
    store = BlockStore.load(blocks, load_tokenizer(bert), 64)
    single = embed_blocks(
        load_embedder(tmp_path / "doc"), store, CPU, batch_size=3, progress=None
    )  # one process, unsharded
    assert index.ids.tolist() == list(range(len(store)))
    np.testing.assert_allclose(index.embeddings, single, atol=1e-5, rtol=0)
    # The shards really ran in 2 Dask worker processes, not in this one.
    workers = [s["worker"] for s in index.meta["shards"]]
    assert [s["shard"] for s in index.meta["shards"]] == [0, 1]
    assert len(set(workers)) == 2 and not any(w.endswith(f":{os.getpid()}") for w in workers), workers
    assert (
        index.meta["source"] == "test"
        and index.meta["embed_precision"] == "fp32"
        and not list((tmp_path / "shards").iterdir())
    )


def test_transient_failures_are_told_apart_from_permanent_ones():
    import errno
    import sqlite3

    from mlflow.exceptions import MlflowException

    from realm_core.io import InputError
    from tasks.retry import is_transient

    transient = [
        ConnectionError("reset by peer"),
        TimeoutError("timed out"),
        OSError(errno.EIO, "I/O error"),
        OSError(errno.ESTALE, "stale NFS handle"),
        sqlite3.OperationalError("database is locked"),
        MlflowException("(sqlite3.OperationalError) database is locked"),
    ]
    permanent = [
        InputError("corpus.tsv:3: no text column"),
        FileNotFoundError("data/corpus/blocks.jsonl"),
        OSError(errno.ENOENT, "No such file"),
        PermissionError("read-only"),
        OSError(errno.ENOSPC, "No space left on device"),
        ValueError("a bug"),
        MlflowException("Registered model alias champion not found"),
        None,
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


def test_the_io_tasks_retry_transient_failures_only():
    from flows.evaluate import promote
    from flows.finetune import register_model
    from tasks.corpus import read_passages_task, write_corpus_task
    from tasks.embedding import merge_shards_task
    from tasks.retry import retry_transient
    from tasks.training import finetune_task, pretrain_task

    for t in (read_passages_task, write_corpus_task, merge_shards_task, register_model, promote):
        assert t.retries == 2 and t.retry_condition_fn is retry_transient, t.name
    for t in (pretrain_task, finetune_task):  # training resumes from its checkpoints instead
        assert t.retries == 0


@pytest.mark.timeout(120)
def test_a_transient_failure_is_retried_and_a_permanent_one_fails_at_once(prefect_api):
    from prefect import flow, task

    from realm_core.io import InputError
    from tasks.retry import IO_RETRIES

    calls = {"flaky": 0, "bad": 0}

    @task(**{**IO_RETRIES, "retry_delay_seconds": 0})
    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("the tracking server dropped the connection")
        return "written"

    @task(**{**IO_RETRIES, "retry_delay_seconds": 0})
    def bad() -> None:
        calls["bad"] += 1
        raise InputError("corpus.tsv:3: no text column")

    @flow
    def io_flow() -> str:
        return flaky()

    @flow
    def bad_flow() -> None:
        bad()

    assert io_flow() == "written" and calls["flaky"] == 2
    with pytest.raises(InputError, match="no text column"):
        bad_flow()
    assert calls["bad"] == 1
