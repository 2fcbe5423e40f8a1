"""Throughput against the limit (issue #5 part 4): every figure is a ratio of two measurements
taken in the same run, on the same inputs, with the same torch thread count.

    python bench/throughput.py                           # all sections, default profile's data (~10 min on 2 quiet cores)
    python bench/throughput.py --sections embed finetune # a subset: embed | pretrain | finetune | stages
    python bench/throughput.py --quick --blocks ... ...  # smoke test on tiny inputs (tests/test_bench_throughput.py)

Sections:
  embed     block embedding (realm_core.blocks.embed_blocks) of data/corpus/blocks.jsonl by the
            pipeline's document embedder (data/pretrain/retriever/doc, 2 layers) and by the whole
            6-layer backbone (modeling.backbone_dir), in blocks/s and tokens/s (real tokens, no
            padding), against (a) the GEMM-bound limit of this CPU: the FLOP/s of a large fp32
            matmul (torch.mm, n x n, best of several) times the encoder's FLOPs per block,
                FLOPs(block of n tokens) = layers * (2 * (4 h^2 + 2 h f) * n + 4 h n^2)
            (2 FLOPs per multiply-add; Q, K, V, O are 4 h x h matmuls and the FFN 2 h x f ones;
            attention's QK^T and AV are 2 h n FLOPs each per token; embeddings, LayerNorm, GELU,
            softmax, the pooler and the h -> 128 projection are not counted), and the same against
            a large bf16 matmul (AMX / AVX-512 bf16 where the CPU has them), both measured in every
            repeat beside the embeddings (the best of all is the limit), and (b)
            sentence-transformers' `encode` (fp32) on the same weights and the same wordpieces.
            One row per embedding kernel (--precisions, realm_core/precision.py: fp32, a bf16 copy
            of the tower, an int8 dynamically quantised copy), all interleaved with `encode`; the
            kernel index.embed_precision resolves to is the default path (embed.doc.*, embed.backbone.*,
            embed_vs_sentence_transformers). Then gold-paragraph recall@1/5/20 on SQuAD-open
            (../shared/data) of the pipeline's retriever and of MiniLM whole, each kernel embedding
            the paragraphs (precision_recall).
            An AVX2-only CPU can be emulated (torch's and oneDNN's kernels; fbgemm's int8 cannot be limited):
                ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
                python bench/throughput.py --sections embed --precisions fp32 int8 --as-default int8 --out ...
  pretrain  REALM pre-training (realm_core.pretrain.pretrain) from the ICT artefacts, steps/s with
            the asynchronous index builder vs the synchronous refresh (refresh.make_refresher), and
            the share of the trainer's time spent waiting for the index:
            sum(records[1:].wait_seconds) / loop seconds (the first, blocking build is left out of both).
  finetune  Open-QA fine-tuning (realm_core.finetune.finetune) over the frozen index: questions/s at
            finetune.batch_size questions per step vs one question per step (the HF port's limit),
            over the same number of questions.
  stages    the default pipeline's wall time per stage, read from MLflow (runs tagged realm.stage):
            for each stage, its latest nested run under a `dvc repro` pipeline run (DVC skips stages
            that are up to date, so the stages may come from different pipeline runs). This is the
            stage flow's time; the stage process's start-up (imports) is not in it.

Load: the machine may be shared. Each section waits (up to --max-wait s) for the 1-minute load
to fall below --max-load before each measurement, records the load it started at and the CPU
other processes used meanwhile ("others' cores"), and measures again if that exceeded
--max-others. Prints markdown tables; writes bench/results/throughput.json ("ratios": every ratio).
`--unfused-adamw` trains with torch's default AdamW loop: the "before" of modeling's fused AdamW.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from realm_core.blocks import BlockStore, embed_blocks  # noqa: E402
from realm_core.config import Params, load_params  # noqa: E402
from realm_core.modeling import Embedder, backbone_dir, load_bert, load_embedder, load_tokenizer  # noqa: E402
from realm_core.precision import BF16_FLAGS, HALF, KERNELS, cpu_flags, resolve_embed_precision  # noqa: E402

CPU = torch.device("cpu")
ISA_ENV = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
)  # recorded when set (emulated CPUs)
SECTIONS = ("embed", "pretrain", "finetune", "stages")


# ---------------------------------------------------------------------------- measuring on a shared machine


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes have used since boot (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()  # children count once joined (the async index builder is joined in refresher.close)
    return t.user + t.system + t.children_user + t.children_system


class Gate:
    """Waits for a quiet machine before a measurement, records how quiet it was, and measures again
    (up to `attempts` times) when other processes used more than `max_others` cores meanwhile.

    Each section may wait `max_wait` seconds in all; once that is spent, it measures anyway."""

    def __init__(self, max_load: float, max_wait: float, max_others: float = 0.25, attempts: int = 3):
        self.max_load, self.max_wait, self.max_others, self.attempts = max_load, max_wait, max_others, attempts
        self.section()

    def section(self) -> None:
        self.deadline = time.monotonic() + self.max_wait

    def measure(
        self, label: str, fn: Callable[..., Any], setup: Callable[[], Any] | None = None
    ) -> tuple[Any, dict[str, float]]:
        """(fn(), {"seconds", "load_before", "others_cores", "attempts"}) with fn timed alone.

        With `setup`, each attempt times fn(setup()) and setup is not timed (fresh models for a retry)."""
        for attempt in range(1, self.attempts + 1):
            state = setup() if setup is not None else None
            while (load := os.getloadavg()[0]) > self.max_load and time.monotonic() < self.deadline:
                print(f"  [{label}] 1-min load {load:.2f} > {self.max_load}: waiting", file=sys.stderr, flush=True)
                time.sleep(min(20.0, max(0.0, self.deadline - time.monotonic())))
            busy, own, start = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
            result = fn(state) if setup is not None else fn()
            seconds = time.perf_counter() - start
            others = max(0.0, (_busy_cpu_seconds() - busy) - (_own_cpu_seconds() - own)) / seconds
            if others <= self.max_others or attempt == self.attempts or time.monotonic() > self.deadline:
                break
            print(
                f"  [{label}] other processes used {others:.2f} cores meanwhile: measuring again",
                file=sys.stderr,
                flush=True,
            )
        return result, {"seconds": seconds, "load_before": load, "others_cores": others, "attempts": attempt}


# ---------------------------------------------------------------------------- the GEMM limit and the encoder's FLOPs


def gemm_flops_per_second(n: int, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` at the current thread count (best of `repeats`)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: MKL / oneDNN pick their kernels, pages are touched
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def encoder_flops(hidden: int, ffn: int, layers: int, lengths: np.ndarray) -> float:
    """Matmul FLOPs of a BERT encoder over sequences of `lengths` tokens (formula in the module docstring)."""
    n = np.asarray(lengths, dtype=np.float64)
    per_token = 2.0 * (4 * hidden * hidden + 2 * hidden * ffn)
    return layers * float((per_token * n + 4.0 * hidden * n**2).sum())


def padded_lengths(lengths: np.ndarray, batch_size: int) -> np.ndarray:
    """The lengths embed_blocks actually computes: length-sorted batches, each padded to its longest."""
    ordered = np.sort(lengths, kind="stable")
    out = ordered.copy()
    for start in range(0, len(ordered), batch_size):
        out[start : start + batch_size] = ordered[start : start + batch_size].max()
    return out


# ---------------------------------------------------------------------------- 1. block embedding


def sentence_transformer_twin(embedder: Embedder, backbone: Path, max_tokens: int):
    """sentence-transformers' model with the embedder's exact weights: Transformer (the backbone
    directory, cut to the embedder's depth) -> mean Pooling -> Dense(h -> d, identity) -> LayerNorm."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, LayerNorm, Pooling, Transformer

    if embedder.pooling != "mean":
        raise SystemExit(
            "the sentence-transformers comparison builds a mean-pooling model; this embedder pools by [CLS]"
        )
    config = embedder.bert.config
    transformer = Transformer(
        str(backbone), config_kwargs={"num_hidden_layers": config.num_hidden_layers}, max_seq_length=max_tokens
    )
    transformer.model.load_state_dict(embedder.bert.state_dict(), strict=True)
    dense = Dense(config.hidden_size, embedder.projection.out_features, activation_function=torch.nn.Identity())
    dense.linear.load_state_dict(embedder.projection.state_dict())
    norm = LayerNorm(embedder.projection.out_features)
    norm.norm.load_state_dict(embedder.norm.state_dict())
    return SentenceTransformer(modules=[transformer, Pooling(config.hidden_size, "mean"), dense, norm], device="cpu")


def same_model_check(embedder: Embedder, st, texts: list[str]) -> float:
    """Max |ST - ours| on ST's own tokenisation (segment ids all 0): proves the twin is the same model."""
    batch = st.tokenize(texts)
    with torch.inference_mode():
        ours = embedder.eval()(batch["input_ids"], batch["attention_mask"], torch.zeros_like(batch["input_ids"]))
    return float(np.abs(st.encode(texts, batch_size=len(texts)) - ours.numpy()).max())


def embed_rows(args: argparse.Namespace, params: Params, gate: Gate, out: dict) -> None:
    backbone = backbone_dir(args.backbone or params.model.backbone)
    tokenizer = load_tokenizer(backbone)
    store, tok_m = gate.measure(
        "tokenise blocks", lambda: BlockStore.load(args.blocks, tokenizer, params.corpus.max_block_tokens)
    )
    lengths = np.array([len(store.doc_sequence(i)[0]) for i in range(len(store))])
    batch = params.pretrain.embed_batch_size
    texts = [f"{b.title} {tokenizer.sep_token} {b.text}" for b in store.blocks]  # the same wordpieces as doc_sequence
    same_ids = sum(
        ids == store.doc_sequence(i)[0] for i, ids in enumerate(tokenizer(texts, add_special_tokens=True)["input_ids"])
    )
    default = args.as_default or resolve_embed_precision(params.index.embed_precision, CPU)
    kernels = list(dict.fromkeys([*args.precisions, default]))
    # measured in every repeat beside the embeddings; the best of all is the limit. bf16 only when a bf16 kernel runs:
    # without bf16 instructions (an emulated AVX2 CPU) a bf16 matmul falls back to a reference kernel that takes minutes
    limits: dict[str, list] = {"fp32": [], **({"bf16": []} if "bf16" in kernels else {})}

    def measure_limits() -> None:
        for name in limits:
            limits[name].append(
                gate.measure(
                    f"gemm {name}",
                    lambda name=name: gemm_flops_per_second(
                        args.gemm_size, args.gemm_repeats, HALF.get(name, torch.float32)
                    ),
                )
            )

    torch.manual_seed(params.seed)
    models = {
        "doc embedder (pipeline)": load_embedder(args.doc),
        "whole backbone": Embedder(load_bert(backbone), params.model.retriever_dim, params.model.pooling),
    }
    rows = []
    for name, embedder in models.items():
        c = embedder.bert.config
        st = sentence_transformer_twin(embedder, backbone, params.corpus.max_block_tokens)
        useful = encoder_flops(c.hidden_size, c.intermediate_size, c.num_hidden_layers, lengths)
        padded = encoder_flops(c.hidden_size, c.intermediate_size, c.num_hidden_layers, padded_lengths(lengths, batch))
        ours_runs: dict[str, list] = {k: [] for k in kernels}
        ours: dict[str, np.ndarray] = {}
        st_runs = []
        for _ in range(args.repeats):  # interleaved, best of each: all see the same machine
            measure_limits()
            for k in (
                kernels
            ):  # the kernel's copy of the weights (bf16 cast / int8 quantisation) is made inside, so it is timed
                ours[k], m = gate.measure(
                    f"embed {name} {k}",
                    lambda k=k: embed_blocks(embedder, store, CPU, batch, progress=None, precision=k),  # noqa: B023 (called here)
                )
                ours_runs[k].append(m)
            theirs, m = gate.measure(
                f"st.encode {name}",
                lambda: st.encode(texts, batch_size=batch, convert_to_numpy=True),  # noqa: B023 (called here)
            )
            st_runs.append(m)
        st_best = min(st_runs, key=lambda m: m["seconds"])
        reference = ours.get("fp32")
        for k in kernels:
            best = min(ours_runs[k], key=lambda m: m["seconds"])
            rows.append(
                {
                    "model": name,
                    "precision": k,
                    "default": k == default,
                    "layers": c.num_hidden_layers,
                    "hidden": c.hidden_size,
                    "blocks": len(store),
                    "real_tokens": int(lengths.sum()),
                    "padding_fraction": 1 - lengths.sum() / padded_lengths(lengths, batch).sum(),
                    "batch_size": batch,
                    "seconds": best["seconds"],
                    "load_before": best["load_before"],
                    "others_cores": best["others_cores"],
                    "blocks_per_second": len(store) / best["seconds"],
                    "tokens_per_second": lengths.sum() / best["seconds"],
                    "useful_flops": useful,
                    "padded_flops": padded,
                    "flops_per_second": useful / best["seconds"],
                    "st_seconds": st_best["seconds"],
                    "st_load_before": st_best["load_before"],
                    "st_others_cores": st_best["others_cores"],
                    "ratio_to_sentence_transformers": st_best["seconds"] / best["seconds"],
                    "ratio_to_sentence_transformers_with_tokenising": st_best["seconds"]
                    / (best["seconds"] + tok_m["seconds"]),
                    "st_same_wordpieces": int(same_ids),
                    "st_same_model_max_abs_diff": same_model_check(embedder, st, texts[:8]),
                    "st_cosine_min": float(cosine_rows(ours[k], theirs).min()),
                    "cosine_to_fp32_min": float(cosine_rows(ours[k], reference).min())
                    if reference is not None
                    else None,
                    "all_seconds": [m["seconds"] for m in ours_runs[k]],
                    "st_all_seconds": [m["seconds"] for m in st_runs],
                }
            )
    top = {name: max(runs, key=lambda r: r[0]) for name, runs in limits.items()}
    bf16_limit = top["bf16"][0] if "bf16" in top else None
    for r in rows:
        r["ratio_to_gemm_limit"] = r["flops_per_second"] / top["fp32"][0]
        r["ratio_to_bf16_gemm_limit"] = r["flops_per_second"] / bf16_limit if bf16_limit else None
    out["gemm"] = {
        "n": args.gemm_size,
        "flops_per_second": top["fp32"][0],
        "bf16_flops_per_second": bf16_limit,
        **{f"measure_{k}": v for k, v in top["fp32"][1].items()},
        **{f"bf16_measure_{k}": v for k, v in top.get("bf16", (0, {}))[1].items()},
        **{
            f"{'' if name == 'fp32' else name + '_'}all_flops_per_second": [f for f, _ in runs]
            for name, runs in limits.items()
        },
    }
    out["embed"] = {
        "tokenise_seconds": tok_m["seconds"],
        "default_precision": default,
        "requested_precision": params.index.embed_precision,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_cpu_flags": sorted(BF16_FLAGS & cpu_flags()),
        "isa_env": {v: os.environ[v] for v in ISA_ENV if v in os.environ},
        "rows": rows,
    }
    for r in rows:
        key = "doc" if r["model"].startswith("doc") else "backbone"
        for name in (f"{key}.{r['precision']}", *([key] if r["default"] else [])):  # embed.doc.* = the default path
            out["ratios"][f"embed.{name}.achieved_over_gemm_limit"] = r["ratio_to_gemm_limit"]
            if r["ratio_to_bf16_gemm_limit"] is not None:
                out["ratios"][f"embed.{name}.achieved_over_bf16_gemm_limit"] = r["ratio_to_bf16_gemm_limit"]
            out["ratios"][f"embed.{name}.ours_over_sentence_transformers"] = r["ratio_to_sentence_transformers"]
            out["ratios"][f"embed.{name}.ours_with_tokenising_over_sentence_transformers"] = r[
                "ratio_to_sentence_transformers_with_tokenising"
            ]
    default_ratios = [r["ratio_to_sentence_transformers"] for r in rows if r["default"]]
    out["ratios"]["embed_vs_sentence_transformers"] = max(
        default_ratios
    )  # the better model's default path; the other is beside it
    out["ratios"]["embed_vs_sentence_transformers_worst_model"] = min(default_ratios)
    if args.recall:
        out["embed"]["recall"] = precision_recall(
            args, params, kernels, tokenizer
        )  # differences, not ratios: kept out of "ratios"


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def precision_recall(args: argparse.Namespace, params: Params, kernels: list[str], tokenizer) -> dict:
    """Gold-paragraph recall@k on SQuAD-open (real data, ../shared/data) with each kernel embedding
    the 2,067 paragraphs; the questions are embedded once, in fp32 (only index builds use the
    kernel). Two retrievers: the pipeline's (data/pretrain/retriever, 2 layers, trained on the
    vital corpus only) and all-MiniLM-L6-v2 whole as one shared tower (mean pooling, identity
    projection, LayerNorm), a strong retriever. Paragraphs are cut to 256 wordpieces, as in bench/quality.py."""
    from bench.quality import dense_rankings, embed_questions, passage_store
    from realm_core.benchmarks import gold_sets, squad_open
    from realm_core.metrics import hit_table, recall_at_k

    ks = [1, 5, 20]
    if not args.shared_data.is_dir():
        return {"skipped": f"{args.shared_data} is absent", "rows": []}
    squad = squad_open(
        args.shared_data, max_questions=args.recall_questions, max_passages=args.recall_passages, seed=params.seed
    )
    store = passage_store(squad, tokenizer)
    gold = gold_sets(squad)
    retrievers = {
        "pipeline retriever": (
            load_embedder(args.pretrained / "retriever" / "query"),
            load_embedder(args.pretrained / "retriever" / "doc"),
        ),
        "MiniLM whole": (minilm := minilm_embedder(backbone_dir(args.backbone or params.model.backbone)), minilm),
    }
    rows = []
    for name, (query, doc) in retrievers.items():
        questions = embed_questions(
            query, store, squad.questions, params.model.max_query_tokens, params.pretrain.embed_batch_size
        )  # [Q, d]
        recall = {}
        for k in kernels:
            docs = embed_blocks(doc, store, CPU, params.pretrain.embed_batch_size, progress=None, precision=k)  # [P, d]
            recall[k] = {
                str(n): 100.0 * v
                for n, v in zip(ks, recall_at_k(hit_table(dense_rankings(docs, questions, max(ks)), gold), ks).values())
            }
        fp32 = recall.get("fp32")
        rows += [
            {
                "retriever": name,
                "precision": k,
                "recall": recall[k],
                "recall_at_5_minus_fp32": recall[k]["5"] - fp32["5"] if fp32 else None,
            }
            for k in kernels
        ]
    return {
        "benchmark": "squad_open",
        "passages": len(store),
        "questions": len(squad.questions),
        "ks": ks,
        "rows": rows,
    }


def minilm_embedder(backbone: Path) -> Embedder:
    """The whole backbone as an Embedder that ranks like all-MiniLM-L6-v2: mean pooling, identity projection."""
    bert = load_bert(backbone)
    h = bert.config.hidden_size
    embedder = Embedder(bert, h, "mean")
    with torch.no_grad():
        embedder.projection.weight.copy_(torch.eye(h))
        embedder.projection.bias.zero_()
    return embedder


def _giga(flops: float | None) -> str:
    return "not measured" if flops is None else f"{flops / 1e9:.1f}"


def _share(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.1%}"


def print_embed(out: dict) -> None:
    g, e = out["gemm"], out["embed"]
    print(
        f"\n### Block embedding vs the GEMM limits and sentence-transformers\n\nGEMM limits: torch.mm {g['n']}x{g['n']} fp32 = "
        f"{g['flops_per_second'] / 1e9:.1f} GFLOP/s, bf16 = {_giga(g['bf16_flops_per_second'])} GFLOP/s at {out['meta']['threads']} threads "
        f"(load before {g['measure_load_before']:.2f}). Tokenising the blocks once (BlockStore): {e['tokenise_seconds']:.2f} s. "
        f"index.embed_precision={e['requested_precision']} resolves to **{e['default_precision']}** here (bf16 flags: "
        f"{', '.join(e['bf16_cpu_flags']) or 'none'}; torch CPU capability {e['cpu_capability']}{'; ' + str(e['isa_env']) if e['isa_env'] else ''}).\n"
    )
    print(
        "| model | kernel | layers | blocks | real tokens | padding | seconds | blocks/s | tokens/s | useful GFLOP/s | of fp32 GEMM | of bf16 GEMM "
        "| ST encode s | ours / ST speed | incl. tokenising | cosine to fp32 | load before | others' cores |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in e["rows"]:
        cos = "" if r["cosine_to_fp32_min"] is None else f"{r['cosine_to_fp32_min']:.4f}"
        print(
            f"| {r['model']} | {r['precision']}{' (default)' if r['default'] else ''} | {r['layers']} | {r['blocks']} | {r['real_tokens']} "
            f"| {r['padding_fraction']:.1%} | {r['seconds']:.2f} | {r['blocks_per_second']:.1f} | {r['tokens_per_second']:.0f} "
            f"| {r['flops_per_second'] / 1e9:.1f} | {r['ratio_to_gemm_limit']:.1%} | {_share(r['ratio_to_bf16_gemm_limit'])} "
            f"| {r['st_seconds']:.2f} | {r['ratio_to_sentence_transformers']:.2f}x | {r['ratio_to_sentence_transformers_with_tokenising']:.2f}x "
            f"| {cos} | {r['load_before']:.2f} | {r['others_cores']:.2f} |"
        )
    for r in e["rows"]:
        if r["precision"] == e["rows"][0]["precision"]:
            print(
                f"\n{r['model']}: ST input = `title [SEP] text`, the same wordpieces for {r['st_same_wordpieces']}/{r['blocks']} blocks; "
                f"same weights (max |diff| {r['st_same_model_max_abs_diff']:.1e} on identical inputs); ST has no segment ids, so body "
                f"tokens get segment 0 (ours 1): cosine of the two embeddings >= {r['st_cosine_min']:.4f}.",
                end="",
            )
    print()
    if (rec := e.get("recall")) and rec["rows"]:
        print(
            f"\nRecall on {rec['benchmark']} ({rec['questions']} questions, {rec['passages']} paragraphs), gold paragraph; "
            f"paragraphs embedded with each kernel, questions in fp32:\n"
        )
        print("| retriever | kernel | recall@1 | recall@5 | recall@20 | recall@5 - fp32 (points) |")
        print("|---|---|---:|---:|---:|---:|")
        for r in rec["rows"]:
            delta = "" if r["recall_at_5_minus_fp32"] is None else f"{r['recall_at_5_minus_fp32']:+.2f}"
            print(
                f"| {r['retriever']} | {r['precision']} | {r['recall']['1']:.2f} | {r['recall']['5']:.2f} | {r['recall']['20']:.2f} | {delta} |"
            )


# ---------------------------------------------------------------------------- 2. pre-training: async vs sync refresh


def pretrain_rows(
    args: argparse.Namespace, params: Params, gate: Gate, work: Path, store: BlockStore, out: dict
) -> None:
    from realm_core.modeling import load_encoder, load_retriever
    from realm_core.pretrain import Pretrainer, make_queries, pretrain
    from realm_core.refresh import make_refresher

    c = params.pretrain
    queries = make_queries(store, c.masking, params.model.max_query_tokens, c.max_masks, params.seed)
    rows = []
    for mode in ("sync", "async"):

        def setup(mode: str = mode) -> tuple:
            random.seed(params.seed)
            torch.manual_seed(params.seed)
            trainer = Pretrainer.from_params(
                load_retriever(args.ict / "retriever"), load_encoder(args.ict / "encoder"), store, c, CPU
            )
            refresher = make_refresher(
                args.refresh_every,
                mode,
                store,
                CPU,
                c.embed_batch_size,
                work_dir=work / f"refresh-{mode}",
                max_staleness=c.max_staleness,
                threads=c.refresh_threads,
            )
            return trainer, refresher, time_close(refresher)

        def run(state: tuple) -> tuple:
            pretrain(
                state[0],
                queries,
                c.model_copy(update={"steps": args.pretrain_steps}),
                refresher=state[1],
                seed=params.seed,
            )
            return state

        (trainer, refresher, shutdown), m = gate.measure(f"pretrain {mode}", run, setup)
        records = refresher.records
        loop = m["seconds"] - records[0].wait_seconds - shutdown["seconds"]
        waited = sum(r.wait_seconds for r in records[1:])
        rows.append(
            {
                "mode": mode,
                "steps": args.pretrain_steps,
                "refresh_every": args.refresh_every,
                "seconds": m["seconds"],
                "initial_index_seconds": records[0].wait_seconds,
                "shutdown_seconds": shutdown["seconds"],
                "loop_seconds": loop,
                "steps_per_second": args.pretrain_steps / loop,
                "refreshes_swapped_in": len(records) - 1,
                "mean_staleness": float(np.mean([r.staleness for r in records[1:]])) if records[1:] else 0.0,
                "wait_seconds": waited,
                "wait_fraction": waited / loop,
                "build_seconds": [r.build_seconds for r in records],
                "load_before": m["load_before"],
                "others_cores": m["others_cores"],
                "attempts": m["attempts"],
            }
        )
    out["pretrain"] = {
        "queries": len(queries),
        "batch_size": c.batch_size,
        "top_k": c.top_k,
        "refresh_threads": c.refresh_threads,
        "rows": rows,
    }
    out["ratios"]["pretrain.async_over_sync_steps_per_second"] = (
        rows[1]["steps_per_second"] / rows[0]["steps_per_second"]
    )


def time_close(refresher) -> dict[str, float]:
    """Times refresher.close(), which pretrain() calls last: stopping the async builder waits for
    the build in flight (up to 10 s). That is not a training step, so the loop time leaves it out."""
    box, close = {"seconds": 0.0}, refresher.close

    def timed() -> None:
        start = time.perf_counter()
        close()
        box["seconds"] += time.perf_counter() - start

    refresher.close = timed
    return box


def print_pretrain(out: dict) -> None:
    p = out["pretrain"]
    print(
        f"\n### Pre-training: asynchronous vs synchronous index refresh\n\n{p['queries']} salient-span queries, batch {p['batch_size']}, "
        f"k = {p['top_k']}; async builder threads: {p['refresh_threads']}. Loop = wall time minus the first (blocking) index build and minus stopping the builder at the end.\n"
    )
    print(
        "| refresh | steps | refresh every | first index s | loop s | builder stop s | steps/s | refreshes swapped in | mean staleness "
        "| trainer wait s | wait share | load before | others' cores |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in p["rows"]:
        print(
            f"| {r['mode']} | {r['steps']} | {r['refresh_every']} | {r['initial_index_seconds']:.1f} | {r['loop_seconds']:.1f} | {r['shutdown_seconds']:.1f} "
            f"| {r['steps_per_second']:.3f} | {r['refreshes_swapped_in']} "
            f"| {r['mean_staleness']:.1f} | {r['wait_seconds']:.2f} | {r['wait_fraction']:.1%} | {r['load_before']:.2f} | {r['others_cores']:.2f} |"
        )
    print(f"\nasync / sync steps/s: {out['ratios']['pretrain.async_over_sync_steps_per_second']:.2f}x")


# ---------------------------------------------------------------------------- 3. fine-tuning: batched vs one question per step


def finetune_rows(args: argparse.Namespace, params: Params, gate: Gate, store: BlockStore, out: dict) -> None:
    from realm_core.finetune import OpenQA, finetune
    from realm_core.index import DenseIndex
    from realm_core.modeling import SpanReader, load_encoder
    from realm_core.questions import read_qa_jsonl

    c = params.finetune
    questions = read_qa_jsonl(args.qa)
    index = DenseIndex.load(args.index, params.index)
    if len(index) != len(store):
        raise SystemExit(
            f"{args.index}: {len(index)} vectors but {args.blocks} has {len(store)} blocks; run the pipeline (`realm run`) first"
        )
    n = args.questions
    rows = []
    for batch in (c.batch_size, 1):
        steps = max(1, n // batch)

        def setup() -> OpenQA:
            torch.manual_seed(params.seed)
            reader = SpanReader(load_encoder(args.pretrained / "encoder").bert, hidden=c.span_hidden)
            return OpenQA(
                load_embedder(args.pretrained / "retriever" / "query"),
                reader,
                store,
                index,
                device=CPU,
                max_query_tokens=params.model.max_query_tokens,
                max_span=c.max_span_tokens,
            )

        def run(model: OpenQA, batch: int = batch, steps: int = steps) -> None:
            finetune(
                model,
                questions,
                c.model_copy(update={"steps": steps, "batch_size": batch}),
                seed=params.seed,
            )

        _, m = gate.measure(f"finetune batch {batch}", run, setup)
        done = steps * min(batch, len(questions))
        rows.append(
            {
                "batch_size": batch,
                "steps": steps,
                "questions": done,
                "seconds": m["seconds"],
                "questions_per_second": done / m["seconds"],
                "load_before": m["load_before"],
                "others_cores": m["others_cores"],
                "attempts": m["attempts"],
            }
        )
    out["finetune"] = {
        "train_questions": len(questions),
        "blocks_read": c.top_k,
        "retriever_top_k": min(c.retriever_top_k, len(store)),
        "rows": rows,
    }
    out["ratios"]["finetune.batched_over_single_questions_per_second"] = (
        rows[0]["questions_per_second"] / rows[1]["questions_per_second"]
    )


def print_finetune(out: dict) -> None:
    f = out["finetune"]
    print(
        f"\n### Open-QA fine-tuning: batched vs one question per step\n\n{f['blocks_read']} blocks read per question; retriever loss over "
        f"the top {f['retriever_top_k']} blocks.\n"
    )
    print("| questions per step | steps | questions | seconds | questions/s | load before | others' cores |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in f["rows"]:
        print(
            f"| {r['batch_size']} | {r['steps']} | {r['questions']} | {r['seconds']:.1f} | {r['questions_per_second']:.2f} | {r['load_before']:.2f} | {r['others_cores']:.2f} |"
        )
    print(f"\nbatched / one per step: {out['ratios']['finetune.batched_over_single_questions_per_second']:.2f}x")


# ---------------------------------------------------------------------------- 4. the pipeline's stages, from MLflow


def stage_rows(tracking_uri: str, experiment: str, out: dict) -> None:
    """Each stage's latest nested run under a default pipeline run (`dvc repro`, not a `dvc exp run` experiment)."""
    from mlflow import MlflowClient

    from flows.stages import STAGES

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"{tracking_uri}: no MLflow experiment {experiment!r}; run the pipeline (`realm run`) first")
    runs = client.search_runs(
        [found.experiment_id],
        "attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    parents = {
        r.info.run_id: r
        for r in runs
        if r.data.tags.get("realm.stage") == "pipeline" and r.data.tags.get("dvc.command", "dvc repro") == "dvc repro"
    }
    latest: dict[str, Any] = {}
    for r in runs:  # newest first
        stage, parent = r.data.tags.get("realm.stage"), r.data.tags.get("mlflow.parentRunId")
        if stage in STAGES and parent in parents and stage not in latest:
            latest[stage] = r
    if not latest:
        raise SystemExit(
            f"{tracking_uri}: no finished stage runs under a `dvc repro` pipeline run in experiment {experiment!r}"
        )
    total = sum((r.info.end_time - r.info.start_time) / 1000 for r in latest.values())
    rows = []
    for stage in STAGES:
        if stage in latest:
            r = latest[stage]
            seconds = (r.info.end_time - r.info.start_time) / 1000
            p = parents[r.data.tags["mlflow.parentRunId"]]
            rows.append(
                {
                    "stage": stage,
                    "seconds": seconds,
                    "share": seconds / total,
                    "pipeline_run": p.info.run_name,
                    "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(r.info.start_time / 1000)),
                }
            )
            out["ratios"][f"stages.{stage}.share"] = seconds / total
    out["stages"] = {
        "tracking_uri": tracking_uri,
        "experiment": experiment,
        "total_seconds": total,
        "rows": rows,
        "overhead": pipeline_overhead(runs, parents),
    }
    if out["stages"]["overhead"]:
        out["ratios"]["stages.outside_stage_flows.share"] = out["stages"]["overhead"]["share"]


def pipeline_overhead(runs: list, parents: dict) -> dict[str, Any] | None:
    """Of the newest pipeline run that ran two stages or more: the share of its wall time outside
    the stage flows (DVC, the stage processes' start-up and imports, Prefect's local server)."""
    for run_id, p in parents.items():  # newest first
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run_id]
        if len(kids) >= 2:
            wall = (p.info.end_time - p.info.start_time) / 1000
            inside = sum((r.info.end_time - r.info.start_time) / 1000 for r in kids)
            if wall > inside:
                return {
                    "pipeline_run": p.info.run_name,
                    "stages": [r.data.tags["realm.stage"] for r in reversed(kids)],
                    "wall_seconds": wall,
                    "stage_seconds": inside,
                    "share": (wall - inside) / wall,
                }
    return None


def print_stages(out: dict) -> None:
    s = out["stages"]
    print(f"\n### The default pipeline's wall time per stage (MLflow {s['tracking_uri']})\n")
    print("| stage | seconds | share | pipeline run | started |")
    print("|---|---:|---:|---|---|")
    for r in s["rows"]:
        print(f"| {r['stage']} | {r['seconds']:.1f} | {r['share']:.1%} | {r['pipeline_run']} | {r['started']} |")
    print(f"| total | {s['total_seconds']:.1f} | 100% | | |")
    if o := s["overhead"]:
        print(
            f"\nPipeline run {o['pipeline_run']} ({', '.join(o['stages'])}): {o['wall_seconds']:.1f} s wall, {o['stage_seconds']:.1f} s in the "
            f"stage flows; {o['share']:.1%} outside them (DVC, stage process start-up and imports, Prefect)."
        )


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--backbone", help="BERT directory or 'minilm' (default: params model.backbone)")
    ap.add_argument("--blocks", type=Path, default=ROOT / "data" / "corpus" / "blocks.jsonl")
    ap.add_argument(
        "--doc",
        type=Path,
        default=ROOT / "data" / "pretrain" / "retriever" / "doc",
        help="the document embedder to time",
    )
    ap.add_argument(
        "--ict",
        type=Path,
        default=ROOT / "data" / "ict",
        help="ICT outputs: retriever/ and encoder/ (pre-training starts there)",
    )
    ap.add_argument(
        "--pretrained",
        type=Path,
        default=ROOT / "data" / "pretrain",
        help="pre-training outputs: retriever/query and encoder/",
    )
    ap.add_argument(
        "--index", type=Path, default=ROOT / "data" / "finetune" / "index", help="the frozen block index of fine-tuning"
    )
    ap.add_argument("--qa", type=Path, default=ROOT / "data" / "corpus" / "qa_train.jsonl")
    ap.add_argument("--tracking-uri", help="MLflow store (default: the project's, flows/env.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="embedding runs per model (best of)")
    ap.add_argument("--gemm-size", type=int, default=2048)
    ap.add_argument("--gemm-repeats", type=int, default=10)
    ap.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32", "bf16", "int8"],
        choices=KERNELS,
        help="embedding kernels to time (realm_core/precision.py); the default path (index.embed_precision) is always added",
    )
    ap.add_argument(
        "--as-default",
        choices=KERNELS,
        help="count this kernel as the default path, e.g. int8 when emulating an AVX2-only "
        "CPU (ATEN_CPU_CAPABILITY=avx2), whose index.embed_precision=auto resolves to int8",
    )
    ap.add_argument("--no-recall", dest="recall", action="store_false", help="skip recall@k per kernel on SQuAD-open")
    ap.add_argument(
        "--recall-questions", type=int, help="seeded sample of the SQuAD-open questions (default: all 10,570)"
    )
    ap.add_argument(
        "--recall-passages",
        type=int,
        help="their gold paragraphs plus seeded others up to this many (default: all 2,067)",
    )
    ap.add_argument(
        "--shared-data",
        type=Path,
        default=ROOT.parent / "shared" / "data",
        help="the real public data (SQuAD-open for recall)",
    )
    ap.add_argument("--pretrain-steps", type=int, default=40)
    ap.add_argument("--refresh-every", type=int, default=10)
    ap.add_argument("--questions", type=int, default=64, help="fine-tuning questions in each row")
    ap.add_argument("--max-load", type=float, default=1.5)
    ap.add_argument("--max-wait", type=float, default=600, help="seconds each section may wait for a quiet machine")
    ap.add_argument(
        "--max-others",
        type=float,
        default=0.25,
        help="measure again when other processes used more cores than this meanwhile",
    )
    ap.add_argument("--attempts", type=int, default=3, help="measurements at most per row (see --max-others)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "throughput.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, no waiting: a smoke test, not a measurement")
    ap.add_argument(
        "--unfused-adamw",
        action="store_true",
        help="train with torch's default per-tensor AdamW loop, as before "
        "optim.GroupedAdamW used the fused kernel: the 'before' of that change",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.gemm_size, args.gemm_repeats, args.max_wait = 1, 128, 2, 0
        args.pretrain_steps, args.refresh_every, args.questions = 3, 2, 2
        args.recall_questions, args.recall_passages = args.recall_questions or 8, args.recall_passages or 32
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from flows.env import configure

    configure(ROOT)
    torch.set_num_threads(args.threads)
    if args.unfused_adamw:
        import realm_core.modeling

        realm_core.modeling._FUSED_ADAMW_DEVICES = ()
    params = load_params(args.params)
    gate = Gate(args.max_load, args.max_wait, args.max_others, 1 if args.quick else args.attempts)
    out: dict[str, Any] = {
        "meta": {
            "command": " ".join(["python", "bench/throughput.py", *(argv if argv is not None else sys.argv[1:])]),
            "quick": args.quick,
            "unfused_adamw": args.unfused_adamw,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "ratios": {},
    }
    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    try:
        if "embed" in args.sections:
            gate.section()
            embed_rows(args, params, gate, out)
            print_embed(out)
        if {"pretrain", "finetune"} & set(args.sections):
            # a private copy: a stage rewriting data/ meanwhile cannot change the inputs (the async builder re-reads the file)
            blocks = Path(shutil.copy(args.blocks, work / "blocks.jsonl"))
            store = BlockStore.load(
                blocks,
                load_tokenizer(backbone_dir(args.backbone or params.model.backbone)),
                params.corpus.max_block_tokens,
            )
            if "pretrain" in args.sections:
                gate.section()
                pretrain_rows(args, params, gate, work, store, out)
                print_pretrain(out)
            if "finetune" in args.sections:
                gate.section()
                finetune_rows(args, params, gate, store, out)
                print_finetune(out)
        if "stages" in args.sections:
            from flows.tracking import experiment_name

            stage_rows(args.tracking_uri or os.environ["MLFLOW_TRACKING_URI"], experiment_name(), out)
            print_stages(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"\nwrote {args.out}")
    return out


if __name__ == "__main__":
    main()
