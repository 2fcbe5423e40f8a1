"""REALM rules not covered elsewhere: the null block's inputs and score, and ORQA's batched fine-tuning losses."""

from __future__ import annotations

import numpy as np
import torch

from realm_core.blocks import doc_batch, embed_blocks, pad_batch, query_batch
from realm_core.finetune import OpenQA, enumerate_spans
from realm_core.index import DenseIndex
from realm_core.metrics import answer_spans
from realm_core.modeling import SpanReader
from realm_core.questions import QAExample
from tests.conftest import CPU

QUESTIONS = [
    QAExample("[MASK] is the capital of France.", ["Paris"]),
    QAExample("The Berlin Wall fell in [MASK].", ["1989"]),
    QAExample("Mozart lived in [MASK] from 1781.", ["Vienna"]),
]


def test_null_block_inputs_are_empty_and_its_score_is_learned_and_query_dependent(tiny, models):
    """Section 3.4: z = null is `[CLS] [SEP] [SEP]` for the retriever and `[CLS] x [SEP] [SEP]` for the encoder.

    Its segments follow the block rule `[CLS] title [SEP]` = 0, `body [SEP]` = 1 with both empty: [0, 0, 1]."""
    _, store = tiny
    retriever, _ = models
    tok = store.tokenizer
    ids, segments = store.doc_sequence(None)
    assert ids == [tok.cls_token_id, tok.sep_token_id, tok.sep_token_id] and segments == [0, 0, 1]
    x = store.query_ids("Mozart lived in Vienna.", 32)
    pair, _, body_start = store.pair_sequence(x, None)
    assert pair == [*x, tok.sep_token_id] and body_start == len(x)  # [CLS] x [SEP] [SEP]

    queries = [store.query_ids(t, 32) for t in ("Mozart lived in Vienna.", "The Berlin Wall fell in 1989.")]
    q = retriever.query(**query_batch(store, queries, CPU))  # [2, d]
    null = retriever.doc(**doc_batch(store, [None], CPU))  # [1, d]: the null block's embedding
    scores = (q @ null.T).squeeze(-1)  # f(x, null) for each query
    assert not torch.allclose(scores[0], scores[1])  # depends on x
    scores.sum().backward()
    assert retriever.doc.projection.weight.grad.abs().sum() > 0  # and is learned through Embed_doc


def _open_qa(tiny, models) -> OpenQA:
    _, store = tiny
    retriever, encoder = models
    index = DenseIndex(embed_blocks(retriever.doc, store, CPU, progress=None), np.arange(len(store), dtype=np.int64))
    model = OpenQA(
        retriever.query, SpanReader(encoder.bert, hidden=16), store, index, device=CPU, max_query_tokens=32, max_span=10
    )
    model.query.eval(), model.reader.eval()  # no dropout: batched and one-by-one must agree exactly
    return model


def test_batched_finetuning_losses_equal_the_mean_of_one_question_at_a_time(tiny, models):
    """We batch over questions where the HF port could only take one; batching must not change the loss."""
    model = _open_qa(tiny, models)
    batched = model.losses(QUESTIONS, retriever_top_k=8, reader_top_k=3)
    single = [model.losses([q], retriever_top_k=8, reader_top_k=3) for q in QUESTIONS]
    for key in ("retriever_loss", "reader_loss", "loss"):
        assert torch.allclose(batched[key], torch.stack([s[key] for s in single]).mean(), atol=1e-5), key


def test_reader_loss_is_one_softmax_over_all_block_span_pairs_plus_the_retriever_score(tiny, models):
    """ORQA / REALM fine-tuning, brute force for one question: for every block z in the top k and every
    span s of at most 10 wordpieces inside its body, score = reader(z, s) + f(x, z); the loss is
    -log sum over the correct pairs of the softmax over all pairs."""
    model = _open_qa(tiny, models)
    store, question = model.store, QUESTIONS[0]
    q_ids, logits, ids = model.retrieve([question.question], len(store))
    answer_ids = [store.tokenizer(a, add_special_tokens=False)["input_ids"] for a in question.answers]
    first_hit = next(r for r, z in enumerate(ids[0].tolist()) if answer_spans(store.body_ids[z], answer_ids, 10))
    k = max(2, first_hit + 1)  # read down to a block that holds the answer (the tiny model's ranking is random)
    scores, correct = [], []
    for rank, z in enumerate(ids[0, :k].tolist()):
        seq, seg, body_start = store.pair_sequence(q_ids[0], z)
        spans = enumerate_spans(body_start, len(seq) - body_start - 1, 10)
        inputs = pad_batch([seq], [seg], store.tokenizer.pad_token_id, CPU)
        span_scores = model.reader.span_logits(
            **inputs, starts=torch.tensor([[s for s, _ in spans]]), ends=torch.tensor([[e for _, e in spans]])
        )[0]
        scores.append(span_scores + logits[0, rank])
        hits = {(s + body_start, e + body_start) for s, e in answer_spans(store.body_ids[z], answer_ids, 10)}
        correct.append(torch.tensor([span in hits for span in spans]))
    all_scores, all_correct = torch.cat(scores), torch.cat(correct)
    assert all_correct.any()  # "Paris" is in a top block, so the brute force is not the zero case
    expected = torch.logsumexp(all_scores, 0) - torch.logsumexp(all_scores[all_correct], 0)
    out = model.losses([question], retriever_top_k=len(store), reader_top_k=k)
    assert torch.allclose(out["reader_loss"], expected, atol=1e-4)


def test_retriever_loss_marginalises_over_every_retrieved_block_holding_an_answer(tiny, models):
    """ORQA's retriever loss: -log sum_{z in top K, has_answer(z)} p(z|x), softmax over the top K."""
    from realm_core.metrics import has_answer

    model = _open_qa(tiny, models)
    question = QUESTIONS[0]
    _, logits, ids = model.retrieve([question.question], len(model.store))  # K = all blocks (capped by the corpus)
    hit = torch.tensor([has_answer(model.store.blocks[z].text, question.answers) for z in ids[0].tolist()])
    assert 0 < int(hit.sum()) < len(hit)
    expected = torch.logsumexp(logits[0], 0) - torch.logsumexp(logits[0][hit], 0)
    out = model.losses([question], retriever_top_k=5000, reader_top_k=3)
    assert torch.allclose(out["retriever_loss"], expected, atol=1e-5)
