"""Is REALM learning? The diagnostics of a finished run's artefacts, measured the same way for any run.

    python bench/diagnose.py                                   # this workspace's data/
    python bench/diagnose.py --data /elsewhere/data --out reports/diagnostics_before.json

For the ict and pretrain encoders in `--data`, on the probe the pipeline holds out
(realm_core/reading.py, same seed and params): the evidence gain (log p(y | answer-bearing
non-source block, x) - log p(y | null, x), nats per masked token, eval mode), the same gain for the
query's own source block, and for a random block. For the pre-trained retriever: the share of
probe queries with an answer-bearing block among the top-k candidates, and the median p(null | x)
under the paper's null score f(x, null) (a run with `pretrain.null_bias` learns a scalar instead;
its p(null) is `null_prob` in metrics/pretrain.json).
Prints a table and writes JSON. README "Is it learning?" says what healthy values look like.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data", help="a run's data/ folder (corpus, ict, pretrain)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "diagnostics.json")
    args = ap.parse_args(argv)

    import torch

    from realm_core.blocks import BlockStore
    from realm_core.config import load_params
    from realm_core.modeling import backbone_dir, load_encoder, load_retriever, load_tokenizer
    from realm_core.pretrain import Pretrainer
    from realm_core.reading import Probe, pretraining_queries

    cpu = torch.device("cpu")
    params = load_params(args.params)
    store = BlockStore.load(
        args.data / "corpus" / "blocks.jsonl",
        load_tokenizer(backbone_dir(params.model.backbone)),
        params.corpus.max_block_tokens,
    )
    q = pretraining_queries(store, params.pretrain, params.model.max_query_tokens, params.seed)
    rng = random.Random(params.seed)
    randoms = [
        [next(z for z in iter(lambda: rng.randrange(len(store)), None) if z != p.block_id and z not in ev)]
        for p, ev in zip(q.probe.queries, q.probe.evidence)
    ]
    probes = {
        "evidence_gain": q.probe,
        "source_block_gain": Probe(q.probe.queries, [[p.block_id] for p in q.probe.queries]),
        "random_block_gain": Probe(q.probe.queries, randoms),
    }
    out: dict = {"data": str(args.data), "probe_queries": len(q.probe), **q.stats, "stages": {}}
    for stage in ("ict", "pretrain"):
        if not (args.data / stage / "encoder").exists():
            continue
        encoder = load_encoder(args.data / stage / "encoder")
        out["stages"][stage] = {name: probe.evidence_gain(encoder, store, cpu) for name, probe in probes.items()}
    if (args.data / "pretrain" / "retriever").exists():
        # the paper's null score f(x, null): the learned scalar of `pretrain.null_bias` lives only in the run's metrics
        c = params.pretrain.model_copy(update={"null_bias": False, "null_block": True})
        trainer = Pretrainer.from_params(
            load_retriever(args.data / "pretrain" / "retriever"),
            load_encoder(args.data / "pretrain" / "encoder"),
            store,
            c,
            cpu,
        )
        trainer.refresh_index(0)
        for m in trainer.modules().values():
            m.eval()
        with torch.no_grad():
            logits, cands = trainer.retrieval_logits(q.probe.queries)
        found = [bool(set(ev) & {z for z in row if z is not None}) for ev, row in zip(q.probe.evidence, cands)]
        out["stages"]["pretrain"].update(
            answer_bearing_in_candidates=sum(found) / max(1, len(found)),
            median_null_prob_paper_score=float(logits.softmax(-1)[:, 0].median()),
        )
    print(
        f"| stage | evidence gain | source-block gain | random-block gain |  ({len(q.probe)} probe queries, nats/token)"
    )
    print("|---|---|---|---|")
    for stage, row in out["stages"].items():
        print(
            f"| {stage} | {row['evidence_gain']:+.3f} | {row['source_block_gain']:+.3f} | {row['random_block_gain']:+.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
