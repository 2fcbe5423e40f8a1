"""REALM's mechanics on a synthetic knowledge corpus: does retrieval learn from the MLM signal alone?

    .venv/bin/python bench/mechanics.py                     # the five variants (~14.5 min on 2 idle cores): reports/mechanics.{json,md,png} + MLflow
    .venv/bin/python bench/mechanics.py --quick             # the small world the test runs, realm and frozen_retriever (~1 min)
    .venv/bin/python bench/mechanics.py --only realm stale_index --out bench/results/mechanics.json
    realm bench mechanics [--quick]                         # the same through the CLI

The world (realm_core/synthetic.py): made-up entities with four relations each, every fact stated
in exactly one block (two facts of one entity per block), so each block has distractors that name
the same entity (its other block) or state the same relation (other entities' blocks); one masked
paraphrase per fact, whose answer a closed-book guess gets right about 1/15 of the time. Reported
on held-out facts (their blocks are in the corpus, their queries never trained on): recall@1 of the
gold block from the index the model retrieves from, and MLM accuracy, the argmax over the
vocabulary of the marginal p(y|x) = sum_z p(z|x) p(y|z,x) over the model's own k candidates.

Variants, on the same data from the same initial weights:
  realm              encoder warm-up, then REALM pre-training of both towers from an untrained retriever
  frozen_retriever   query_lr = doc_lr = 0: the untrained retriever stays, so the facts cannot be predicted
  no_encoder_warmup  the encoder never taught to read (REALM section 3.4: it then gives no retrieval signal)
  stale_index        refresh_every 0: the index stays the untrained retriever's (section 3.3, Table 2)
  no_null_block      every candidate is a retrieved block (section 3.4)

The untrained retriever (no ICT) is each tower's first MiniLM layer, mean pooling and a random
projection; the projection trains, the layer is frozen, and the tower's LayerNorm is fixed at gain
0.3, so f(x, z) = 0.09 * LN(.) . LN(.) is at most 11.5 (a cosine with a fixed temperature). Measured
reasons (reports/mechanics.md has the numbers of the final run; the notes in the docstrings below
have the others): with the whole 2-layer tower and LayerNorm training, f spread out until p(z|x)
was one-hot and the towers' gradients went to 0 (p(null) = 1.000 after 20 steps); with the frozen
layer a step costs a third, and one layer kept held-out recall higher.

The encoder (2 MiniLM layers with the copy head, modeling.CopyHead) is warmed once, on a *practice
world* drawn from another seed (new entities and values, the same templates): its own fact blocks
as evidence and other entities' blocks of the relation as hard negatives (reading.warmup_encoder).
Like the BERT MLM checkpoint REALM starts from, it learns to read without seeing a benchmark fact.
During pre-training the encoder is frozen (`train_encoder`): trained at lr 1e-5 it learnt the
train facts by heart, after which those queries gave the retriever no gradient (train recall@1
stopped at 0.84 instead of 0.95 on the quick world); at lr 1e-6 it matched the frozen one at twice
the step time. k = 16 candidates (REALM: 8) so that a random retriever shows the gold block to 1 in
8 queries of the 120-block world instead of 1 in 17.

Writes the JSON (`--out`), a markdown table and a PNG of the curves beside it, and logs all three
with the curves to the MLflow experiment "realm-bench" (the project's mlruns.db).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.publish import publish  # noqa: E402
from realm_core.blocks import embed_blocks, query_batch  # noqa: E402
from realm_core.config import EncoderWarmupParams, PretrainParams  # noqa: E402
from realm_core.index import DenseIndex  # noqa: E402
from realm_core.logging import null_logger  # noqa: E402
from realm_core.masking import MaskedQuery, encoder_inputs  # noqa: E402
from realm_core.modeling import KnowledgeAugmentedEncoder, Retriever, backbone_dir, load_tokenizer  # noqa: E402
from realm_core.pretrain import Pretrainer, pretrain  # noqa: E402
from realm_core.reading import Probe, warmup_encoder  # noqa: E402
from realm_core.refresh import SyncRefresher  # noqa: E402
from realm_core.synthetic import World, fact_queries, make_store, make_world, split_facts  # noqa: E402

CPU = torch.device("cpu")
VARIANTS = ("realm", "frozen_retriever", "no_encoder_warmup", "stale_index", "no_null_block")
EXPECTED = {  # what REALM says each ablation does (printed beside the measurement)
    "realm": "recall@1 from chance to >= 90%, MLM accuracy >= 80%",
    "frozen_retriever": "fails: retrieval stays at chance, so the facts cannot be predicted",
    "no_encoder_warmup": "fails or slows: an encoder that ignores z gives the retriever no gradient (section 3.4)",
    "stale_index": "slows or fails: the index drifts from the towers (section 3.3, Table 2)",
    "no_null_block": "slows: retrieval must always put mass on some block (section 3.4)",
}


@dataclass
class Settings:
    """Everything a run depends on; `FULL` and `QUICK` below are the two profiles."""

    entities: int = 60
    relations: int = 4
    held_out_fraction: float = 0.25
    max_block_tokens: int = 64
    practice_entities: int = 1500  # the warm-up's own world (names may share wordpieces there)
    encoder_layers: int = 2
    retriever_layers: int = 1  # each tower's MiniLM layers (frozen unless train_tower_backbone)
    dim: int = 128
    retriever_gain: float = 0.3  # the towers' LayerNorm gain: f(x, z) = gain^2 x LN . LN
    fixed_scale: bool = True  # keep the towers' LayerNorm at (gain, 0): a fixed retrieval temperature
    train_tower_backbone: bool = (
        False  # False: each tower trains only its projection (and LayerNorm unless fixed_scale)
    )
    train_encoder: bool = False  # during pre-training (the warm-up always trains it, word embeddings aside)
    copy_head: bool = True  # model.copy_head (modeling.CopyHead)
    hard_negatives: int = 6  # per practice fact: other entities' blocks of its relation (reading.warmup_contexts)
    eval_every: int = 50
    warmup: EncoderWarmupParams = field(
        default_factory=lambda: EncoderWarmupParams(steps=200, batch_size=16, lr=3e-4, evidence_prob=0.5)
    )
    pretrain: PretrainParams = field(
        default_factory=lambda: PretrainParams(
            steps=600,
            batch_size=8,
            lr=1e-5,
            query_lr=3e-3,
            doc_lr=3e-3,
            null_bias_lr=1e-3,
            top_k=16,
            refresh_every=20,
            refresh_mode="sync",
            query_filter="all",
            probe_size=0,
            checkpoint_every=0,
        )
    )


FULL = Settings()
QUICK = Settings(
    entities=24,
    eval_every=40,
    warmup=EncoderWarmupParams(steps=150, batch_size=16, lr=3e-4, evidence_prob=0.5),
    pretrain=FULL.pretrain.model_copy(update={"steps": 120, "refresh_every": 10}),
)


def variant_params(name: str, c: PretrainParams) -> tuple[PretrainParams, bool]:
    """The pre-training params of a variant and whether its encoder is warmed."""
    if name == "realm":
        return c, True
    if name == "frozen_retriever":
        return c.model_copy(update={"query_lr": 0.0, "doc_lr": 0.0}), True
    if name == "no_encoder_warmup":
        return c, False
    if name == "stale_index":
        return c.model_copy(update={"refresh_every": 0}), True
    if name == "no_null_block":
        return c.model_copy(update={"null_block": False}), True
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


# ============================================================================ the data


@dataclass
class Data:
    world: World
    store: object  # BlockStore
    train: list[MaskedQuery]
    held_out: list[MaskedQuery]
    train_gold: list[int]
    held_out_gold: list[int]
    held_out_facts: list


def make_data(s: Settings, seed: int, tokenizer) -> Data:
    world = make_world(tokenizer, seed=seed, entities=s.entities, relations=s.relations)
    store = make_store(world, tokenizer, s.max_block_tokens)
    train, held = split_facts(world, s.held_out_fraction, seed)
    return Data(
        world,
        store,
        fact_queries(world, store, train),
        fact_queries(world, store, held),
        [f.block_id for f in train],
        [f.block_id for f in held],
        held,
    )


def freeze_word_embeddings(*modules: torch.nn.Module) -> None:
    for m in modules:
        bert = m.mlm.bert if isinstance(m, KnowledgeAugmentedEncoder) else m.bert
        bert.embeddings.word_embeddings.weight.requires_grad_(False)


def hard_negatives(world: World, n: int, seed: int, facts: list | None = None) -> list[list[int]]:
    """For each fact (all by default), up to `n` blocks that state its relation for other entities
    with other values: reading one, the encoder must not copy (a related block without the answer)."""
    rng = random.Random(seed)
    by_relation: dict[str, list] = {}
    for f in world.facts:
        by_relation.setdefault(f.relation, []).append(f)
    out = []
    for f in world.facts if facts is None else facts:
        pool = [g.block_id for g in by_relation[f.relation] if g.entity != f.entity and g.value != f.value]
        out.append(rng.sample(pool, min(n, len(pool))))
    return out


def warmed_encoder(
    s: Settings, seed: int, tokenizer, data: Data, log
) -> tuple[KnowledgeAugmentedEncoder, KnowledgeAugmentedEncoder, dict]:
    """(fresh encoder, encoder warmed on a practice world of another seed, warm-up summary)."""
    torch.manual_seed(seed)
    fresh = KnowledgeAugmentedEncoder.from_backbone(backbone_dir("minilm"), s.encoder_layers, copy=s.copy_head)
    freeze_word_embeddings(fresh)  # the 30522 x 384 table (tied to the MLM decoder): a third of a step's time
    warm = copy.deepcopy(fresh)
    practice = make_world(
        tokenizer, seed=seed + 1000, entities=s.practice_entities, relations=s.relations, distinct_pieces=False
    )
    pstore = make_store(practice, tokenizer, s.max_block_tokens)
    pqueries = fact_queries(practice, pstore)
    started = time.perf_counter()
    evidence = [
        [f.block_id] for f in practice.facts
    ]  # each practice fact's own block: a reading lesson, no benchmark fact
    summary = warmup_encoder(
        warm,
        pstore,
        pqueries,
        evidence,
        s.warmup,
        seed=seed,
        device=CPU,
        log=log or null_logger,
        negatives=hard_negatives(practice, s.hard_negatives, seed),
    )
    summary["seconds"] = time.perf_counter() - started
    probe = Probe(data.held_out, [[z] for z in data.held_out_gold])
    distractors = Probe(data.held_out, [negs[:1] for negs in hard_negatives(data.world, 1, seed, data.held_out_facts)])
    for name, enc in (("fresh", fresh), ("warmed", warm)):
        summary[f"evidence_gain_{name}"] = probe.evidence_gain(enc, data.store, CPU)
        summary[f"distractor_gain_{name}"] = distractors.evidence_gain(
            enc, data.store, CPU
        )  # another entity's block of the relation
    return fresh, warm, summary


# ============================================================================ measuring


@torch.no_grad()
def recall_at(
    trainer: Pretrainer, index: DenseIndex, queries: list[MaskedQuery], gold: list[int], ks: tuple[int, ...] = (1,)
) -> list[float]:
    """Recall@k for each k: share of queries whose gold block is among the top k of `index`
    (live query tower, dropout off)."""
    tower = trainer.retriever.query
    was = tower.training
    tower.eval()
    emb = torch.cat(
        [
            tower(**query_batch(trainer.store, [q.input_ids for q in queries[i : i + 64]], CPU))
            for i in range(0, len(queries), 64)
        ]
    )
    tower.train(was)
    _, ids = index.search(emb.float().numpy(), max(ks))
    hit = ids == np.array(gold)[:, None]  # [Q, max k]
    return [float(hit[:, :k].any(1).mean()) for k in ks]


def marginal_log_probs(
    trainer: Pretrainer, batch: list[MaskedQuery]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(y|x) = log sum_z p(z|x) p(y|z,x) over the whole vocabulary at each masked position,
    over the k candidates the model retrieves from its current index (null block included when it
    has one): [B, M, V], with the targets and the token mask [B, M]."""
    logits, cands = trainer.retrieval_logits(batch)  # [B, k]
    enc = encoder_inputs(trainer.store, batch, cands, trainer.device)
    mask = enc.pop("token_mask")  # [B, M]
    vocab = trainer.encoder.masked_log_probs(
        enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], enc["mask_positions"]
    )  # [B*k, M, V]
    vocab = vocab.view(len(batch), trainer.top_k, mask.size(1), -1)  # [B, k, M, V]
    marginal = torch.logsumexp(logits.log_softmax(-1)[:, :, None, None] + vocab, dim=1)  # [B, M, V]
    return marginal, enc["targets"].view(len(batch), trainer.top_k, -1)[:, 0], mask


@torch.no_grad()
def mlm_accuracy(trainer: Pretrainer, queries: list[MaskedQuery], batch_size: int = 16) -> float:
    """Share of masked tokens whose argmax over the vocabulary of the marginal p(y|x) is the target (dropout off)."""
    modules = list(trainer.modules().values())
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    hits = tokens = 0.0
    for i in range(0, len(queries), batch_size):
        marginal, targets, mask = marginal_log_probs(trainer, queries[i : i + batch_size])
        hits += float(((marginal.argmax(-1) == targets).float() * mask).sum())
        tokens += float(mask.sum())
    for m, was in zip(modules, modes):
        m.train(was)
    return hits / max(tokens, 1.0)


class Curves:
    """The per-step log of one variant, and its evaluations every `every` steps."""

    STEP_KEYS = (
        "loss",
        "null_prob",
        "retrieval_utility_per_token",
        "grad_norm_query",
        "grad_norm_doc",
        "grad_norm_encoder",
    )

    def __init__(self, trainer: Pretrainer, data: Data, every: int, steps: int):
        self.trainer, self.data, self.every, self.steps = trainer, data, every, steps
        self.step: dict[str, list[float]] = {"step": []}
        self.evals: dict[str, list[float]] = {"step": []}
        self.evidence: dict[str, list[float]] = {"step": [], "evidence_gain": []}

    def log(self, metrics: dict, step: int) -> None:
        if "evidence_gain" in metrics:
            self.evidence["step"].append(step)
            self.evidence["evidence_gain"].append(float(metrics["evidence_gain"]))
        if "loss" not in metrics:
            return
        self.step["step"].append(step + 1)
        for k in self.STEP_KEYS:
            if k in metrics:
                self.step.setdefault(k, []).append(float(metrics[k]))
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            self.evaluate(step + 1)

    def on_index(self, index: DenseIndex) -> dict[str, float]:
        if not self.evals["step"]:  # the initial index: the untrained retriever
            self.trainer.set_index(index, 0)
            self.evaluate(0)
        return {}

    def evaluate(self, step: int) -> None:
        t, d = self.trainer, self.data
        fresh = DenseIndex(
            embed_blocks(t.retriever.doc, t.store, CPU, progress=None), np.arange(len(t.store), dtype=np.int64)
        )
        retrieved = t.top_k - 1 if t.null_block else t.top_k
        r1, rk = recall_at(
            t, t.index, d.held_out, d.held_out_gold, (1, retrieved)
        )  # the index the model retrieves from
        row = {
            "step": step,
            "recall_at_1": r1,
            "recall_at_candidates": rk,  # the gold block among the retrieved candidates
            "recall_at_1_train": recall_at(t, t.index, d.train, d.train_gold)[0],
            "recall_at_1_fresh_index": recall_at(t, fresh, d.held_out, d.held_out_gold)[0],
            "mlm_accuracy": mlm_accuracy(t, d.held_out),
        }
        if step == self.steps:  # the costliest measurement: once, at the end
            row["mlm_accuracy_train"] = mlm_accuracy(t, d.train)
        for k, v in row.items():
            self.evals.setdefault(k, []).append(v)


def untrained_retriever(s: Settings) -> Retriever:
    """Two towers over MiniLM's first layers with random projections (no ICT), LayerNorm at `retriever_gain`."""
    retriever = Retriever.from_backbone(backbone_dir("minilm"), s.retriever_layers, s.dim, "mean")
    freeze_word_embeddings(retriever.query, retriever.doc)
    with torch.no_grad():
        for tower in (retriever.query, retriever.doc):
            tower.norm.weight.fill_(s.retriever_gain)
            if not s.train_tower_backbone:
                tower.bert.requires_grad_(False)
            if s.fixed_scale:
                tower.norm.requires_grad_(False)
    return retriever


def run_variant(
    name: str, s: Settings, seed: int, data: Data, encoders: dict[str, KnowledgeAugmentedEncoder], log=None
) -> dict:
    c, warmed = variant_params(name, s.pretrain)
    started = time.perf_counter()
    torch.manual_seed(seed)  # every variant starts from the same untrained retriever
    retriever = untrained_retriever(s)
    encoder = copy.deepcopy(encoders["warm" if warmed else "fresh"])
    if not s.train_encoder:
        encoder.requires_grad_(False)
    trainer = Pretrainer.from_params(retriever, encoder, data.store, c, CPU)
    curves = Curves(trainer, data, s.eval_every, c.steps)
    probe = Probe(data.held_out, [[z] for z in data.held_out_gold])

    def step_log(metrics: dict, step: int) -> None:
        curves.log(metrics, step)
        if log is not None:
            log(name, metrics, step)

    refresher = SyncRefresher(data.store, CPU, c.embed_batch_size, c.refresh_every)
    summary = pretrain(
        trainer, data.train, c, refresher=refresher, seed=seed, log=step_log, on_index=curves.on_index, probe=probe
    )
    ev = curves.evals
    return {
        "final_recall_at_1": ev["recall_at_1"][-1],
        "final_mlm_accuracy": ev["mlm_accuracy"][-1],
        "final_recall_at_1_train": ev["recall_at_1_train"][-1],
        "final_mlm_accuracy_train": ev["mlm_accuracy_train"][-1] if "mlm_accuracy_train" in ev else None,
        "final_recall_at_1_fresh_index": ev["recall_at_1_fresh_index"][-1],
        "initial_recall_at_1": ev["recall_at_1"][0],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "encoder_warmed": warmed,
        "params": {
            k: v
            for k, v in c.model_dump().items()
            if k in ("lr", "query_lr", "doc_lr", "refresh_every", "null_block", "steps", "batch_size", "top_k")
        },
        "curves": {"eval": ev, "step": curves.step, "evidence_gain": curves.evidence},
        "summary": {k: float(v) for k, v in summary.items()},
    }


def run(s: Settings, seed: int, variants: list[str], log=None, threads: int | None = None) -> dict:
    """The whole bench in this process; returns the results dict that is written as JSON."""
    if threads:
        torch.set_num_threads(threads)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    tokenizer = load_tokenizer(backbone_dir("minilm"))
    data = make_data(s, seed, tokenizer)
    fresh, warm, warmup = (
        warmed_encoder(s, seed, tokenizer, data, (lambda m, st: log("encoder_warmup", m, st)) if log else None)
        if any(variant_params(v, s.pretrain)[1] for v in variants)
        else (None, None, {})
    )
    if fresh is None:
        torch.manual_seed(seed)
        fresh = KnowledgeAugmentedEncoder.from_backbone(backbone_dir("minilm"), s.encoder_layers, copy=s.copy_head)
    results = {
        "chance_recall_at_1": data.world.chance_recall_at_1,
        "chance_mlm_accuracy": 1.0 / min(len(r.values) for r in data.world.relations),
        "world": {
            "blocks": len(data.world.blocks),
            "facts": len(data.world.facts),
            "entities": len(data.world.entities),
            "relations": [r.name for r in data.world.relations],
            "train_queries": len(data.train),
            "held_out_queries": len(data.held_out),
        },
        "encoder_warmup": {k: float(v) for k, v in warmup.items()},
        "variants": {},
    }
    for name in variants:
        results["variants"][name] = run_variant(name, s, seed, data, {"fresh": fresh, "warm": warm}, log)
        v = results["variants"][name]
        print(
            f"{name}: recall@1 {v['initial_recall_at_1']:.3f} -> {v['final_recall_at_1']:.3f}, MLM accuracy {v['final_mlm_accuracy']:.3f} ({v['wall_seconds']:.0f} s)",
            flush=True,
        )
    results["config"] = {
        "seed": seed,
        "threads": torch.get_num_threads(),
        **{k: v for k, v in asdict(s).items() if k not in ("warmup", "pretrain")},
        **{f"warmup.{k}": v for k, v in s.warmup.model_dump().items()},
        **{f"pretrain.{k}": v for k, v in s.pretrain.model_dump().items()},
    }
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["load_average"] = {
        "start": [round(x, 2) for x in load_at_start],
        "end": [round(x, 2) for x in os.getloadavg()],
    }  # 1, 5, 15 min
    return results


# ============================================================================ report


def markdown(results: dict) -> str:
    lines = [
        "# REALM mechanics on a synthetic knowledge corpus (bench/mechanics.py)",
        "",
        f"World: {results['world']['blocks']} blocks, {results['world']['facts']} facts ({results['world']['entities']} entities x "
        f"{len(results['world']['relations'])} relations), {results['world']['held_out_queries']} held-out queries. "
        f"Chance recall@1 = {results['chance_recall_at_1']:.3f}; closed-book MLM accuracy about {results['chance_mlm_accuracy']:.3f}.",
        "",
        "Held-out queries; recall@1 by the index the model retrieves from; MLM accuracy of the marginal over its candidates.",
        "",
        "| variant | recall@1 start | recall@1 final | MLM acc. final | train recall@1 / MLM acc. | wall s | REALM expects |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        lines.append(
            f"| {name} | {v['initial_recall_at_1']:.3f} | {v['final_recall_at_1']:.3f} | {v['final_mlm_accuracy']:.3f} | "
            f"{v['final_recall_at_1_train']:.3f} / {v['final_mlm_accuracy_train']:.3f} | {v['wall_seconds']:.0f} | {EXPECTED[name]} |"
        )
    w = results["encoder_warmup"]
    if w:
        lines += [
            "",
            f"Encoder warm-up on the practice world: {w.get('encoder_warmup_steps', 0):.0f} steps in {w.get('seconds', 0):.0f} s; evidence gain "
            f"on the benchmark's held-out facts (gold block vs null, nats/token) {w['evidence_gain_fresh']:.2f} fresh -> {w['evidence_gain_warmed']:.2f} warmed.",
        ]
    load = results.get("load_average")
    lines += [
        "",
        f"Total {results['seconds']:.0f} s on {results['config']['threads']} threads"
        + (
            f"; load average (1/5/15 min) {'/'.join(map(str, load['start']))} at the start, {'/'.join(map(str, load['end']))} at the end "
            f"(more than {results['config']['threads']} means other processes shared the cores and the wall times are inflated)."
            if load
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for name, v in results["variants"].items():
        ev, st = v["curves"]["eval"], v["curves"]["step"]
        axes[0].plot(ev["step"], ev["recall_at_1"], marker="o", label=name)
        axes[1].plot(ev["step"], ev["mlm_accuracy"], marker="o", label=name)
        loss = np.convolve(st["loss"], np.ones(10) / 10, mode="valid") if len(st["loss"]) >= 10 else st["loss"]
        axes[2].plot(st["step"][len(st["step"]) - len(loss) :], loss, label=name)
        if "null_prob" in st:
            axes[3].plot(st["step"], st["null_prob"], label=name)
    axes[0].axhline(results["chance_recall_at_1"], color="grey", ls=":", label="chance")
    for ax, title in zip(
        axes, ("held-out recall@1 (index in use)", "held-out MLM accuracy", "loss (10-step mean)", "p(null | x)")
    ):
        ax.set_title(title)
        ax.set_xlabel("pre-training step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_to_mlflow(results: dict, files: list[Path], quick: bool, root: Path = ROOT) -> str:
    """One run in the "realm-bench" experiment: params, final metrics per variant, the curves as
    metric histories (the step is the pre-training step), and the JSON, table and plot."""
    from mlflow.entities import Metric

    from flows.tracking import log_bench_run

    now = int(time.time() * 1000)
    metrics = [Metric("chance_recall_at_1", results["chance_recall_at_1"], now, 0)]
    for name, v in results["variants"].items():
        metrics += [
            Metric(f"{name}.{k}", float(v[k]), now, 0)
            for k in v
            if k.startswith(("final_", "initial_")) and v[k] is not None or k == "wall_seconds"
        ]
        for curve in (v["curves"]["eval"], v["curves"]["step"]):
            metrics += [
                Metric(f"{name}.{k}", float(x), now, int(s))
                for k, values in curve.items()
                if k != "step" and len(values) == len(curve["step"])
                for s, x in zip(curve["step"], values)
            ]
    return log_bench_run("mechanics", results["config"], metrics, files, quick=quick, root=root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the small world and short runs of the test (realm and frozen_retriever by default)",
    )
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the JSON to write (default reports/mechanics.json; --quick: bench/results/mechanics_quick.json); .md and .png beside it",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=VARIANTS,
        metavar="VARIANT",
        help=f"run only these variants ({', '.join(VARIANTS)})",
    )
    parser.add_argument("--threads", type=int, default=max(1, min(2, len(os.sched_getaffinity(0)))))
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    args = parser.parse_args()
    from flows.env import configure

    configure(ROOT)
    settings = QUICK if args.quick else FULL
    variants = args.only or (["realm", "frozen_retriever"] if args.quick else list(VARIANTS))
    out = args.out or (
        ROOT / "bench" / "results" / "mechanics_quick.json" if args.quick else ROOT / "reports" / "mechanics.json"
    )
    results = run(settings, args.seed, variants, threads=args.threads)
    results["config"]["quick"] = args.quick
    files = [out, out.with_suffix(".md"), out.with_suffix(".png")]
    log = None if args.no_mlflow else (lambda r, f: log_to_mlflow(r, f, args.quick))
    publish(results, files, markdown, plot, log, indent=1)


if __name__ == "__main__":
    main()
