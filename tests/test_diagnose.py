"""bench/diagnose.py measures a run's artefacts: the probe's evidence gain per stage and the retriever's candidates."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch
import yaml

from realm_core.blocks import BlockStore
from realm_core.config import load_params
from realm_core.modeling import KnowledgeAugmentedEncoder, Retriever, load_tokenizer, save_encoder, save_retriever
from realm_core.reading import pretraining_queries
from tests.test_learning import _blocks

ROOT = Path(__file__).resolve().parents[1]


def _diagnose():
    spec = importlib.util.spec_from_file_location("diagnose", ROOT / "bench" / "diagnose.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagnose_reports_the_probe_gains_of_each_stage_and_the_candidates(tiny, tmp_path):
    bert, _ = tiny
    data = tmp_path / "data"
    (data / "corpus").mkdir(parents=True)
    rows = [
        {
            "id": b.id,
            "passage_id": b.title,
            "title": b.title,
            "text": b.text,
            "sentences": b.sentences,
            "spans": b.spans,
        }
        for b in _blocks()
    ]
    (data / "corpus" / "blocks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "backbone": str(bert),
                    "num_hidden_layers": None,
                    "max_query_tokens": 32,
                    "retriever_dim": 16,
                },
                "corpus": {"max_block_tokens": 64},
                "pretrain": {"probe_size": 2, "top_k": 3},
            }
        )
    )
    torch.manual_seed(0)
    encoders = {
        stage: KnowledgeAugmentedEncoder.from_backbone(bert, None, copy=stage == "pretrain")
        for stage in ("ict", "pretrain")
    }
    for stage, encoder in encoders.items():
        save_encoder(encoder, data / stage / "encoder")
    save_retriever(Retriever.from_backbone(bert, None, 16), data / "pretrain" / "retriever")

    out = _diagnose().main(["--data", str(data), "--params", str(params), "--out", str(tmp_path / "d.json")])

    assert json.loads((tmp_path / "d.json").read_text()) == out
    p = load_params(params)
    store = BlockStore.load(data / "corpus" / "blocks.jsonl", load_tokenizer(bert), 64)
    probe = pretraining_queries(store, p.pretrain, 32, p.seed).probe
    assert out["probe_queries"] == len(probe) > 0
    for stage, encoder in encoders.items():
        row = out["stages"][stage]
        assert math.isclose(
            row["evidence_gain"], probe.evidence_gain(encoder, store, torch.device("cpu")), abs_tol=1e-5
        )
        assert all(math.isfinite(row[k]) for k in ("source_block_gain", "random_block_gain"))
    assert (
        out["stages"]["pretrain"]["evidence_gain"] > out["stages"]["ict"]["evidence_gain"]
    )  # the copy head reads the answer off the block
    assert 0.0 <= out["stages"]["pretrain"]["answer_bearing_in_candidates"] <= 1.0
