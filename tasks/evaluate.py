"""Prefect task for the evaluate stage: EM and recall@k of the fine-tuned model, the zero-shot
recall of the pre-trained retriever, and BM25's recall."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from realm_core.config import Params
from realm_core.evaluate import evaluate_open_qa, retriever_recall
from realm_core.finetune import OpenQA
from realm_core.io import write_jsonl
from realm_core.modeling import load_embedder, load_reader
from realm_core.paths import Paths
from realm_core.questions import read_qa_jsonl
from tasks.training import load_open_qa, seed_everything


@task(cache_policy=NO_CACHE)
def evaluate_task(params: Params, paths: Paths, out_dir: Path) -> dict[str, float]:
    seed_everything(params.seed)
    model = load_open_qa(
        params, paths, paths.finetune / "query", load_reader(paths.finetune / "reader"), paths.finetune / "index"
    )
    questions = read_qa_jsonl(paths.qa_dev)
    get_run_logger().info("evaluating %d held-out questions over %d blocks", len(questions), len(model.store))
    metrics, predictions = evaluate_open_qa(
        model, questions, recall_at=params.evaluate.recall_at, top_k=params.evaluate.top_k
    )
    write_jsonl(out_dir / "predictions.jsonl", predictions)
    # Zero-shot: the query embedder fine-tuning started from (REALM's pre-trained one by default;
    # ICT's under `finetune.init: ict`) over the same frozen index (REALM Table 2).
    # Shares the loaded blocks and index; only the query tower differs.
    pretrained_query = load_embedder(paths.finetune_start(params.finetune.init).query)
    zero_shot = OpenQA(
        pretrained_query,
        model.reader,
        model.store,
        model.index,
        device=model.device,
        max_query_tokens=model.max_query_tokens,
        max_span=model.max_span,
    )
    metrics.update(
        {
            f"zero_shot_{k}": v
            for k, v in retriever_recall(zero_shot, questions, recall_at=params.evaluate.recall_at).items()
        }
    )
    return {k.replace("@", "_at_"): v for k, v in metrics.items()}
