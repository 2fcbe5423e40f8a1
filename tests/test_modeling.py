"""One test per REALM rule the model code must honour (DESIGN.md 1), on a tiny random BERT."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from realm_core.blocks import embed_blocks
from realm_core.config import FinetuneParams, IctParams, PretrainParams
from realm_core.finetune import OpenQA, enumerate_spans, finetune
from realm_core.ict import ict_example, train_ict, warmup_mlm_head
from realm_core.index import DenseIndex
from realm_core.modeling import (
    KnowledgeAugmentedEncoder,
    Retriever,
    SpanReader,
    load_encoder,
    load_retriever,
    marginal_log_likelihood,
    marginal_over_correct,
    retrieval_utility,
    save_encoder,
    save_retriever,
)
from realm_core.pretrain import Pretrainer, pretrain, salient_span_queries, select_candidates
from realm_core.questions import QAExample
from realm_core.refresh import SyncRefresher
from tests.conftest import CPU

# ------------------------------------------------------------------ marginal likelihood


def test_per_token_marginal_equals_brute_force():
    torch.manual_seed(0)
    logits, logp = torch.randn(3, 4), torch.randn(3, 4, 5).log_softmax(-1)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    total, count = 0.0, 0
    for b in range(3):
        pz = torch.softmax(logits[b], -1)
        for j in range(5):
            if mask[b, j]:
                total += -torch.log(sum(pz[z] * logp[b, z, j].exp() for z in range(4)))
                count += 1
    assert marginal_log_likelihood(logits, logp, mask).item() == pytest.approx((total / count).item(), rel=1e-5)


def test_product_marginal_equals_brute_force():
    torch.manual_seed(1)
    logits, logp = torch.randn(2, 3), torch.randn(2, 3, 4).log_softmax(-1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    expected = []
    for b in range(2):
        pz = torch.softmax(logits[b], -1)
        py = [torch.prod(torch.stack([logp[b, z, j].exp() for j in range(4) if mask[b, j]])) for z in range(3)]
        expected.append(-torch.log(sum(pz[z] * py[z] for z in range(3))))
    assert marginal_log_likelihood(logits, logp, mask, "product").item() == pytest.approx(
        torch.stack(expected).mean().item(), rel=1e-5
    )


def test_retrieval_utility_is_zero_when_all_mass_on_null_and_positive_when_retrieval_helps():
    logp = torch.tensor([[[-5.0, -5.0], [-0.1, -0.1]]])  # null is bad, block 1 is good
    mask = torch.ones(1, 2)
    assert retrieval_utility(torch.tensor([[50.0, -50.0]]), logp, mask).item() == pytest.approx(0.0, abs=1e-4)
    assert retrieval_utility(torch.tensor([[-50.0, 50.0]]), logp, mask).item() > 9.0


def test_marginal_over_correct_is_zero_without_a_correct_answer():
    logits = torch.randn(2, 6, requires_grad=True)
    correct = torch.zeros(2, 6, dtype=torch.bool)
    correct[0, 2] = True
    loss = marginal_over_correct(logits, correct)
    expected = (torch.logsumexp(logits[0], 0) - logits[0, 2]) / 2  # row 1 contributes 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ------------------------------------------------------------------ salient span masking


def test_salient_span_queries_mask_every_wordpiece_of_exactly_one_span(tiny):
    _, store = tiny
    tok = store.tokenizer
    queries = salient_span_queries(store, max_query_tokens=32, max_masks=10)
    assert queries
    for q in queries:
        masked = [i for i, t in enumerate(q.input_ids) if t == tok.mask_token_id]
        assert masked == q.mask_positions  # every mask is a span token, contiguous, one span
        assert masked == list(range(masked[0], masked[-1] + 1))
        assert 1 <= len(masked) <= 10
        assert q.input_ids[0] == tok.cls_token_id and q.input_ids[-1] == tok.sep_token_id
        restored = list(q.input_ids)
        for p, t in zip(q.mask_positions, q.targets):
            restored[p] = t
        sentence = tok.decode(restored[1:-1])
        assert sentence in tok.decode(store.body_ids[q.block_id])  # the query is one sentence of its block


def test_spans_longer_than_max_masks_are_dropped(tiny):
    _, store = tiny
    short = salient_span_queries(store, max_query_tokens=32, max_masks=1)
    assert all(len(q.mask_positions) == 1 for q in short)
    assert len(short) < len(salient_span_queries(store, max_query_tokens=32, max_masks=10))


# ------------------------------------------------------------------ candidates: null block, no trivial retrieval


def test_select_candidates_drops_source_and_duplicates_and_keeps_k():
    assert select_candidates(np.array([5, 5, 3, 7, 3, 9, 1]), source=5, k=3) == [3, 7, 9]


def test_pretrain_candidates_start_with_null_and_exclude_the_source_block(tiny, models):
    _, store = tiny
    retriever, encoder = models
    trainer = Pretrainer(retriever, encoder, store, top_k=4, device=CPU)
    trainer.refresh_index(0)
    queries = salient_span_queries(store, 32, 10)
    # make faiss return the source block first: the document embedding of the source = the query embedding
    out = trainer.forward(queries[:6])
    for q, cands in zip(queries[:6], out["candidates"]):
        assert cands[0] is None  # the null block is candidate 0
        assert q.block_id not in cands
        assert len(cands) == 4 and len(set(cands)) == 4


def test_source_block_excluded_even_when_faiss_ranks_it_first(tiny, models):
    _, store = tiny
    retriever, encoder = models
    trainer = Pretrainer(retriever, encoder, store, top_k=3, device=CPU)
    trainer.refresh_index(0)
    q = salient_span_queries(store, 32, 10)[0]
    source_vector = torch.from_numpy(trainer.index.embeddings[q.block_id : q.block_id + 1]) * 100
    assert trainer.index.search(source_vector.numpy(), 1)[1][0, 0] == q.block_id
    cands = trainer.candidates(source_vector, [q])[0]
    assert cands[0] is None and q.block_id not in cands and len(cands) == 3


def test_one_step_sends_gradients_to_both_towers_and_the_encoder(tiny, models):
    _, store = tiny
    retriever, encoder = models
    trainer = Pretrainer(retriever, encoder, store, top_k=4, device=CPU)
    trainer.refresh_index(0)
    index_before = trainer.index.embeddings.copy()
    out = trainer.forward(salient_span_queries(store, 32, 10)[:4])
    out["loss"].backward()
    assert retriever.query.projection.weight.grad.abs().sum() > 0
    assert retriever.doc.projection.weight.grad.abs().sum() > 0
    assert retriever.doc.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert encoder.mlm.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert isinstance(trainer.index.embeddings, np.ndarray)  # the stale index is plain data, not differentiated
    np.testing.assert_array_equal(trainer.index.embeddings, index_before)


def test_pretrain_refreshes_the_index_on_schedule(tiny, models):
    _, store = tiny
    retriever, encoder = models
    trainer = Pretrainer(retriever, encoder, store, top_k=3, device=CPU)
    logged = []
    summary = pretrain(
        trainer,
        salient_span_queries(store, 32, 10),
        PretrainParams(steps=5, batch_size=2, lr=1e-3, query_lr=1e-3, doc_lr=1e-3),
        refresher=SyncRefresher(store, CPU, 64, refresh_every=2),
        seed=0,
        log=lambda m, s: logged.append((s, m)),
    )
    assert summary["refreshes"] == 2  # at steps 2 and 4
    staleness = [m["index_staleness"] for s, m in logged if "index_staleness" in m]
    assert staleness == [0, 1, 0, 1, 0]
    assert all(np.isfinite(m["loss"]) for _, m in logged if "loss" in m)


# ------------------------------------------------------------------ ICT


def test_ict_removes_the_pseudo_query_ninety_percent_of_the_time(tiny):
    _, store = tiny
    rng = random.Random(0)
    n = 4000
    removed = sum(ict_example(store, rng.randrange(len(store)), rng, 0.9, 32).removed for _ in range(n))
    # binomial(4000, 0.9): sd = 19; 5 sd either way
    assert abs(removed - 0.9 * n) < 5 * (n * 0.9 * 0.1) ** 0.5


def test_ict_removed_sentence_is_absent_from_its_context(tiny):
    _, store = tiny
    rng = random.Random(1)
    for _ in range(50):
        ex = ict_example(store, rng.randrange(len(store)), rng, 1.0, 64)
        sentence = ex.query[1:-1]
        ctx = ex.context
        assert not any(ctx[i : i + len(sentence)] == sentence for i in range(len(ctx)))


def test_ict_training_lowers_the_loss(tiny):
    bert, store = tiny
    torch.manual_seed(0)
    retriever = Retriever.from_backbone(bert, None, 16)
    losses = []
    train_ict(
        retriever,
        store,
        IctParams(steps=30, batch_size=8, lr=1e-3, remove_prob=0.0),
        max_query_tokens=32,
        seed=0,
        device=CPU,
        log=lambda m, s: losses.append(m["ict_loss"]),
    )
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_mlm_head_warmup_trains_only_the_head(tiny):
    bert, store = tiny
    torch.manual_seed(0)
    encoder = KnowledgeAugmentedEncoder.from_backbone(bert, None)
    assert encoder.mlm.cls.predictions.decoder.weight is encoder.mlm.bert.embeddings.word_embeddings.weight
    word = encoder.mlm.bert.embeddings.word_embeddings.weight.detach().clone()
    head = encoder.mlm.cls.predictions.transform.dense.weight.detach().clone()
    warmup_mlm_head(encoder, store, IctParams(mlm_warmup_steps=3, mlm_batch_size=4, mlm_lr=1e-2), seed=0, device=CPU)
    assert torch.equal(word, encoder.mlm.bert.embeddings.word_embeddings.weight)
    assert not torch.equal(head, encoder.mlm.cls.predictions.transform.dense.weight)


# ------------------------------------------------------------------ save / load


def test_retriever_and_encoder_round_trip_through_safetensors(tiny, models, tmp_path):
    _, store = tiny
    retriever, encoder = models
    save_retriever(retriever, tmp_path / "r")
    save_encoder(encoder, tmp_path / "e")
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    again = load_retriever(tmp_path / "r")
    np.testing.assert_allclose(
        embed_blocks(retriever.doc, store, CPU, progress=None),
        embed_blocks(again.doc, store, CPU, progress=None),
        atol=1e-5,
    )
    enc = load_encoder(tmp_path / "e")
    assert (
        enc.mlm.cls.predictions.decoder.weight.data_ptr() == enc.mlm.bert.embeddings.word_embeddings.weight.data_ptr()
    )
    assert torch.equal(
        enc.mlm.cls.predictions.transform.dense.weight, encoder.mlm.cls.predictions.transform.dense.weight
    )


# ------------------------------------------------------------------ Open-QA fine-tuning


def _open_qa(tiny, models):
    _, store = tiny
    retriever, encoder = models
    index = DenseIndex(embed_blocks(retriever.doc, store, CPU, progress=None), np.arange(len(store), dtype=np.int64))
    return OpenQA(
        retriever.query, SpanReader(encoder.bert, hidden=16), store, index, device=CPU, max_query_tokens=32, max_span=10
    )


def test_spans_stay_inside_the_body_and_are_at_most_max_span():
    spans = enumerate_spans(body_start=5, body_len=12, max_span=10)
    assert all(5 <= s <= e < 17 and e - s < 10 for s, e in spans)
    assert (5, 14) in spans and (5, 15) not in spans


def test_finetune_keeps_block_embeddings_frozen_and_trains_query_and_reader(tiny, models):
    model = _open_qa(tiny, models)
    doc_before = models[0].doc.projection.weight.detach().clone()
    index_before = model.index.embeddings.copy()
    q_before = model.query.projection.weight.detach().clone()
    questions = [
        QAExample("[MASK] is the capital of France.", ["Paris"]),
        QAExample("The Berlin Wall fell in [MASK].", ["1989"]),
    ]
    logged = []
    finetune(
        model,
        questions,
        FinetuneParams(steps=3, batch_size=2, lr=1e-3, retriever_top_k=10, top_k=3),
        seed=0,
        log=lambda m, s: logged.append(m),
    )
    np.testing.assert_array_equal(model.index.embeddings, index_before)
    assert torch.equal(doc_before, models[0].doc.projection.weight)
    assert not torch.equal(q_before, model.query.projection.weight)
    assert all(m["retriever_loss"] > 0 for m in logged)  # the answer is in some retrieved block


def test_finetune_losses_are_zero_when_no_block_holds_the_answer(tiny, models):
    model = _open_qa(tiny, models)
    out = model.losses(
        [QAExample("Who painted the Mona Lisa?", ["Leonardo da Vinci"])], retriever_top_k=10, reader_top_k=3
    )
    assert out["retriever_loss"].item() == 0.0 and out["reader_loss"].item() == 0.0


def test_predict_returns_a_span_of_a_retrieved_block(tiny, models):
    model = _open_qa(tiny, models)
    (pred,) = model.predict(["[MASK] is the capital of Norway."], reader_top_k=2, retrieve_k=5)
    assert pred["block"] in pred["retrieved"][:2]
    assert pred["answer"] and pred["answer"] in model.store.blocks[pred["block"]].text
    assert len(model.store.tokenizer(pred["answer"], add_special_tokens=False)["input_ids"]) <= 10


def test_mean_pooling_is_masked_and_survives_a_round_trip(tiny, tmp_path):
    """Padding must not change a mean-pooled embedding; the pooling choice is saved with the weights."""
    from realm_core.modeling import Embedder, load_bert, load_embedder, save_embedder

    bert = tiny[0]
    emb = Embedder(load_bert(bert, None), 16, pooling="mean").eval()
    ids = torch.tensor([[101, 3000, 2003, 102]])
    padded = torch.tensor([[101, 3000, 2003, 102, 0, 0]])
    with torch.no_grad():
        a = emb(ids, torch.ones_like(ids), torch.zeros_like(ids))
        b = emb(padded, (padded != 0).long(), torch.zeros_like(padded))
    assert torch.allclose(a, b, atol=1e-5)
    save_embedder(emb, tmp_path / "e")
    loaded = load_embedder(tmp_path / "e").eval()
    assert loaded.pooling == "mean"
    with torch.no_grad():
        assert torch.allclose(loaded(ids, torch.ones_like(ids), torch.zeros_like(ids)), a, atol=1e-6)


def test_retriever_recall_matches_the_retrieval_inside_evaluation(tiny, models):
    """Zero-shot recall uses the same retrieval as the full evaluation, minus the reader."""
    from realm_core.evaluate import evaluate_open_qa, retriever_recall

    model = _open_qa(tiny, models)
    model.query.eval(), model.reader.eval()
    questions = [
        QAExample("[MASK] is the capital of France.", ["Paris"]),
        QAExample("Mozart lived in [MASK].", ["Vienna"]),
        QAExample("Who painted it?", ["Leonardo"]),
    ]
    full, _ = evaluate_open_qa(model, questions, recall_at=[1, 5], top_k=2)
    alone = retriever_recall(model, questions, recall_at=[1, 5])
    assert alone == {"recall@1": full["realm_recall@1"], "recall@5": full["realm_recall@5"]}
    assert alone["recall@5"] <= 100.0 * 2 / 3  # nothing holds "Leonardo"


def test_saving_the_same_weights_twice_gives_identical_bytes(tiny, models, tmp_path):
    """DVC keys reruns on output bytes: the tied MLM decoder once made every save differ."""
    import hashlib

    from realm_core.modeling import load_encoder, save_encoder

    encoder = models[1]
    digests = set()
    for i in range(3):
        save_encoder(encoder, tmp_path / f"e{i}")
        digests.add(hashlib.sha256((tmp_path / f"e{i}" / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    loaded = load_encoder(tmp_path / "e0")
    assert loaded.mlm.cls.predictions.decoder.weight is loaded.mlm.bert.embeddings.word_embeddings.weight  # re-tied
    assert all(torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), loaded.state_dict().values()))
