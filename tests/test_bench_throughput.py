"""bench/throughput.py --quick on tiny inputs: every section runs, the JSON has its schema, every
ratio is finite and positive, and the comparisons are fair (same wordpieces, same weights). It
never asserts on speed: on a shared 2-core machine any speed is possible."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml

from realm_core.blocks import BlockStore
from realm_core.config import Params
from realm_core.modeling import KnowledgeAugmentedEncoder, Retriever, load_tokenizer, save_encoder, save_retriever
from realm_core.refresh import build_index
from tests.conftest import CPU
from tests.tiny import make_tiny_bert, write_blocks

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    {"question": "what is the capital of france?", "answer": ["Paris"]},
    {"question": "when did the berlin wall fall?", "answer": ["1989"]},
]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "bench" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mlflow_store(uri: str, experiment: str) -> None:
    """A default pipeline run (ict 30 s, pretrain 50 s) and a `dvc exp run` experiment whose pretrain (99 s) must be ignored."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment(experiment)
    t0 = int(time.time() * 1000) - 3_600_000
    for name, command, stages in (
        ("pipeline-a", "dvc repro", {"ict": 30, "pretrain": 50}),
        ("abl-x", "dvc exp run --temp", {"pretrain": 99}),
    ):
        parent = client.create_run(
            exp, run_name=name, start_time=t0, tags={"realm.stage": "pipeline", "dvc.command": command}
        )
        start = t0 + 1000
        for stage, seconds in stages.items():
            kid = client.create_run(
                exp,
                run_name=stage,
                start_time=start,
                tags={"realm.stage": stage, "mlflow.parentRunId": parent.info.run_id},
            )
            client.set_terminated(kid.info.run_id, end_time=start + seconds * 1000)
            start += seconds * 1000 + 1000
        client.set_terminated(parent.info.run_id, end_time=start + 5000)
        t0 = start + 10_000


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    """Tiny stand-ins for what the pipeline leaves in data/: blocks, ICT and pre-training outputs, the index, questions."""
    root = tmp_path_factory.mktemp("throughput")
    bert = make_tiny_bert(root / "bert")
    params = Params.model_validate(
        {
            "model": {"backbone": str(bert), "num_hidden_layers": None, "max_query_tokens": 32},
            "corpus": {"max_block_tokens": 64},
        }
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
    store = BlockStore.load(write_blocks(root / "blocks.jsonl"), load_tokenizer(bert), 64)
    torch.manual_seed(0)
    retriever = Retriever.from_backbone(bert, None, 16, "mean")
    for stage in ("ict", "pretrain"):
        save_retriever(retriever, root / stage / "retriever")
        save_encoder(KnowledgeAugmentedEncoder.from_backbone(bert, None), root / stage / "encoder")
    build_index(retriever.doc, store, CPU, 4, progress=None).save(root / "index")
    (root / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return root, store


def test_quick_run_writes_every_section_with_finite_positive_ratios(tiny_project, tmp_path):
    root, store = tiny_project
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    threads = torch.get_num_threads()
    with mock.patch.dict(
        os.environ, {"PREFECT_HOME": str(tmp_path / "prefect"), "MLFLOW_EXPERIMENT_NAME": "realm-pipeline"}
    ):
        _mlflow_store(uri, "realm-pipeline")
        out_file = tmp_path / "throughput.json"
        argv = [
            "--quick",
            "--threads",
            "1",
            "--params",
            str(root / "params.yaml"),
            "--blocks",
            str(root / "blocks.jsonl"),
            "--doc",
            str(root / "pretrain" / "retriever" / "doc"),
            "--ict",
            str(root / "ict"),
            "--pretrained",
            str(root / "pretrain"),
            "--index",
            str(root / "index"),
            "--qa",
            str(root / "qa.jsonl"),
            "--tracking-uri",
            uri,
            "--out",
            str(out_file),
        ]
        try:
            _load_bench().main(argv)
        finally:
            torch.set_num_threads(threads)
    out = json.loads(out_file.read_text())

    assert {"meta", "ratios", "gemm", "embed", "pretrain", "finetune", "stages"} <= set(out)
    assert out["meta"]["quick"] is True and out["gemm"]["flops_per_second"] > 0
    expected = {
        f"embed.{m}.{r}"
        for m in ("doc", "backbone")
        for r in (
            "achieved_over_gemm_limit",
            "ours_over_sentence_transformers",
            "ours_with_tokenising_over_sentence_transformers",
        )
    }
    expected |= {
        "pretrain.async_over_sync_steps_per_second",
        "finetune.batched_over_single_questions_per_second",
        "stages.ict.share",
        "stages.pretrain.share",
        "stages.outside_stage_flows.share",
    }
    assert expected <= set(out["ratios"])
    for name, value in out["ratios"].items():
        assert math.isfinite(value) and value > 0, f"{name} = {value}"

    real_tokens = sum(len(store.doc_sequence(i)[0]) for i in range(len(store)))
    for row in out["embed"]["rows"]:
        assert row["blocks"] == len(store) and row["real_tokens"] == real_tokens  # real tokens, padding not counted
        assert 0 <= row["padding_fraction"] < 1 and row["padded_flops"] >= row["useful_flops"] > 0
        assert row["st_same_wordpieces"] == len(store)  # sentence-transformers sees the same wordpieces...
        assert row["st_same_model_max_abs_diff"] < 1e-4  # ...and computes the same function on identical inputs
    assert [r["mode"] for r in out["pretrain"]["rows"]] == ["sync", "async"]
    for row in out["pretrain"]["rows"]:
        assert row["steps"] == 3 and 0 <= row["wait_fraction"] < 1 and row["loop_seconds"] > 0
    assert (
        out["pretrain"]["rows"][0]["refreshes_swapped_in"] == 1
    )  # sync at step 2 of 0..2 (refresh_every 2 in --quick)
    single, batched = sorted(out["finetune"]["rows"], key=lambda r: r["batch_size"])
    assert single["batch_size"] == 1 and single["questions"] == batched["questions"]  # the same number of questions
    stages = {r["stage"]: r["seconds"] for r in out["stages"]["rows"]}
    assert stages == {
        "ict": pytest.approx(30),
        "pretrain": pytest.approx(50),
    }  # the experiment's 99 s pretrain is not the default pipeline
    assert out["stages"]["overhead"]["pipeline_run"] == "pipeline-a"


def test_encoder_flops_follow_the_stated_formula():
    bench = _load_bench()
    h, f, layers, n = 8, 32, 2, 5
    per_token_matmuls = 2 * (4 * h * h + 2 * h * f)  # Q, K, V, O and the two FFN matrices
    assert bench.encoder_flops(h, f, layers, [n]) == layers * (per_token_matmuls * n + 4 * h * n * n)
    assert bench.encoder_flops(h, f, layers, [n, n]) == 2 * bench.encoder_flops(h, f, layers, [n])
    assert list(bench.padded_lengths(np.array([3, 1, 2, 7, 5]), 2)) == [2, 2, 5, 5, 7]
