"""A cost model for REALM at its real scale (issue 13, item 5): on paper, but from measured numbers.

    .venv/bin/python bench/scale_model.py                           # reports/scale_model.{json,md,png} (~5 s)
    .venv/bin/python bench/scale_model.py --workers 1 8 64 --gpus 1 8 16 --gpu v100 --gpu-utilisation 0.3
    .venv/bin/python bench/scale_model.py --index-results bench/results/index.json   # bytes/vector from bench/index.py

REALM (Guu et al. 2020, section 4.2 and appendix) pre-trains BERT-base towers and a BERT-base encoder
for 200k steps of batch 512 on 64 TPUs, over 13,353,718 Wikipedia blocks of up to 288 wordpieces,
8 candidates per query (the null block included), with an index builder on 16 TPUs that refreshes the
index about every 500 steps (section 3.3: "every several hundred training steps"). Nothing that big
runs here, so this script scales what was measured on this machine, by FLOPs:

  block embedding  reports/throughput.json `embed.rows` (the whole 6-layer MiniLM backbone, default
                   kernel): seconds per block and FLOPs per block (useful_flops / blocks). A REALM block
                   costs FLOPs(BERT-base, 288 wordpieces) / that as long, at the same achieved FLOP/s
                   per core. The FLOP formula is bench/throughput.py's (restated: importing that module
                   costs torch + transformers), f = 4h (MiniLM and BERT-base both), checked against the
                   measured useful_flops:
                       FLOPs(sequence of n tokens) = layers * (2 * (4 h^2 + 2 h f) * n + 4 h n^2)
  a training step  throughput.json `pretrain` (its sync row without the refresh waits) if that section
                   was run, else the median interval between the `loss` steps of the latest finished
                   pretrain run in the MLflow store (mlruns.db). A step's FLOPs are 3x the forward FLOPs
                   (backward = 2x forward) of the query tower (B queries), the doc tower (B (k-1)
                   retrieved blocks, re-embedded live: section 3.3) and the encoder (B (k-1) pairs
                   query + block, B null-block queries). REALM's step runs at the same FLOP/s per core.
  index memory     bytes per vector and fixed bytes of each index.type, a line through two sizes:
                   bench/results/index.json (bench/index.py, random rows) if present, else measured
                   here: faiss.serialize_index of DenseIndex.build(random 128-d, params.yaml index).

A CPU worker is one core of this machine (runner.workers counts Dask processes of one thread, or Ray
CPUs) at the measured rate per core; N workers embed N times as fast (shards are independent). A GPU
is a public peak figure times an assumed utilisation (--gpu, --gpu-utilisation), for both embedding
and training. Staleness = one refresh's time / one step's time, in steps, the builder on N devices
and the trainer on --trainer-ratio x N (REALM: 16 and 64). Every number in the JSON is
{"value", "source"}: the file and field it was read from, the formula that made it, or "assumption".
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.publish import publish  # noqa: E402
from realm_core.config import IndexParams, load_params  # noqa: E402

DIM = 128  # REALM section 3.2: d = 128 (ours too: model.retriever_dim)
PAPER = "Guu et al. 2020"
REALM = {  # value, source
    "blocks": (13_353_718, f"{PAPER} section 4.2 (13.35M blocks; exact count: HF RealmConfig.num_block_records)"),
    "block_tokens": (288, f"{PAPER} section 4.2: blocks of up to 288 BERT wordpieces (assumed all full)"),
    "query_tokens": (
        96,
        "params.yaml model.max_query_tokens comment: REALM uses 96 in pre-training (assumed all full)",
    ),
    "batch_size": (512, f"{PAPER} section 4.2: batch size 512"),
    "top_k": (8, f"{PAPER} section 4.2: 8 candidates, the null block included"),
    "steps": (200_000, f"{PAPER} section 4.2: 200k steps"),
    "refresh_every": (500, f"{PAPER} section 3.3 / appendix: index refreshed about every 500 steps"),
    "trainer_devices": (64, f"{PAPER} section 4.2: 64 TPUs train"),
    "builder_devices": (16, f"{PAPER} section 4.2: the index builder runs on 16 TPUs"),
}
GPUS = {  # peak dense tensor-core FLOP/s, public figure
    "a100": (312e12, "NVIDIA A100 datasheet: 312 TFLOP/s dense BF16 tensor-core peak"),
    "v100": (125e12, "NVIDIA V100 datasheet: 125 TFLOP/s FP16 tensor-core peak"),
    "h100": (989e12, "NVIDIA H100 SXM datasheet: 989 TFLOP/s dense BF16 tensor-core peak"),
}
TYPES = ("flat", "hnsw", "ivf_pq")
FORMULAS = {  # how the derived numbers of the JSON are made
    "refresh.refresh_seconds": "realm.blocks * scaling.realm_block_flops / (embed_rate * n)",
    "refresh.step_seconds": "scaling.realm_step_flops / (train_rate * trainer_devices)",
    "refresh.staleness_steps": "refresh_seconds / step_seconds",
    "refresh.keeps_up": "staleness_steps <= realm.refresh_every",
    "refresh.pretrain_seconds": "realm.steps * step_seconds",
    "choices.pipeline_local_seconds": "blocks / inputs.doc_embed.blocks_per_second (this machine's threads)",
    "choices.bert_local_seconds": "blocks * scaling.realm_block_flops / (inputs.embed.flops_per_second_per_core * inputs.embed.threads)",
    "choices.memory.faiss": "inputs.index[type].fixed + inputs.index[type].per_vector * blocks",
    "choices.memory.dense_index": "memory.faiss + blocks * (4 * 128 + 8)  (float32 vectors + int64 ids)",
    "choices.flat_search_seconds_per_512_queries": "512 * 2 * blocks * 128 / inputs.gemm",
}


@dataclass(frozen=True)
class Encoder:
    name: str
    layers: int
    hidden: int
    ffn: int


BERT_BASE = Encoder("BERT-base (REALM)", 12, 768, 3072)


def fact(value: Any, source: str) -> dict[str, Any]:
    return {"value": value, "source": source}


def _rel(path: Path) -> str:
    """A path as the sources name it: relative to the project when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ---------------------------------------------------------------------------- FLOPs


def encoder_flops(enc: Encoder, tokens: float) -> float:
    """Forward matmul FLOPs of one sequence of `tokens` tokens (bench/throughput.py's formula)."""
    per_token = 2.0 * (4 * enc.hidden**2 + 2 * enc.hidden * enc.ffn)
    return enc.layers * (per_token * tokens + 4.0 * enc.hidden * tokens**2)


def step_flops(enc: Encoder, batch: int, top_k: int, query_tokens: float, block_tokens: float) -> float:
    """Training FLOPs of one pre-training step (pretrain.py steps 1-5): 3x the forward FLOPs."""
    retrieved = top_k - 1  # candidate 0 is the null block
    forward = batch * (
        encoder_flops(enc, query_tokens)  # query tower
        + retrieved * encoder_flops(enc, block_tokens)  # doc tower over the candidates
        + retrieved * encoder_flops(enc, query_tokens + block_tokens)  # encoder: [CLS] x [SEP] z [SEP]
        + encoder_flops(enc, query_tokens)
    )  # encoder over the null block (x alone)
    return 3.0 * forward


def refresh_seconds(blocks: int, flops_per_block: float, flops_per_second_per_device: float, devices: int) -> float:
    """One full re-embedding of `blocks` blocks, shards spread evenly over `devices`."""
    return blocks * flops_per_block / (flops_per_second_per_device * devices)


# ---------------------------------------------------------------------------- measured inputs


def embed_input(throughput: dict, path: Path, model: str) -> dict[str, Any]:
    """The default kernel's row of `model` ("whole backbone" | "doc embedder") in throughput.json embed.rows."""
    row = next(r for r in throughput["embed"]["rows"] if r["model"].startswith(model) and r["default"])
    path = _rel(path)
    src = f"{path} embed.rows[model={row['model']!r}, precision={row['precision']}]"
    threads = throughput["meta"]["threads"]
    return {
        "model": fact(row["model"], src),
        "precision": fact(row["precision"], src + ".precision"),
        "layers": fact(row["layers"], src + ".layers"),
        "hidden": fact(row["hidden"], src + ".hidden"),
        "blocks": fact(row["blocks"], src + ".blocks"),
        "blocks_per_second": fact(row["blocks_per_second"], src + ".blocks_per_second"),
        "tokens_per_block": fact(row["real_tokens"] / row["blocks"], src + ".real_tokens / .blocks"),
        "flops_per_block": fact(row["useful_flops"] / row["blocks"], src + ".useful_flops / .blocks"),
        "threads": fact(threads, f"{path} meta.threads"),
        "flops_per_second_per_core": fact(row["flops_per_second"] / threads, src + ".flops_per_second / meta.threads"),
    }


def encoder_of(measured: dict[str, Any], layers: int | None = None) -> Encoder:
    h = measured["hidden"]["value"]
    return Encoder(measured["model"]["value"], layers or measured["layers"]["value"], h, 4 * h)


def mlflow_step(db: Path) -> dict[str, Any]:
    """Median seconds between the `loss` steps of the latest finished pretrain run, and that run's params."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        run = con.execute(
            "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE t.key = 'realm.stage' "
            "AND t.value = 'pretrain' AND r.status = 'FINISHED' ORDER BY r.start_time DESC LIMIT 1"
        ).fetchone()
        if run is None:
            raise SystemExit(
                f"{db}: no finished pretrain run (tag realm.stage = pretrain); run the pipeline or `bench/throughput.py --sections pretrain`"
            )
        stamps = [
            t
            for _, t in con.execute(
                "SELECT step, MIN(timestamp) FROM metrics WHERE run_uuid = ? AND key = 'loss' GROUP BY step ORDER BY step",
                run,
            )
        ]
        params = dict(con.execute("SELECT key, value FROM params WHERE run_uuid = ?", run).fetchall())
    finally:
        con.close()
    gaps = [(b - a) / 1000 for a, b in zip(stamps, stamps[1:])]
    if not gaps:
        raise SystemExit(f"{db}: pretrain run {run[0]} logged fewer than 2 steps")
    q = statistics.quantiles(gaps, n=4) if len(gaps) > 1 else [gaps[0]] * 3
    return {
        "run": run[0],
        "seconds": statistics.median(gaps),
        "quartiles": [q[0], q[2]],
        "steps": len(stamps),
        "params": params,
    }


def step_input(throughput: dict, tp_path: Path, db: Path, params: Any, embed: dict[str, Any]) -> dict[str, Any]:
    """The measured seconds of one pre-training step, and what that step computed."""
    c, yaml, tp_path, db = params.pretrain, "params.yaml", _rel(tp_path), Path(db)
    if "pretrain" in throughput:
        sec = throughput["pretrain"]
        row = next(r for r in sec["rows"] if r["mode"] == "sync")
        src = f"{tp_path} pretrain"
        seconds = fact(
            (row["loop_seconds"] - row["wait_seconds"]) / row["steps"],
            f"{src}.rows[mode=sync] (loop_seconds - wait_seconds) / steps",
        )
        batch, top_k = fact(sec["batch_size"], f"{src}.batch_size"), fact(sec["top_k"], f"{src}.top_k")
        layers = fact(params.model.num_hidden_layers, f"{yaml} model.num_hidden_layers")
        query = fact(
            params.model.max_query_tokens, f"{yaml} model.max_query_tokens (upper bound: sentences are shorter)"
        )
        cores = fact(throughput["meta"]["threads"], f"{tp_path} meta.threads")
        shape_src = (
            f"{src}.batch_size, .top_k; {yaml} model.num_hidden_layers, model.max_query_tokens (queries at the cap)"
        )
    else:
        m = mlflow_step(db)
        src = f"{_rel(db)} run {m['run']} (latest finished pretrain)"
        p = m["params"]
        get = lambda key, default: int(p[key]) if p.get(key, "None") != "None" else default  # noqa: E731
        seconds = fact(
            m["seconds"],
            f"{src}: median interval between its {m['steps']} `loss` step timestamps "
            f"(quartiles {m['quartiles'][0]:.2f}-{m['quartiles'][1]:.2f} s; async builder sharing the cores)",
        )
        batch, top_k = (
            fact(get("pretrain.batch_size", c.batch_size), f"{src} param pretrain.batch_size"),
            fact(get("pretrain.top_k", c.top_k), f"{src} param pretrain.top_k"),
        )
        layers = fact(get("model.num_hidden_layers", None), f"{src} param model.num_hidden_layers")
        query = fact(
            get("model.max_query_tokens", params.model.max_query_tokens),
            f"{src} param model.max_query_tokens (upper bound: sentences are shorter)",
        )
        cores = fact(throughput["meta"]["cpus"], f"{tp_path} meta.cpus (assumption: the run used this machine's cores)")
        shape_src = f"{src} params pretrain.batch_size, pretrain.top_k, model.num_hidden_layers, model.max_query_tokens (queries at the cap)"
    block = fact(embed["tokens_per_block"]["value"], embed["tokens_per_block"]["source"] + " (the same corpus blocks)")
    enc = encoder_of(embed, layers["value"])
    flops = step_flops(enc, batch["value"], top_k["value"], query["value"], block["value"])
    shape = fact(None, f"{shape_src}; block: {block['source']}; cores: {cores['source']}")
    return {
        "seconds": seconds,
        "shape": shape,
        "batch_size": batch,
        "top_k": top_k,
        "layers": fact(enc.layers, layers["source"]),
        "query_tokens": query,
        "block_tokens": block,
        "cores": cores,
        "flops": fact(flops, "step_flops(MiniLM cut, batch, top_k, query_tokens, block_tokens)"),
        "flops_per_second_per_core": fact(flops / (seconds["value"] * cores["value"]), "flops / (seconds * cores)"),
    }


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed, per_vector) of bytes = fixed + per_vector * n through the smallest and largest n."""
    (n1, b1), (n2, b2) = min(points), max(points)
    per_vector = (b2 - b1) / (n2 - n1) if n2 > n1 else b2 / n2
    return b1 - per_vector * n1 if n2 > n1 else 0.0, per_vector


def index_from_bench(data: dict, path: Path) -> dict[str, Any]:
    out, path = {}, _rel(path)
    for kind in TYPES:
        rows = sorted((r for r in data["rows"] if r["index"] == kind and r["data"] == "random"), key=lambda r: r["n"])
        fixed, per = fit_line([(r["n"], r["index_mb"] * 2**20) for r in rows])
        sizes = ", ".join(f"{r['n']:,}" for r in rows)
        out[kind] = {
            "per_vector": fact(per, f"{path} rows[data=random, index={kind}] index_mb at N = {sizes}: slope"),
            "fixed": fact(fixed, f"{path} same rows: intercept"),
            "build_seconds_per_vector": fact(
                rows[-1]["build_s"] / rows[-1]["n"],
                f"{path} build_s / n at N = {rows[-1]['n']:,} ({data['machine']['faiss_threads']} threads)",
            ),
        }
    return out


def measure_index(spec: IndexParams, sizes: list[int], seed: int, threads: int) -> dict[str, Any]:
    """Serialised bytes of DenseIndex.build over random vectors at each size; ivf_pq trained on the
    fewest vectors faiss accepts (its bytes depend on nlist, m and nbits, not on the sample)."""
    import faiss
    import numpy as np

    from realm_core.index import DenseIndex, make_faiss_index, min_train_vectors, train_faiss_index

    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(seed)
    out = {}
    for kind in TYPES:
        s = spec.model_copy(update={"type": kind})
        if kind == "ivf_pq":
            s = s.model_copy(update={"ivf_pq": s.ivf_pq.model_copy(update={"train_size": min_train_vectors(s)})})
        points, seconds = [], 0.0
        for n in sizes:
            x = rng.standard_normal((n, DIM), dtype=np.float32)
            start = time.perf_counter()  # DenseIndex.build's steps, with faiss's few-points-per-centroid warning off
            index = make_faiss_index(s, DIM)
            if kind == "ivf_pq":
                index.cp.min_points_per_centroid = index.pq.cp.min_points_per_centroid = 1
            train_faiss_index(index, x, s, seed)
            index.add(x)
            seconds = time.perf_counter() - start
            DenseIndex(x, np.arange(n), faiss_index=index, spec=s)  # the index the project would hold (checks sizes)
            points.append((n, float(faiss.serialize_index(index).nbytes)))
        fixed, per = fit_line(points)
        src = (
            f"measured by bench/scale_model.py: faiss.serialize_index of DenseIndex.build's index (N(0,1) {DIM}-d, params.yaml index, type={kind}) "
            f"at N = {', '.join(f'{n:,}' for n in sizes)}"
        )
        out[kind] = {
            "per_vector": fact(per, src + ": slope"),
            "fixed": fact(fixed, src + ": intercept"),
            "build_seconds_per_vector": fact(
                seconds / sizes[-1],
                f"{src}: build seconds / N at N = {sizes[-1]:,}, {threads} faiss thread(s)"
                + (", trained on the minimum sample" if kind == "ivf_pq" else ""),
            ),
        }
    return out


# ---------------------------------------------------------------------------- the model


def memory_bytes(index: dict[str, Any], kind: str, n: int) -> dict[str, float]:
    """faiss index bytes, and a DenseIndex's RAM: it also keeps the float32 vectors and int64 ids (index.mmap: false)."""
    faiss_bytes = index[kind]["fixed"]["value"] + index[kind]["per_vector"]["value"] * n
    return {"faiss": faiss_bytes, "dense_index": faiss_bytes + n * (4 * DIM + 8)}


def devices(args: argparse.Namespace, embed: dict, step: dict) -> list[dict[str, Any]]:
    peak, peak_src = GPUS[args.gpu]
    gpu = peak * args.gpu_utilisation
    gpu_src = f"{peak_src} x {args.gpu_utilisation:.0%} utilisation (assumption, --gpu-utilisation)"
    cpu = [
        {
            "kind": "CPU core",
            "n": n,
            "embed_rate": fact(
                embed["flops_per_second_per_core"]["value"], embed["flops_per_second_per_core"]["source"]
            ),
            "train_rate": fact(
                step["flops_per_second_per_core"]["value"],
                "measured step: " + step["flops_per_second_per_core"]["source"],
            ),
        }
        for n in args.workers
    ]
    return cpu + [
        {"kind": f"{args.gpu.upper()} GPU", "n": n, "embed_rate": fact(gpu, gpu_src), "train_rate": fact(gpu, gpu_src)}
        for n in args.gpus
    ]


def refresh_rows(
    args: argparse.Namespace, embed: dict, step: dict, block_flops: float, realm_step_flops: float
) -> list[dict[str, Any]]:
    blocks, interval, steps = REALM["blocks"][0], REALM["refresh_every"][0], REALM["steps"][0]
    rows = []
    for d in devices(args, embed, step):
        refresh = refresh_seconds(blocks, block_flops, d["embed_rate"]["value"], d["n"])
        trainer = d["n"] * args.trainer_ratio
        step_s = realm_step_flops / (d["train_rate"]["value"] * trainer)
        rows.append(
            {
                "devices": d["kind"],
                "n": d["n"],
                "trainer_devices": trainer,
                "embed_rate": d["embed_rate"],
                "train_rate": d["train_rate"],
                "refresh_seconds": refresh,
                "step_seconds": step_s,
                "staleness_steps": refresh / step_s,
                "keeps_up": refresh / step_s <= interval,
                "pretrain_seconds": steps * step_s,
            }
        )
    return rows


def recommend(
    local: float, refresh: dict[str, float], memory: dict[str, dict], args: argparse.Namespace
) -> dict[str, Any]:
    """Runner: this machine (thread) or else the first setup (in --workers, then --gpus order) whose one refresh
    fits --budget-minutes; index: flat while a flat DenseIndex fits --ram-gb, else ivf_pq."""
    budget = args.budget_minutes * 60
    if local <= budget:
        runner, seconds = "thread", local
    else:
        fits = [k for k, t in refresh.items() if t <= budget]
        pick = fits[0] if fits else min(refresh, key=refresh.get)
        runner, seconds = (
            f"dask or ray, {pick}" + ("" if "CPU" in pick else ", device: cuda") + ("" if fits else " (over budget)"),
            refresh[pick],
        )
    index = "flat" if memory["flat"]["dense_index"] <= args.ram_gb * 2**30 else "ivf_pq, index.mmap: true"
    return {"runner": runner, "refresh_seconds": seconds, "index": index}


def choice_rows(
    args: argparse.Namespace, doc: dict, embed: dict, index: dict, block_flops: float, gemm: float
) -> list[dict[str, Any]]:
    rows = []
    local = embed["threads"]["value"]
    per_core = embed["flops_per_second_per_core"]["value"]
    peak = GPUS[args.gpu][0] * args.gpu_utilisation
    for n in args.choice_sizes:
        pipeline = n / doc["blocks_per_second"]["value"]  # the measured doc embedder on this machine's threads
        bert_local = refresh_seconds(n, block_flops, per_core, local)
        setups_doc = {
            f"{w} CPU workers": n * doc["threads"]["value"] / doc["blocks_per_second"]["value"] / w
            for w in args.workers
        }
        setups_bert = {
            **{f"{w} CPU workers": refresh_seconds(n, block_flops, per_core, w) for w in args.workers},
            **{f"{g} {args.gpu.upper()} GPUs": refresh_seconds(n, block_flops, peak, g) for g in args.gpus},
        }
        memory = {kind: memory_bytes(index, kind, n) for kind in TYPES}
        rows.append(
            {
                "blocks": n,
                "budget_minutes": args.budget_minutes,
                "ram_gb": args.ram_gb,
                "pipeline_local_seconds": pipeline,
                "bert_local_seconds": bert_local,
                "bert_setups_seconds": setups_bert,
                "memory": memory,
                "flat_search_seconds_per_512_queries": 512 * 2.0 * n * DIM / gemm,
                "pipeline": recommend(pipeline, setups_doc, memory, args),
                "bert": recommend(bert_local, setups_bert, memory, args),
            }
        )
    return rows


def assumptions(args: argparse.Namespace, threads: int) -> list[str]:
    """What the model takes for granted, as the report lists it."""
    return [
        f"CPU worker = one core of this machine at its measured rate per core ({threads} threads measured); N workers = N x one (ideal scaling, no start-up or transfer).",
        f"GPU = {GPUS[args.gpu][1]}, at {args.gpu_utilisation:.0%} of it for embedding and training (--gpu-utilisation; MFU of BERT-sized models is typically 30-50%).",
        "BERT-base keeps the FLOP/s per core measured on MiniLM (6 layers, h 384; ~81 wordpieces a block): its larger matmuls may run faster, its longer attention slower.",
        "f = 4h for the MiniLM and BERT-base FFNs (the formula check compares it with the measured useful_flops).",
        "Counted FLOPs: the encoder matmuls only (no embeddings, LayerNorm, softmax, MLM head, optimizer, retrieval); the measured step's other costs are carried to REALM's "
        "step in proportion to its FLOPs, which overstates them where matmuls dominate.",
        "REALM's blocks all 288 wordpieces and queries all 96; ours the measured mean block and the query cap (an upper bound, so our rate per core and REALM's step speed are overstated).",
        f"Staleness: builder on N devices, trainer on {args.trainer_ratio} x N of the same kind (REALM: 16 and 64); the 200k-step column takes every step to cost the same.",
        "Memory: serialised faiss bytes (about its RAM), plus the float32 vectors and int64 ids every DenseIndex keeps (RAM with index.mmap: false, disk pages with true).",
        f"Recommendation rules: runner = the first setup whose one refresh takes <= {args.budget_minutes:g} min (thread = this machine's {threads} cores); "
        f"index = flat while a flat DenseIndex fits {args.ram_gb:g} GiB of RAM, else ivf_pq with index.mmap: true (hnsw is larger than flat: it buys query latency, not modelled here).",
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    params = load_params(args.params)
    throughput = json.loads(args.throughput.read_text())
    embed = embed_input(throughput, args.throughput, "whole backbone")
    doc = embed_input(throughput, args.throughput, "doc embedder")
    step = step_input(throughput, args.throughput, args.mlflow, params, doc)
    if args.index_results.is_file():
        index = index_from_bench(json.loads(args.index_results.read_text()), args.index_results)
    else:
        index = measure_index(params.index, args.index_sizes, params.seed, args.threads)
    measured_enc = encoder_of(embed)
    check = encoder_flops(measured_enc, embed["tokens_per_block"]["value"]) / embed["flops_per_block"]["value"]
    block_flops = encoder_flops(BERT_BASE, REALM["block_tokens"][0])
    realm = {k: fact(v, s) for k, (v, s) in REALM.items()}
    realm_step = step_flops(
        BERT_BASE, REALM["batch_size"][0], REALM["top_k"][0], REALM["query_tokens"][0], REALM["block_tokens"][0]
    )
    gemm = fact(
        throughput["gemm"]["flops_per_second"],
        f"{_rel(args.throughput)} gemm.flops_per_second (fp32, {throughput['meta']['threads']} threads)",
    )
    scaling = {
        "formula_check": fact(
            check,
            f"encoder_flops({measured_enc.name}, f = 4h, mean tokens) / measured flops_per_block (below 1 only by the "
            "spread of block lengths in the n^2 term)",
        ),
        "realm_block_flops": fact(block_flops, "encoder_flops(BERT-base: 12 layers, h 768, f 3072; 288 tokens)"),
        "block_flop_ratio": fact(
            block_flops / embed["flops_per_block"]["value"], "realm_block_flops / measured flops_per_block"
        ),
        "realm_block_seconds_per_core": fact(
            block_flops / embed["flops_per_second_per_core"]["value"], "realm_block_flops / measured FLOP/s per core"
        ),
        "realm_step_flops": fact(
            realm_step, "step_flops(BERT-base, realm.batch_size, realm.top_k, realm.query_tokens, realm.block_tokens)"
        ),
        "step_flop_ratio": fact(realm_step / step["flops"]["value"], "realm_step_flops / measured step's flops"),
    }
    c = params.pretrain
    metrics = {}
    cost = args.pretrain_metrics.with_suffix(".resources.json")  # the timings (flows/tracking.is_resource)
    for file in (args.pretrain_metrics, cost):
        if file.is_file():
            metrics.update(json.loads(file.read_text()))
    predicted_build = (
        doc["blocks"]["value"] * doc["threads"]["value"] / doc["blocks_per_second"]["value"] / c.refresh_threads
    )
    default_run = {
        "predicted_build_seconds": fact(
            predicted_build,
            f"doc blocks / (doc blocks_per_second / threads) / params.yaml pretrain.refresh_threads ({c.refresh_threads})",
        ),
        "predicted_staleness_steps": fact(
            predicted_build / step["seconds"]["value"], "predicted_build_seconds / measured step seconds"
        ),
        **(
            {
                "measured_staleness_steps": fact(
                    metrics["refresh_staleness_mean"], f"{_rel(args.pretrain_metrics)} refresh_staleness_mean"
                )
            }
            if "refresh_staleness_mean" in metrics
            else {}
        ),
        **(
            {
                "measured_initial_index_seconds": fact(
                    metrics["initial_index_seconds"],
                    f"{_rel(cost)} initial_index_seconds (2 threads, with tokenising, faiss and I/O)",
                ),
                "predicted_initial_index_seconds": fact(
                    doc["blocks"]["value"] / doc["blocks_per_second"]["value"], "doc blocks / doc blocks_per_second"
                ),
            }
            if "initial_index_seconds" in metrics
            else {}
        ),
    }
    rows = refresh_rows(args, embed, step, block_flops, realm_step)
    realm_split = next(
        (r for r in rows if "GPU" in r["devices"] and r["n"] * args.trainer_ratio == REALM["trainer_devices"][0]), None
    )
    return {
        "command": " ".join(["python", "bench/scale_model.py", *args.argv]),
        "formulas": FORMULAS,
        "realm": realm,
        "gpu": {
            "name": args.gpu,
            "peak": fact(GPUS[args.gpu][0], GPUS[args.gpu][1]),
            "utilisation": fact(args.gpu_utilisation, "assumption (--gpu-utilisation)"),
        },
        "inputs": {"embed": embed, "doc_embed": doc, "step": step, "index": index, "gemm": gemm},
        "scaling": scaling,
        "default_run": default_run,
        "refresh": rows,
        "realm_split": realm_split,
        "choices": choice_rows(args, doc, embed, index, block_flops, gemm["value"]),
        "assumptions": assumptions(args, embed["threads"]["value"]),
        "trainer_ratio": args.trainer_ratio,
        "seconds": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------------------- report


def _t(seconds: float) -> str:
    """A duration in the unit that reads best."""
    for limit, unit, size in ((120, "s", 1), (7200, "min", 60), (172800, "h", 3600), (2 * 365 * 86400, "days", 86400)):
        if seconds < limit:
            value = seconds / size
            return f"{value:.2g} {unit}" if value < 10 else f"{value:,.0f} {unit}"
    return f"{seconds / (365 * 86400):,.0f} years"


def _b(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n / size < 1000 else f"{n / size:,.0f} {unit}"
    return f"{n:.0f} B"


def _g(flops: float) -> str:
    return f"{flops / 1e9:,.1f} GFLOP" if flops < 1e14 else f"{flops / 1e15:,.2f} PFLOP"


def markdown(r: dict) -> str:
    e, d, s, ix, sc = (
        r["inputs"]["embed"],
        r["inputs"]["doc_embed"],
        r["inputs"]["step"],
        r["inputs"]["index"],
        r["scaling"],
    )
    blocks = r["realm"]["blocks"]["value"]
    row = lambda q, v, f: f"| {q} | {v} | {f['source']} |"  # noqa: E731
    lines = [
        "# REALM at its real scale: a cost model from measured numbers (bench/scale_model.py)",
        "",
        f"`{r['command']}`. Scales what this machine measured to REALM's {blocks:,} blocks of {r['realm']['block_tokens']['value']} wordpieces "
        f"and BERT-base, by FLOPs (formulas and assumptions: the script's docstring and the list at the end). Every number names its source.",
        "",
        "## Measured inputs",
        "",
        "| quantity | value | source |",
        "|---|---|---|",
        row(
            f"block embedding, {e['model']['value']} ({e['layers']['value']} layers, h {e['hidden']['value']}, {e['precision']['value']})",
            f"{e['blocks_per_second']['value']:,.0f} blocks/s on {e['threads']['value']} threads",
            e["blocks_per_second"],
        ),
        row(
            "its FLOPs per block",
            f"{_g(e['flops_per_block']['value'])} ({e['tokens_per_block']['value']:.1f} wordpieces)",
            e["flops_per_block"],
        ),
        row(
            "its FLOP/s per core",
            f"{e['flops_per_second_per_core']['value'] / 1e9:,.0f} GFLOP/s",
            e["flops_per_second_per_core"],
        ),
        row(
            f"block embedding, {d['model']['value']} ({d['layers']['value']} layers, {d['precision']['value']})",
            f"{d['blocks_per_second']['value']:,.0f} blocks/s",
            d["blocks_per_second"],
        ),
        row("one pre-training step", f"{s['seconds']['value']:.2f} s", s["seconds"]),
        row(
            "its shape",
            f"batch {s['batch_size']['value']}, k {s['top_k']['value']}, {s['layers']['value']} layers, query {s['query_tokens']['value']} + block "
            f"{s['block_tokens']['value']:.0f} wordpieces, {s['cores']['value']} cores",
            s["shape"],
        ),
        row(
            "its FLOPs and FLOP/s per core",
            f"{_g(s['flops']['value'])}; {s['flops_per_second_per_core']['value'] / 1e9:,.1f} GFLOP/s",
            s["flops_per_second_per_core"],
        ),
        row(
            "fp32 GEMM (faiss's flat search bound)",
            f"{r['inputs']['gemm']['value'] / 1e9:,.0f} GFLOP/s",
            r["inputs"]["gemm"],
        ),
    ]
    for kind in TYPES:
        fixed = ix[kind]["fixed"]["value"]
        lines.append(
            row(
                f"{kind} index bytes per vector + fixed",
                f"{ix[kind]['per_vector']['value']:,.1f} B + "
                + (_b(fixed) if fixed >= 0 else f"{fixed:,.0f} B (fit noise)"),
                ix[kind]["per_vector"],
            )
        )
    lines += [
        "",
        "## Scaling to REALM's BERT-base",
        "",
        "| quantity | value | source |",
        "|---|---|---|",
        row(
            "formula check (formula at the mean length / measured)",
            f"{sc['formula_check']['value']:.3f}",
            sc["formula_check"],
        ),
        row("FLOPs of one REALM block", _g(sc["realm_block_flops"]["value"]), sc["realm_block_flops"]),
        row("REALM block / measured block", f"{sc['block_flop_ratio']['value']:.1f}x", sc["block_flop_ratio"]),
        row(
            "one REALM block on one core",
            f"{sc['realm_block_seconds_per_core']['value']:.3f} s",
            sc["realm_block_seconds_per_core"],
        ),
        row("FLOPs of one REALM step (batch 512)", _g(sc["realm_step_flops"]["value"]), sc["realm_step_flops"]),
        row("REALM step / measured step", f"{sc['step_flop_ratio']['value']:,.0f}x", sc["step_flop_ratio"]),
    ]
    k = r["trainer_ratio"]
    lines += [
        "",
        f"## One refresh of {blocks:,} blocks, one REALM step and the staleness",
        "",
        f"Builder on N devices, trainer on {k} x N (REALM: 16 and 64 TPUs); staleness = refresh time / step time, in steps; "
        f"REALM refreshes about every {r['realm']['refresh_every']['value']} steps.",
        "",
        "| builder | one refresh | trainer | one step (batch 512) | staleness, steps | within 500 steps? | 200k steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["refresh"]:
        lines.append(
            f"| {x['n']:,} {x['devices']}{'s' if x['n'] > 1 else ''} | {_t(x['refresh_seconds'])} | {x['trainer_devices']:,} | {_t(x['step_seconds'])} | {x['staleness_steps']:,.0f} | "
            f"{'yes' if x['keeps_up'] else 'no'} | {_t(x['pretrain_seconds'])} |"
        )
    cpu, gpu = r["refresh"][0], r["refresh"][-1]
    lines += [
        "",
        "In this project the runner spreads the fine-tuning index build (flows/embedding.py) over corpus.shards shards; pre-training's refresh "
        "(realm_core/refresh.py) runs in one builder process, so these N-device times reach pre-training only once that builder is sharded too.",
    ]
    lines += [
        "",
        f"Rates: CPU embedding {cpu['embed_rate']['value'] / 1e9:,.0f} GFLOP/s and training {cpu['train_rate']['value'] / 1e9:,.1f} GFLOP/s per core "
        f"({cpu['embed_rate']['source']}; {cpu['train_rate']['source']}); GPU {gpu['embed_rate']['value'] / 1e12:,.0f} TFLOP/s ({gpu['embed_rate']['source']}).",
    ]
    if r["realm_split"]:
        x = r["realm_split"]
        lines += [
            "",
            f"At REALM's own split ({x['n']} builder, {x['trainer_devices']} trainer devices, any one device type) the model predicts "
            f"{x['staleness_steps']:,.0f} steps of staleness where REALM reports about {r['realm']['refresh_every']['value']}. For REALM's figure its builder must "
            f"have run {x['staleness_steps'] / r['realm']['refresh_every']['value']:.1f}x the trainer's FLOP/s per device (inference at a fixed length runs "
            "closer to peak than training), or its step cost more than the FLOPs counted here.",
        ]
    lines += [
        "",
        "## Index memory",
        "",
        "| index.type | bytes/vector | "
        + " | ".join(f"{c['blocks']:,} blocks (faiss / DenseIndex RAM)" for c in r["choices"])
        + f" | build on 1 thread, {blocks:,} |",
        "|---|---|" + "---|" * (len(r["choices"]) + 1),
    ]
    for kind in TYPES:
        cells = " | ".join(
            f"{_b(c['memory'][kind]['faiss'])} / {_b(c['memory'][kind]['dense_index'])}" for c in r["choices"]
        )
        lines.append(
            f"| {kind} | {ix[kind]['per_vector']['value']:,.1f} | {cells} | >= {_t(ix[kind]['build_seconds_per_vector']['value'] * blocks)} |"
        )
    lines += [
        "",
        f"Sources: {ix['flat']['per_vector']['source']} (and likewise per type). DenseIndex RAM adds the float32 vectors and int64 ids it keeps "
        f"({4 * DIM + 8} B a block; on disk pages with index.mmap: true). Build: {ix['hnsw']['build_seconds_per_vector']['source']}, times N (a lower bound for hnsw, "
        "whose insertion cost grows with log N; ivf_pq training on index.ivf_pq.train_size vectors not included).",
    ]
    lines += [
        "",
        "## Which runner and index.type",
        "",
        "One refresh (a full re-embedding) on this machine, and the runner that does it within "
        f"{r['choices'][0]['budget_minutes']:g} min (its time in brackets):",
        "",
        "| blocks | pipeline model, this machine | runner | BERT-base 288, this machine | runner | flat search, 512 queries | index.type |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in r["choices"]:
        lines.append(
            f"| {c['blocks']:,} | {_t(c['pipeline_local_seconds'])} | {c['pipeline']['runner']} ({_t(c['pipeline']['refresh_seconds'])}) | "
            f"{_t(c['bert_local_seconds'])} | {c['bert']['runner']} ({_t(c['bert']['refresh_seconds'])}) | "
            f">= {_t(c['flat_search_seconds_per_512_queries'])} | {c['bert']['index']} |"
        )
    lines += [
        "",
        "Pipeline model: the measured doc embedder at this corpus's block lengths; BERT-base: 288 wordpieces. Flat search: 2 N d FLOPs a query "
        f"at the fp32 GEMM rate (a lower bound). index.type: flat while a flat DenseIndex fits {r['choices'][0]['ram_gb']:g} GiB of RAM.",
    ]
    dr = r["default_run"]
    if "measured_staleness_steps" in dr:
        lines += [
            "",
            "## Check against the default run",
            "",
            f"The model predicts a refresh of the default run's {d['blocks']['value']:,} blocks in {dr['predicted_build_seconds']['value']:.1f} s on its builder thread, "
            f"{dr['predicted_staleness_steps']['value']:.1f} steps of staleness; the run measured {dr['measured_staleness_steps']['value']:.1f} "
            f"({dr['measured_staleness_steps']['source']})."
            + (
                f" Its first index took {dr['measured_initial_index_seconds']['value']:.1f} s against {dr['predicted_initial_index_seconds']['value']:.1f} s of embedding: "
                "at this size the fixed costs (tokenising, faiss, files) dominate; they do not grow with the corpus as embedding does."
                if "measured_initial_index_seconds" in dr
                else ""
            ),
        ]
    lines += ["", "## Assumptions", "", *[f"- {a}" for a in r["assumptions"]], "", f"Computed in {r['seconds']:.1f} s."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for kind in dict.fromkeys(x["devices"] for x in r["refresh"]):
        xs = [x for x in r["refresh"] if x["devices"] == kind]
        a.loglog([x["n"] for x in xs], [x["refresh_seconds"] / 3600 for x in xs], marker="o", label=kind + "s")
    a.axhline(1, color="grey", ls=":", label="1 hour")
    a.set(
        title=f"one refresh, {r['realm']['blocks']['value']:,} blocks (BERT-base, 288 wp)",
        xlabel="builder devices",
        ylabel="hours",
    )
    a.legend(fontsize=8)
    sizes = [c["blocks"] for c in r["choices"]]
    for kind in TYPES:
        (line,) = b.loglog(
            sizes,
            [c["memory"][kind]["dense_index"] / 2**30 for c in r["choices"]],
            marker="o",
            label=f"{kind}: DenseIndex RAM",
        )
        b.loglog(
            sizes,
            [c["memory"][kind]["faiss"] / 2**30 for c in r["choices"]],
            ls="--",
            color=line.get_color(),
            label=f"{kind}: faiss index alone",
        )
    b.set(title="index memory", xlabel="blocks", ylabel="GiB")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--throughput",
        type=Path,
        default=ROOT / "reports" / "throughput.json",
        help="bench/throughput.py's JSON (embed section; pretrain if run)",
    )
    ap.add_argument(
        "--mlflow",
        type=Path,
        default=ROOT / "mlruns.db",
        help="MLflow SQLite store: the pretrain step time when throughput.json has no pretrain section",
    )
    ap.add_argument(
        "--pretrain-metrics",
        type=Path,
        default=ROOT / "metrics" / "pretrain.json",
        help="the default run's refresh facts (the check)",
    )
    ap.add_argument(
        "--index-results",
        type=Path,
        default=ROOT / "bench" / "results" / "index.json",
        help="bench/index.py's JSON; absent = measure here",
    )
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument(
        "--index-sizes",
        type=int,
        nargs=2,
        default=[10_000, 20_000],
        help="random vectors per measured index (when measuring here)",
    )
    ap.add_argument("--threads", type=int, default=1, help="faiss threads for that measurement")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 8, 64], help="CPU workers (cores) building the index")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 16], help="GPUs building the index")
    ap.add_argument("--gpu", choices=sorted(GPUS), default="a100")
    ap.add_argument("--gpu-utilisation", type=float, default=0.4, help="share of the GPU's peak reached (assumption)")
    ap.add_argument(
        "--trainer-ratio",
        type=int,
        default=REALM["trainer_devices"][0] // REALM["builder_devices"][0],
        help="trainer devices per builder device",
    )
    ap.add_argument(
        "--choice-sizes",
        type=int,
        nargs="+",
        default=[10_000, 1_000_000, REALM["blocks"][0]],
        help="corpus sizes of the recommendation",
    )
    ap.add_argument("--budget-minutes", type=float, default=60, help="a runner must finish one refresh within this")
    ap.add_argument("--ram-gb", type=float, default=8, help="flat while a flat DenseIndex fits in this much RAM (GiB)")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "reports" / "scale_model.json", help="the JSON; .md and .png beside it"
    )
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = run(args)
    publish(results, [args.out, args.out.with_suffix(".md"), args.out.with_suffix(".png")], markdown, plot, None)
    return results


if __name__ == "__main__":
    main()
