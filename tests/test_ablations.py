"""REALM's ablation switches (Table 2) do what they say, and the defaults stay REALM's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from realm_core.config import Params, ParamsError, PretrainParams
from realm_core.io import InputError
from realm_core.pretrain import (
    Pretrainer,
    make_queries,
    pretrain,
    random_span_queries,
    random_token_queries,
    salient_span_queries,
)
from realm_core.refresh import SyncRefresher
from tests.conftest import CPU


def test_defaults_are_the_papers_choices():
    p = Params().pretrain
    assert (p.masking, p.null_block, p.exclude_source, p.loss_form, p.retriever_init) == (
        "salient",
        True,
        True,
        "per_token",
        "ict",
    )


def _restored_sentence(store, q):
    ids = list(q.input_ids)
    for pos, target in zip(q.mask_positions, q.targets):
        ids[pos] = target
    return ids[1:-1]


@pytest.mark.parametrize("build", [random_token_queries, random_span_queries])
def test_random_maskings_mask_one_query_per_sentence_within_the_budget(tiny, build):
    _, store = tiny
    tok = store.tokenizer
    queries = build(store, max_query_tokens=32, max_masks=3, seed=0)
    assert len(queries) == sum(len(b.sentences) for b in store.blocks)
    for q in queries:
        masked = [i for i, t in enumerate(q.input_ids) if t == tok.mask_token_id]
        assert masked == q.mask_positions and 1 <= len(masked) <= 3
        assert q.input_ids[0] == tok.cls_token_id and q.input_ids[-1] == tok.sep_token_id
        assert tok.decode(_restored_sentence(store, q)) in tok.decode(store.body_ids[q.block_id])
    assert queries == build(store, max_query_tokens=32, max_masks=3, seed=0)  # seeded


def test_random_spans_are_contiguous_and_random_tokens_are_not_always(tiny):
    _, store = tiny
    spans = random_span_queries(store, 32, 10, seed=1)
    assert all(q.mask_positions == list(range(q.mask_positions[0], q.mask_positions[-1] + 1)) for q in spans)
    tokens = random_token_queries(store, 32, 10, seed=1)
    gaps = [q for q in tokens if q.mask_positions != list(range(q.mask_positions[0], q.mask_positions[-1] + 1))]
    assert gaps  # 15% of a sentence drawn uniformly is rarely one contiguous run


def test_make_queries_dispatches_and_rejects_unknown_maskings(tiny):
    _, store = tiny
    assert make_queries(store, "salient", 32, 10, 0) == salient_span_queries(store, 32, 10)
    assert make_queries(store, "random_spans", 32, 10, 0) == random_span_queries(store, 32, 10, 0)
    with pytest.raises(ValueError, match="masking"):
        make_queries(store, "whole_words", 32, 10, 0)


def test_without_the_null_block_all_k_candidates_are_retrieved_blocks_and_no_utility_is_logged(tiny, models):
    _, store = tiny
    retriever, encoder = models
    trainer = Pretrainer(retriever, encoder, store, top_k=3, device=CPU, null_block=False)
    queries = salient_span_queries(store, 32, 10)
    logged = []
    summary = pretrain(
        trainer,
        queries,
        PretrainParams(steps=2, batch_size=2, lr=1e-3, query_lr=1e-3, doc_lr=1e-3),
        refresher=SyncRefresher(store, CPU, 64, refresh_every=0),
        seed=0,
        log=lambda m, s: logged.append(m),
    )
    out = trainer.forward(queries[:3])
    assert all(None not in c and len(c) == 3 and len(set(c)) == 3 for c in out["candidates"])
    assert "retrieval_utility" not in out and "null_prob" not in out
    assert all("retrieval_utility" not in m for m in logged) and any("loss" in m for m in logged)
    assert "retrieval_utility_last_quarter" not in summary


def test_without_source_exclusion_the_own_block_can_be_retrieved(tiny, models):
    _, store = tiny
    retriever, encoder = models
    q = salient_span_queries(store, 32, 10)[0]
    for exclude, expect_source in ((True, False), (False, True)):
        trainer = Pretrainer(retriever, encoder, store, top_k=3, device=CPU, exclude_source=exclude)
        trainer.refresh_index(0)
        # A query whose inner product is 1 with the source block and 0 with every other (least squares over
        # the index): 100 * e_source only wins when no other block projects further onto it, which a
        # random tiny tower (or another CPU's kernels) does not promise.
        embeddings = torch.from_numpy(np.asarray(trainer.index.embeddings, dtype=np.float64))  # [N, d]
        target = torch.zeros(len(embeddings), dtype=torch.float64)
        target[q.block_id] = 1.0
        source_query = (torch.linalg.pinv(embeddings) @ target).float()[None]  # [1, d]
        scores = torch.from_numpy(np.asarray(trainer.index.embeddings)) @ source_query[0]  # [N]
        assert int(scores.argmax()) == q.block_id  # the premise: unexcluded, the source is the top hit
        cands = trainer.candidates(source_query, [q])[0]
        assert cands[0] is None and len(cands) == 3
        assert (q.block_id in cands) is expect_source


def test_product_loss_form_reaches_the_trainer(tiny, models):
    _, store = tiny
    retriever, encoder = models
    batch = salient_span_queries(store, 32, 10)[:4]
    losses = {}
    for form in ("per_token", "product"):
        torch.manual_seed(0)
        trainer = Pretrainer(retriever, encoder, store, top_k=3, device=CPU, loss_form=form)
        trainer.refresh_index(0)
        retriever.eval(), encoder.eval()
        with torch.no_grad():
            losses[form] = trainer.forward(batch)["loss"].item()
    multi = [q for q in batch if len(q.targets) > 1]
    assert multi, "the batch needs a multi-token span for the two forms to differ"
    assert np.isfinite(losses["product"]) and losses["product"] != pytest.approx(losses["per_token"])


def test_retriever_init_bert_skips_the_ict_warm_start(tmp_path, tiny):
    from realm_core.paths import Paths
    from tasks.training import initial_retriever

    bert, _ = tiny
    params = Params.model_validate(
        {
            "model": {"backbone": str(bert), "num_hidden_layers": None, "retriever_dim": 16},
            "pretrain": {"retriever_init": "bert"},
        }
    )
    fresh = initial_retriever(params, Paths(tmp_path))  # no data/ict here: a warm start would fail
    assert fresh.query.projection.out_features == 16
    with pytest.raises(InputError, match="ict/retriever"):
        initial_retriever(
            params.model_copy(update={"pretrain": params.pretrain.model_copy(update={"retriever_init": "ict"})}),
            Paths(tmp_path),
        )


def test_every_ablation_variant_is_a_valid_params_override():
    """bench/ablations.py's switches, the paper's and our departures, all validate against params.yaml."""
    import importlib.util
    from pathlib import Path

    from flows.pipeline import check_overrides

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("ablations", root / "bench" / "ablations.py")
    ablations = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablations)
    assert {
        "no_copy_head",
        "no_encoder_warmup",
        "dropout_on",
        "no_null_bias",
        "all_queries",
        "shared_embedders",
        "null_gate",
    } <= set(ablations.VARIANTS)
    for overrides in ablations.VARIANTS.values():
        check_overrides(root / "params.yaml", overrides)
    with pytest.raises(ParamsError, match="no_such_switch"):
        check_overrides(root / "params.yaml", ["pretrain.no_such_switch=true"])


def test_orqa_style_finetuning_starts_from_ict_and_never_reads_pretraining(tmp_path):
    from realm_core.paths import Paths

    paths = Paths(tmp_path)
    assert Params().finetune.init == "pretrain"  # REALM's default
    realm, orqa = paths.finetune_start("pretrain"), paths.finetune_start("ict")
    assert (realm.query, realm.doc, realm.encoder) == (
        paths.pretrain / "retriever" / "query",
        paths.pretrain / "retriever" / "doc",
        paths.pretrain / "encoder",
    )
    for part in (orqa.query, orqa.doc, orqa.encoder):
        assert paths.ict in part.parents and paths.pretrain not in part.parents
    with pytest.raises(ValueError, match="finetune.init"):
        paths.finetune_start("bert")
    with pytest.raises(ValueError):
        Params.model_validate({"finetune": {"init": "bert"}})
