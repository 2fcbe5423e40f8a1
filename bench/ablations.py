"""REALM's ablations (Table 2 of the paper) on the default profile, one experiment per switch.

    python bench/ablations.py                         # every variant (~5 min each on 2 cores)
    python bench/ablations.py --only no_null_block stale_index

Each variant is `realm run --temp -S <switch> --name abl-<variant>-<time>`: a DVC experiment run
in a temporary copy (the workspace stays as it is), with its own MLflow parent run. The
baseline row is the workspace's own pipeline (brought up to date first). Prints a markdown
table (exact match, zero-shot retrieval recall@5, as in Table 2, plus fine-tuned recall@5 and
the last-quarter retrieval utility of pre-training) and writes bench/results/ablations.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS: dict[str, list[str]] = {
    "realm": [],
    "random_token_masks": ["pretrain.masking=random_tokens"],
    "random_span_masks": ["pretrain.masking=random_spans"],
    "no_null_block": ["pretrain.null_block=false"],
    "no_source_exclusion": ["pretrain.exclude_source=false"],
    "stale_index": ["pretrain.refresh_every=0"],
    "no_ict_warm_start": ["pretrain.retriever_init=bert"],
    "product_loss": ["pretrain.loss_form=product"],
    # the departures that make REALM learn here (DESIGN.md 1b), each switched back to the paper's choice
    "no_copy_head": ["model.copy_head=false"],
    "no_encoder_warmup": ["encoder_warmup.steps=0"],
    "dropout_on": ["pretrain.dropout=true"],
    "no_null_bias": ["pretrain.null_bias=false"],
    "all_queries": ["pretrain.query_filter=all"],
    "shared_embedders": ["model.share_embedders=true"],
    "null_gate": ["pretrain.null_gate=true"],  # a departure tried and measured worse (reports/pretrain_scan.md)
}
COLUMNS = ("exact_match", "zero_shot_recall_at_5", "realm_recall_at_5", "bm25_recall_at_5")


def run_variant(name: str, overrides: list[str], stamp: str) -> dict:
    from flows.pipeline import pipeline_flow

    start = time.perf_counter()
    if overrides:
        result = pipeline_flow(
            set_params=overrides, name=f"abl-{name.replace('_', '-')}-{stamp}", root=str(ROOT), temp=True
        )
    else:
        result = pipeline_flow(root=str(ROOT))  # the baseline: the workspace's pipeline, only stale stages
    pretrain = result["metrics"].get("pretrain", {})
    return {
        "variant": name,
        "overrides": overrides,
        "seconds": round(time.perf_counter() - start, 1),
        "mlflow_parent_run": result["parent_run_id"],
        **{k: result["metrics"]["evaluate"].get(k) for k in COLUMNS},
        # a --temp run's metrics files stay in its copy: read its pre-training run from MLflow
        "retrieval_utility_last_quarter": pretrain_utility(result["parent_run_id"])
        if overrides
        else pretrain.get("retrieval_utility_last_quarter"),
    }


def pretrain_utility(parent_run_id: str) -> float | None:
    """The pre-training run's last-quarter retrieval utility, from MLflow (a --temp run's files are not here)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    runs = client.search_runs(
        [client.get_run(parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`realm.stage` = 'pretrain'",
    )
    from flows.tracking import metric_key

    return runs[0].data.metrics.get(metric_key("pretrain", "final_retrieval_utility_last_quarter")) if runs else None


def table(rows: list[dict]) -> str:
    head = ["variant", "EM", "zero-shot R@5", "fine-tuned R@5", "BM25 R@5", "RU (pretrain)", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        cells = [
            r["variant"],
            *(fmt(r[k]) for k in COLUMNS),
            fmt(r["retrieval_utility_last_quarter"]),
            f"{r['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", nargs="+", choices=list(VARIANTS), help="run only these variants (the baseline always runs)"
    )
    args = parser.parse_args()
    from flows.env import configure

    configure(ROOT)
    stamp = time.strftime("%m%d%H%M")
    names = ["realm", *(n for n in (args.only or VARIANTS) if n != "realm")]
    rows = []
    for name in names:
        rows.append(run_variant(name, VARIANTS[name], stamp))
        print(table(rows), flush=True)
    out = ROOT / "bench" / "results" / "ablations.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
