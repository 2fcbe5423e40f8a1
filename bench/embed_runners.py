"""Block embedding of the whole corpus on each task runner: one process vs the shard map on a
thread pool vs the shard map on a Dask LocalCluster (and Ray when installed).

    python bench/embed_runners.py                                   # data/corpus + data/pretrain/retriever/doc
    python bench/embed_runners.py --runners thread dask --workers 2 --shards 2

Every row builds the same DenseIndex (flows/embedding.py, or `embed_blocks` directly for the
one-process row) and is checked against the one-process embeddings. Wall time includes what a
user waits for: starting the Dask cluster / Ray and loading the model in each worker. The
inputs are copied to a temporary directory first, so a stage rewriting data/ meanwhile cannot
change them. Prefect runs in local mode with a temporary PREFECT_HOME; its server start-up is
done before timing. Prints a markdown table and writes bench/results/embed_runners.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_process(params, blocks: Path, doc: Path):
    """The pre-map path: one `embed_blocks` call over the whole corpus in this process."""
    from realm_core.blocks import BlockStore, embed_blocks
    from realm_core.modeling import backbone_dir, load_embedder, load_tokenizer, resolve_device

    store = BlockStore.load(blocks, load_tokenizer(backbone_dir(params.model.backbone)), params.corpus.max_block_tokens)
    return embed_blocks(
        load_embedder(doc),
        store,
        resolve_device(params.device),
        params.pretrain.embed_batch_size,
        precision=params.index.embed_precision,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=Path, default=ROOT / "data" / "corpus" / "blocks.jsonl")
    ap.add_argument("--embedder", type=Path, default=ROOT / "data" / "pretrain" / "retriever" / "doc")
    ap.add_argument("--runners", nargs="+", default=["thread", "dask"], choices=["thread", "dask", "ray"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=2)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="embed-runners-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    from flows.env import configure

    configure(ROOT)
    import numpy as np
    import torch
    from prefect import flow

    from flows.embedding import build_index
    from realm_core.config import load_params
    from realm_core.index import DenseIndex

    blocks = Path(shutil.copy(args.blocks, work / "blocks.jsonl"))
    doc = Path(shutil.copytree(args.embedder, work / "doc"))
    params = load_params(ROOT / "params.yaml")
    params.corpus.shards = args.shards
    n_blocks = sum(1 for line in blocks.open() if line.strip())

    flow(name="warm-up")(lambda: None)()  # start Prefect's local server before any timing

    rows = []
    load = os.getloadavg()[0]
    start = time.perf_counter()
    reference = one_process(params, blocks, doc)
    rows.append(
        {
            "runner": f"one process, torch {torch.get_num_threads()} threads, no Prefect",
            "seconds": time.perf_counter() - start,
            "load_before": load,
            "max_abs_diff": 0.0,
        }
    )
    for kind in args.runners:
        params.runner.type = kind
        params.runner.workers = args.workers
        load = os.getloadavg()[0]
        start = time.perf_counter()
        index = DenseIndex.load(build_index(params, blocks, doc, work / f"index-{kind}", work / f"shards-{kind}"))
        seconds = time.perf_counter() - start
        assert index.ids.tolist() == list(range(n_blocks)), f"{kind}: ids differ"
        diff = float(np.abs(index.embeddings - reference).max())
        rows.append(
            {
                "runner": f"{kind} map, {args.workers} workers, {args.shards} shards",
                "seconds": seconds,
                "load_before": load,
                "max_abs_diff": diff,
            }
        )

    print(f"\nEmbedding {n_blocks} blocks ({args.blocks}) with {args.embedder}, {os.cpu_count()} CPUs\n")
    print("| runner | seconds | blocks/s | 1-min load before | max abs diff vs one process |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['runner']} | {r['seconds']:.1f} | {n_blocks / r['seconds']:.1f} | {r['load_before']:.2f} | {r['max_abs_diff']:.1e} |"
        )
    out = ROOT / "bench" / "results" / "embed_runners.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"blocks": n_blocks, "cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
