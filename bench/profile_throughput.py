"""Where the time of bench/throughput.py's workloads goes: torch.profiler's operator table and
cProfile's Python functions over a few steps, on the default profile's data.

    python bench/profile_throughput.py embed                # embed_blocks with the pipeline's document embedder
    python bench/profile_throughput.py pretrain --steps 4   # pretrain() steps (no index refresh)
    python bench/profile_throughput.py finetune --steps 4   # finetune() steps at finetune.batch_size
    python bench/profile_throughput.py finetune --batch-size 1

The GEMM row also gives the matmul FLOPs torch.profiler counted (forward and backward) and their
rate over the wall time, against the same fp32 GEMM limit as bench/throughput.py measures.
Operators are grouped into GEMM (matmuls, forward and backward), attention, optimizer,
other operators; "outside operators" is the wall time no profiled operator accounts for
(Python, tokenisation, padding, faiss search). Everything runs with --threads torch threads.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.throughput import gemm_flops_per_second  # noqa: E402
from realm_core.blocks import BlockStore, embed_blocks  # noqa: E402
from realm_core.config import Params, load_params  # noqa: E402
from realm_core.modeling import backbone_dir, load_embedder, load_encoder, load_tokenizer  # noqa: E402

CPU = torch.device("cpu")
GROUPS = {
    "GEMM": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product", "aten::_softmax", "aten::_safe_softmax"),
    "optimizer": (
        "aten::_fused_adamw",
        "aten::_foreach",
        "aten::lerp",
        "aten::addcdiv",
        "aten::addcmul",
        "aten::sqrt",
        "aten::mul_",
        "aten::add_",
        "aten::div_",
    ),
}


def workload(args: argparse.Namespace, params: Params) -> Callable[[], None]:
    data = ROOT / "data"
    store = BlockStore.load(
        data / "corpus" / "blocks.jsonl",
        load_tokenizer(backbone_dir(params.model.backbone)),
        params.corpus.max_block_tokens,
    )
    if args.what == "embed":
        embedder = load_embedder(data / "pretrain" / "retriever" / "doc")
        subset = BlockStore(store.blocks[: args.blocks], store.tokenizer, store.max_block_tokens)
        return lambda: embed_blocks(
            embedder,
            subset,
            CPU,
            params.pretrain.embed_batch_size,
            progress=None,
            precision=params.index.embed_precision,
        )
    if args.what == "pretrain":
        from realm_core.modeling import load_retriever
        from realm_core.pretrain import Pretrainer, make_queries, pretrain
        from realm_core.refresh import SyncRefresher

        c = params.pretrain
        trainer = Pretrainer.from_params(
            load_retriever(data / "ict" / "retriever"), load_encoder(data / "ict" / "encoder"), store, c, CPU
        )
        queries = make_queries(store, c.masking, params.model.max_query_tokens, c.max_masks, params.seed)
        refresher = SyncRefresher(store, CPU, c.embed_batch_size, 0)  # refresh_every 0: no refresh inside the profile
        index = refresher.initial(trainer.retriever.doc)
        refresher.initial = lambda doc, step=0, history=None: index  # built once here, outside the profile
        return lambda: pretrain(
            trainer, queries, c.model_copy(update={"steps": args.steps}), refresher=refresher, seed=params.seed
        )
    from realm_core.answer import load_open_qa
    from realm_core.finetune import finetune
    from realm_core.modeling import SpanReader
    from realm_core.paths import Paths
    from realm_core.questions import read_qa_jsonl

    c = params.finetune
    reader = SpanReader(load_encoder(data / "pretrain" / "encoder").bert, hidden=c.span_hidden)
    model = load_open_qa(
        params,
        Paths(ROOT),
        load_embedder(data / "pretrain" / "retriever" / "query"),
        reader,
        data / "finetune" / "index",
    )
    questions = read_qa_jsonl(data / "corpus" / "qa_train.jsonl")
    batch = args.batch_size or c.batch_size
    return lambda: finetune(
        model,
        questions,
        c.model_copy(update={"steps": args.steps, "batch_size": batch}),
        seed=params.seed,
    )


def group_of(name: str) -> str:
    return next((g for g, prefixes in GROUPS.items() if name.startswith(prefixes)), "other operators")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["embed", "pretrain", "finetune"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, help="finetune: questions per step (default: params finetune.batch_size)")
    ap.add_argument("--blocks", type=int, default=512, help="embed: blocks to embed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--gemm-size", type=int, default=2048)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    random.seed(params.seed)
    torch.manual_seed(params.seed)
    run = workload(args, params)
    print(f"1-min load before: {os.getloadavg()[0]:.2f}")
    python = cProfile.Profile()
    gemm = gemm_flops_per_second(args.gemm_size, 10)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        start = time.perf_counter()
        python.enable()
        run()
        python.disable()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    groups: dict[str, float] = {}
    for e in events:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total / 1e6
    groups["outside operators"] = max(0.0, wall - sum(groups.values()))
    flops = sum(e.flops for e in events if group_of(e.key) == "GEMM")
    print(
        f"\n{args.what}: {wall:.2f} s wall at {args.threads} threads; matmuls {flops / 1e9:.1f} GFLOP = {flops / wall / 1e9:.1f} GFLOP/s over the wall, "
        f"{flops / wall / gemm:.1%} of the GEMM limit ({gemm / 1e9:.0f} GFLOP/s, torch.mm {args.gemm_size}^3)\n\n| where | seconds | share |\n|---|---:|---:|"
    )
    for g, s in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {s:.2f} | {s / wall:.1%} |")
    text = io.StringIO()
    pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(15)
    print("\ncProfile, top Python functions by own time:\n" + text.getvalue())


if __name__ == "__main__":
    main()
