"""The faiss index choices (params.yaml `index.type`) measured: build time, query latency, recall@10, size.

    python bench/index.py                                    # 100k and 1M, random and real-derived (~15 min, 2 cores)
    python bench/index.py --sizes 100000 --types flat hnsw   # a subset
    python bench/index.py --set hnsw.ef_search=256 --set ivf_pq.nprobe=64   # other knobs than params.yaml's
    python bench/index.py --threads 1        # on a shared machine: 2 OpenMP threads fighting other jobs
                                             # made one flat query 17 ms instead of 2 ms here

Every index is built by the project's factory, `DenseIndex.build(x, ids, params.index)`, with the
knobs in params.yaml `index` (overridable with --set), and searched through `DenseIndex.search`
(so ivf_pq includes its exact re-ranking). All vectors have d = 128 (REALM section 3.2).

Datasets:
  random       Gaussian base vectors and Gaussian queries: the worst case for approximate search,
               where every vector is about equally far from every other (DESIGN.md 3b).
  real         the pipeline's pre-trained REALM retriever (data/pretrain/retriever): the document
               tower over the 10,033 vital passages + 2,067 SQuAD dev paragraphs (12,100 real
               vectors), the query tower over 1,000 SQuAD dev questions. Cached in
               bench/results/index_real_vectors.npz (--refresh-real recomputes it).
  real-interp  NOT real at 100k / 1M (no corpus that large exists here): synthetic points on the
               segments between each real vector and one of its 10 nearest real neighbours
               (SMOTE-style, a uniform position on the segment), so the set is denser but stays on
               the real vectors' manifold. Same real queries. Isotropic Gaussian jitter was tried
               first and rejected: its recall depended on the noise scale alone (HNSW at 100k: 0.93
               with sigma = half a neighbour distance, 0.55 at twice that; near-duplicates / noise).

Columns: build seconds (train + add); ms per query at batch 1 (median over --latency-queries) and
per query at batch 256; recall@10 = |top-10 ∩ exact top-10| / 10 over --queries queries (exact =
faiss.knn brute force); index MB = the serialised faiss index (DenseIndex also keeps the float32
vectors, N*d*4 bytes, for re-ranking and fine-tuning: memory-mapped with index.mmap: true).
Prints a markdown table and writes bench/results/index.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realm_core.config import IndexParams, load_params  # noqa: E402
from realm_core.index import DenseIndex  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
PASSAGES = [DATA / "wiki_vital_summaries" / "vital_passages.jsonl", DATA / "squad_open" / "squad_dev_paragraphs.jsonl"]
QUESTIONS = DATA / "squad_open" / "squad_dev_questions.jsonl"
RESULTS = ROOT / "bench" / "results"
DIM = 128


# ---------------------------------------------------------------------------- data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def embed_real(params: Any, n_queries: int, seed: int) -> dict[str, np.ndarray]:
    """Doc vectors of all passages and query vectors of n SQuAD dev questions, from the pipeline's retriever."""
    import torch

    from realm_core.blocks import Block, BlockStore, embed_blocks, query_batch
    from realm_core.modeling import backbone_dir, load_embedder, load_tokenizer

    retriever = ROOT / "data" / "pretrain" / "retriever"
    if not (retriever / "doc").is_dir() or not all(p.is_file() for p in [*PASSAGES, QUESTIONS]):
        raise SystemExit(
            f"real vectors need {retriever} (run the pipeline) and {DATA} (shared data); or pass --datasets random"
        )
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    rows = [r for p in PASSAGES for r in read_jsonl(p)]
    store = BlockStore(
        [Block(i, r["title"], r["text"], [], []) for i, r in enumerate(rows)],
        load_tokenizer(backbone_dir(params.model.backbone)),
        params.corpus.max_block_tokens,
    )
    cpu = torch.device("cpu")
    docs = embed_blocks(
        load_embedder(retriever / "doc"),
        store,
        cpu,
        batch_size=64,
        progress="embed real passages",
        precision=params.index.embed_precision,
    )
    questions = read_jsonl(QUESTIONS)
    pick = np.sort(
        np.random.default_rng(seed).choice(len(questions), size=min(n_queries, len(questions)), replace=False)
    )
    query = load_embedder(retriever / "query").eval()
    seqs = [store.query_ids(questions[i]["question"], params.model.max_query_tokens) for i in pick]
    with torch.inference_mode():
        queries = np.concatenate(
            [query(**query_batch(store, seqs[s : s + 128], cpu)).numpy() for s in range(0, len(seqs), 128)]
        )
    return {"docs": docs.astype(np.float32), "queries": queries.astype(np.float32)}


def real_vectors(params: Any, n_queries: int, seed: int, refresh: bool) -> dict[str, np.ndarray]:
    cache = RESULTS / "index_real_vectors.npz"
    if cache.is_file() and not refresh:
        with np.load(cache, allow_pickle=False) as z:
            if len(z["queries"]) >= n_queries:
                return {
                    "docs": z["docs"],
                    "queries": z["queries"][:n_queries],
                    "embed_seconds": float(z["embed_seconds"]),
                }
    start = time.perf_counter()
    vectors = embed_real(params, n_queries, seed)
    vectors["embed_seconds"] = np.float64(time.perf_counter() - start)
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **vectors)
    return {**vectors, "embed_seconds": float(vectors["embed_seconds"])}


def interpolated(real: np.ndarray, n: int, seed: int, neighbours: int = 10) -> np.ndarray:
    """n synthetic points a + t (b - a): a a real vector (each ~n/R times), b one of its `neighbours`
    nearest real vectors, t ~ U(0, 1). Denser than the real set, on the same low-dimensional manifold."""
    _, nn = faiss.knn(real, real, neighbours + 1)  # L2; column 0 is the vector itself
    rng = np.random.default_rng(seed)
    src = rng.permutation(np.resize(np.arange(len(real)), n))
    dst = nn[src, rng.integers(1, neighbours + 1, n)]
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    for start in range(0, n, 1 << 18):
        stop = min(n, start + (1 << 18))
        a, b = real[src[start:stop]], real[dst[start:stop]]
        out[start:stop] = a + rng.random((stop - start, 1), dtype=np.float32) * (b - a)
    return out


def gaussian(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 1 << 18):
        stop = min(n, start + (1 << 18))
        out[start:stop] = rng.standard_normal((stop - start, DIM), dtype=np.float32)
    return out


# ---------------------------------------------------------------------------- measurement


def recall_at(got: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got.tolist(), exact.tolist())]))


def measure(
    kind: str,
    spec: IndexParams,
    base: np.ndarray,
    queries: np.ndarray,
    exact: np.ndarray,
    latency_queries: int,
    seed: int,
) -> dict[str, Any]:
    """Build one index and time its queries (batch 1, batch 256); recall@10 against exact top-10 row numbers."""
    spec = spec.model_copy(update={"type": kind})
    ids = np.arange(len(base), dtype=np.int64)  # ids = rows, so results compare with faiss.knn's rows
    start = time.perf_counter()
    index = DenseIndex.build(base, ids, spec, seed=seed, progress=f"build {kind} {len(base):,}")
    build = time.perf_counter() - start
    for q in queries[:5]:  # warm-up
        index.search(q[None], 10)
    single = []
    for q in queries[:latency_queries]:
        t = time.perf_counter()
        index.search(q[None], 10)
        single.append(time.perf_counter() - t)
    found = []
    start = time.perf_counter()
    for s in range(0, len(queries), 256):
        found.append(index.search(queries[s : s + 256], 10)[1])
    batched = (time.perf_counter() - start) / len(queries)
    size = faiss.serialize_index(index.faiss_index).nbytes
    return {
        "index": kind,
        "build_s": round(build, 2),
        "ms_per_query_batch1": round(1000 * float(np.median(single)), 3),
        "ms_per_query_batch256": round(1000 * batched, 4),
        "recall_at_10": round(recall_at(np.concatenate(found), exact), 4),
        "index_mb": round(size / 2**20, 1),
        "vectors_mb": round(base.nbytes / 2**20, 1),
    }


def run_dataset(
    name: str, base: np.ndarray, queries: np.ndarray, spec: IndexParams, args: argparse.Namespace
) -> list[dict[str, Any]]:
    start = time.perf_counter()
    _, exact = faiss.knn(queries, base, 10, metric=faiss.METRIC_INNER_PRODUCT)  # [Q, 10] exact rows
    print(
        f"[{name} N={len(base):,}] exact top-10 of {len(queries)} queries: {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    rows = []
    for kind in args.types:
        row = {
            "data": name,
            "n": len(base),
            **measure(kind, spec, base, queries, exact, args.latency_queries, args.seed),
        }
        print("   ", row, flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- report


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| data | N | index | build s | ms/query (batch 1) | ms/query (batch 256) | recall@10 | index MB |"
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['n']:,} | {r['index']} | {r['build_s']:.1f} | {r['ms_per_query_batch1']:.3f} | "
            f"{r['ms_per_query_batch256']:.4f} | {r['recall_at_10']:.3f} | {r['index_mb']:.1f} |"
        )
    return "\n".join(lines)


def spec_with(overrides: list[str], base: IndexParams) -> IndexParams:
    """`--set hnsw.ef_search=256` on top of params.yaml's `index`, validated by the same pydantic model."""
    tree = base.model_dump()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. hnsw.ef_search=256")
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return IndexParams.model_validate(tree)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--datasets", nargs="+", default=["random", "real"], choices=["random", "real"])
    ap.add_argument("--types", nargs="+", default=["flat", "hnsw", "ivf_pq"], choices=["flat", "hnsw", "ivf_pq"])
    ap.add_argument("--queries", type=int, default=1000, help="queries for recall and batch-256 latency")
    ap.add_argument("--latency-queries", type=int, default=100, help="queries timed one at a time")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="index knob override, e.g. hnsw.ef_search=256"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="faiss OpenMP threads (default: all cores); 1 is faster when other jobs share the cores",
    )
    ap.add_argument("--refresh-real", action="store_true", help="re-embed the real passages instead of using the cache")
    ap.add_argument("--out", type=Path, default=RESULTS / "index.json")
    args = ap.parse_args()

    params = load_params(ROOT / "params.yaml")
    spec = spec_with(args.overrides, params.index)
    args.seed = params.seed
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    rows: list[dict[str, Any]] = []
    real_info: dict[str, Any] = {}
    if "random" in args.datasets:
        queries = gaussian(args.queries, args.seed + 1)
        for n in args.sizes:
            rows += run_dataset("random", gaussian(n, args.seed + n), queries, spec, args)
    if "real" in args.datasets:
        real = real_vectors(params, args.queries, args.seed, args.refresh_real)
        real_info = {
            "real_vectors": len(real["docs"]),
            "queries": len(real["queries"]),
            "embed_seconds": round(real["embed_seconds"], 1),
            "scaled_by": "interpolation between 10 nearest real neighbours",
        }
        rows += run_dataset("real", real["docs"], real["queries"], spec, args)
        for n in args.sizes:
            rows += run_dataset(
                "real-interp", interpolated(real["docs"], n, args.seed + n), real["queries"], spec, args
            )
    seconds = time.perf_counter() - started

    table = markdown(rows)
    print("\n" + table + f"\n\n{seconds / 60:.1f} min; index knobs: {json.dumps(spec.model_dump())}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join(["python", "bench/index.py", *sys.argv[1:]]),
        "seconds": round(seconds, 1),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "faiss": faiss.__version__,
            "faiss_threads": faiss.omp_get_max_threads(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "index_params": spec.model_dump(),
        "real": real_info,
        "rows": rows,
        "table": table,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
