"""The REALM scale model (bench/scale_model.py): its FLOP arithmetic, its index-memory measurement,
its MLflow reader and one run over made-up measurements.

Every expected value is computed here from the inputs the test writes (or from reports/throughput.json
for the formula check), never copied from reports/scale_model.md.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from bench import scale_model as sm
from realm_core.config import IndexParams

ROOT = Path(__file__).resolve().parents[1]
SMALL = sm.Encoder("small", 2, 64, 256)


def _row(model: str, enc: sm.Encoder, blocks: int, tokens: int, blocks_per_second: float) -> dict:
    useful = sm.encoder_flops(enc, tokens) * blocks
    seconds = blocks / blocks_per_second
    return {
        "model": model,
        "precision": "fp32",
        "default": True,
        "layers": enc.layers,
        "hidden": enc.hidden,
        "blocks": blocks,
        "real_tokens": tokens * blocks,
        "useful_flops": useful,
        "seconds": seconds,
        "blocks_per_second": blocks_per_second,
        "flops_per_second": useful / seconds,
    }


WHOLE = sm.Encoder("whole", 6, 64, 256)


def write_inputs(tmp_path: Path, backbone: sm.Encoder = WHOLE, tokens: int = 50) -> dict[str, Path]:
    """A throughput.json (embed + pretrain sections), a bench/index.py JSON and a metrics/pretrain.json, all made up."""
    throughput = {
        "meta": {"threads": 2, "cpus": 2},
        "gemm": {"flops_per_second": 1e11},
        "embed": {
            "rows": [
                _row("doc embedder (pipeline)", SMALL, 100, 40, 200.0),
                _row("whole backbone", backbone, 100, tokens, 50.0),
            ]
        },
        "pretrain": {
            "batch_size": 2,
            "top_k": 4,
            "rows": [
                {"mode": "sync", "steps": 10, "loop_seconds": 12.0, "wait_seconds": 2.0},
                {"mode": "async", "steps": 10, "loop_seconds": 11.0, "wait_seconds": 0.1},
            ],
        },
    }
    per = {"flat": 512, "hnsw": 800, "ivf_pq": 48}
    index = {
        "machine": {"faiss_threads": 1},
        "rows": [
            {"data": "random", "n": n, "index": kind, "index_mb": (1000 + per[kind] * n) / 2**20, "build_s": n * 1e-5}
            for n in (1000, 3000)
            for kind in per
        ],
    }
    paths = {
        "throughput": tmp_path / "throughput.json",
        "index": tmp_path / "index.json",
        "metrics": tmp_path / "pretrain.json",
    }
    paths["throughput"].write_text(json.dumps(throughput))
    paths["index"].write_text(json.dumps(index))
    paths["metrics"].write_text(json.dumps({"refresh_staleness_mean": 2.0, "initial_index_seconds": 3.0}))
    return paths


def cli_args(paths: dict[str, Path], tmp_path: Path, *extra: str) -> list[str]:
    """The script's arguments over the made-up measurements, writing tmp_path/out/scale.json."""
    return [
        "--throughput",
        str(paths["throughput"]),
        "--index-results",
        str(paths["index"]),
        "--pretrain-metrics",
        str(paths["metrics"]),
        "--mlflow",
        str(tmp_path / "absent.db"),
        "--out",
        str(tmp_path / "out" / "scale.json"),
        *extra,
    ]


def run_on(paths: dict[str, Path], tmp_path: Path, *extra: str) -> dict:
    return sm.run(sm.parse_args(cli_args(paths, tmp_path, *extra)))


def test_refresh_time_halves_when_the_workers_double(tmp_path):
    r = run_on(write_inputs(tmp_path), tmp_path, "--workers", "1", "2", "4", "--gpus", "3", "6")
    for kind in ("CPU core", "A100 GPU"):
        times = [x["refresh_seconds"] for x in r["refresh"] if x["devices"] == kind]
        assert len(times) >= 2
        assert all(a / b == pytest.approx(2.0) for a, b in zip(times, times[1:]))
    assert sm.refresh_seconds(1000, 5e9, 1e9, 8) == pytest.approx(sm.refresh_seconds(1000, 5e9, 1e9, 4) / 2)


def test_scaling_a_measurement_of_bert_base_at_288_wordpieces_gives_it_back(tmp_path):
    """The FLOP ratio is the only scaling: measure REALM's own block and the model must return the measurement."""
    r = run_on(write_inputs(tmp_path, backbone=sm.BERT_BASE, tokens=288), tmp_path)
    assert r["scaling"]["block_flop_ratio"]["value"] == pytest.approx(1.0)
    assert r["scaling"]["realm_block_seconds_per_core"]["value"] == pytest.approx(
        2 / 50.0
    )  # threads / blocks_per_second
    slow = run_on(
        write_inputs(tmp_path, backbone=sm.BERT_BASE, tokens=144), tmp_path
    )  # shorter measured blocks: REALM's cost more than 2x as much
    assert slow["scaling"]["block_flop_ratio"]["value"] > 2.0


def test_step_flops_are_three_forward_passes_over_the_sequences_one_step_reads():
    batch, k, q, b = 3, 5, 20, 60
    sequences = batch * (
        [q] + [b] * (k - 1) + [q + b] * (k - 1) + [q]
    )  # query tower, doc tower, encoder pairs, encoder null block
    assert sm.step_flops(SMALL, batch, k, q, b) == pytest.approx(3 * sum(sm.encoder_flops(SMALL, n) for n in sequences))
    assert sm.step_flops(SMALL, 2 * batch, k, q, b) == pytest.approx(2 * sm.step_flops(SMALL, batch, k, q, b))


def test_flop_formula_matches_the_useful_flops_bench_throughput_measured():
    """encoder_flops at the mean block length (f = 4h) vs throughput.py's count over the real lengths:
    equal but for the n^2 attention term, which the spread of lengths can only raise (Jensen); on this
    corpus by under 1%, while halving the attention term (about 3% of the FLOPs) would lose 2%."""
    path = ROOT / "reports" / "throughput.json"
    if not path.is_file():
        pytest.skip("no reports/throughput.json")
    for row in json.loads(path.read_text())["embed"]["rows"]:
        enc = sm.Encoder(row["model"], row["layers"], row["hidden"], 4 * row["hidden"])
        ratio = sm.encoder_flops(enc, row["real_tokens"] / row["blocks"]) / (row["useful_flops"] / row["blocks"])
        assert 0.99 < ratio <= 1 + 1e-9, row["model"]


def test_measured_index_bytes_flat_is_4d_per_vector_and_ivf_pq_below_flat_below_hnsw():
    spec = IndexParams.model_validate({"ivf_pq": {"nlist": 16, "nprobe": 4}})
    index = sm.measure_index(spec, [1000, 2000], seed=0, threads=1)
    per = {kind: index[kind]["per_vector"]["value"] for kind in sm.TYPES}
    assert per["flat"] == pytest.approx(4 * sm.DIM)
    assert abs(index["flat"]["fixed"]["value"]) < 1024  # a header
    assert (
        spec.ivf_pq.m <= per["ivf_pq"] < per["flat"] < per["hnsw"]
    )  # PQ codes + ids < float32 vectors < vectors + graph links
    n = 13_353_718
    memory = sm.memory_bytes(index, "flat", n)
    assert memory["faiss"] == pytest.approx(4 * sm.DIM * n + index["flat"]["fixed"]["value"])
    assert memory["dense_index"] - memory["faiss"] == n * (4 * sm.DIM + 8)  # DenseIndex keeps the vectors and ids too


def _mlflow_db(path: Path, runs: dict[str, tuple[int, list[int]]]) -> Path:
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE runs (run_uuid TEXT, status TEXT, start_time INT); CREATE TABLE tags (key TEXT, value TEXT, run_uuid TEXT);"
        "CREATE TABLE params (key TEXT, value TEXT, run_uuid TEXT); CREATE TABLE metrics (key TEXT, value REAL, timestamp INT, step INT, run_uuid TEXT);"
    )
    for run, (start, stamps) in runs.items():
        con.execute("INSERT INTO runs VALUES (?, 'FINISHED', ?)", (run, start))
        con.execute("INSERT INTO tags VALUES ('realm.stage', 'pretrain', ?)", (run,))
        con.execute("INSERT INTO params VALUES ('pretrain.batch_size', '6', ?)", (run,))
        con.executemany(
            "INSERT INTO metrics VALUES ('loss', 1.0, ?, ?, ?)", [(t, i, run) for i, t in enumerate(stamps)]
        )
    con.commit()
    con.close()
    return path


def test_mlflow_step_time_is_the_median_interval_of_the_latest_finished_pretrain_run(tmp_path):
    db = _mlflow_db(tmp_path / "mlruns.db", {"old": (1, [0, 5000, 10000]), "new": (2, [0, 1000, 3000, 4000, 9000])})
    m = sm.mlflow_step(db)
    assert m["run"] == "new"
    assert m["seconds"] == pytest.approx(1.5)  # gaps 1, 2, 1, 5 s
    assert m["params"]["pretrain.batch_size"] == "6"


def test_the_script_writes_its_markdown_and_json_from_made_up_measurements(tmp_path):
    paths = write_inputs(tmp_path)
    out = tmp_path / "out" / "scale.json"
    sm.main(cli_args(paths, tmp_path, "--workers", "1", "8", "--gpus", "4"))
    r = json.loads(out.read_text())
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()
    assert r["inputs"]["step"]["seconds"]["value"] == pytest.approx(
        (12.0 - 2.0) / 10
    )  # the sync row without its refresh waits
    assert r["inputs"]["index"]["hnsw"]["per_vector"]["value"] == pytest.approx(800)
    for section in ("embed", "doc_embed", "step"):
        assert all(f["source"] for f in r["inputs"][section].values())
    assert [x["n"] for x in r["refresh"]] == [1, 8, 4]
    for x in r["refresh"]:
        assert x["trainer_devices"] == 4 * x["n"]  # REALM's 16:64
        assert x["staleness_steps"] == pytest.approx(x["refresh_seconds"] / x["step_seconds"])
        assert x["keeps_up"] == (x["staleness_steps"] <= 500)
    small, big = r["choices"][0], r["choices"][-1]
    assert big["blocks"] == 13_353_718 and big["memory"]["flat"]["dense_index"] > 8 * 2**30
    assert small["bert"]["index"] == "flat" and big["bert"]["index"].startswith("ivf_pq")
    text = out.with_suffix(".md").read_text()
    assert "13,353,718" in text and "| builder | one refresh |" in text and "## Assumptions" in text
