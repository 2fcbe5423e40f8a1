"""The departures that make REALM learn (DESIGN.md 1b), one test per switch, and the diagnostics
that show whether it does: evidence gain, per-token retrieval utility, p(null), gradient norms."""

from __future__ import annotations

import random

import pytest
import torch

from realm_core.blocks import Block, BlockStore
from realm_core.config import EncoderWarmupParams, PretrainParams
from realm_core.masking import answer_bearing_blocks, encoder_inputs, salient_span_queries
from realm_core.modeling import NULL_BLOCK, Retriever, load_retriever, load_tokenizer, retrieval_utility, save_retriever
from realm_core.optim import GroupedAdamW, Part, linear_warmup_decay
from realm_core.pretrain import Pretrainer, pretrain
from realm_core.reading import Probe, pretraining_queries, split_probe, warmup_contexts, warmup_encoder
from realm_core.refresh import SyncRefresher
from tests.conftest import CPU

FACTS = [
    ("Mozart", "Mozart was born in Salzburg in 1756. Mozart lived in Vienna."),
    ("Salzburg", "Salzburg is a city in Austria. It is the birthplace of Mozart."),
    ("Vienna", "Vienna is the capital of Austria. Many composers lived in Vienna."),
    ("Beethoven", "Beethoven was born in Bonn in 1770. He moved to Vienna."),
    ("Bonn", "Bonn is a city in Germany. Beethoven was born there."),
    ("Berlin", "Berlin is the capital of Germany. The Berlin Wall fell in 1989."),
]
NAMES = ["Mozart", "Salzburg", "Vienna", "Austria", "Beethoven", "Bonn", "Germany", "Berlin", "1756", "1770", "1989"]


def _blocks() -> list[Block]:
    blocks = []
    for i, (title, text) in enumerate(FACTS):
        cut = text.index(". ") + 1
        sentences = [(0, cut), (cut + 1, len(text))]
        spans = sorted((m, m + len(n), "ENT") for n in NAMES for m in range(len(text)) if text.startswith(n, m))
        blocks.append(Block(i, title, text, sentences, spans))
    return blocks


@pytest.fixture(scope="module")
def facts(tiny):
    bert, _ = tiny
    return bert, BlockStore(_blocks(), load_tokenizer(bert), max_block_tokens=64)


# ------------------------------------------------------------------ optimiser (every loop)


def test_biases_and_layernorm_get_no_weight_decay_and_each_part_its_own_learning_rate(models):
    retriever, encoder = models
    opt = GroupedAdamW(
        {"query": Part.of(retriever.query, 1e-3), "encoder": Part.of(encoder, 2e-3)}, steps=10, weight_decay=0.01
    )
    norm_weight = retriever.query.norm.weight
    groups = {(g["part"], g["weight_decay"]): g for g in opt.optimizer.param_groups}
    assert any(p is norm_weight for p in groups[("query", 0.0)]["params"])
    assert any(p is retriever.query.projection.bias for p in groups[("query", 0.0)]["params"])
    assert any(p is retriever.query.projection.weight for p in groups[("query", 0.01)]["params"])
    assert not any(p is retriever.query.projection.weight for p in groups[("query", 0.0)]["params"])
    assert opt.lr("query") == pytest.approx(1e-3 / 1) and opt.lr("encoder") == pytest.approx(
        2e-3 / 1
    )  # warm-up of 1 step


def test_schedule_warms_up_linearly_then_decays_linearly_to_zero():
    f = linear_warmup_decay(steps=100, warmup_fraction=0.1)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_each_part_is_clipped_on_its_own_and_its_norm_reported():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    opt = GroupedAdamW({"a": Part.of(a, 1e-3), "b": Part.of(b, 1e-3)}, steps=5, clip_norm=1.0)
    (1000 * a(torch.ones(1, 4)).sum() + 1e-3 * b(torch.ones(1, 4)).sum()).backward()
    raw_b = float(torch.cat([p.grad.flatten() for p in b.parameters()]).norm())
    norms = opt.step()
    assert norms["grad_norm_a"] > 100 and norms["grad_norm_b"] == pytest.approx(raw_b, rel=1e-5)
    # a joint clip would have shrunk b's tiny gradient by a's norm; per part it stays whole
    assert raw_b < 1.0


def test_a_non_finite_gradient_stops_training_naming_the_part():
    a = torch.nn.Linear(2, 2)
    opt = GroupedAdamW({"towers": Part.of(a, 1e-3)}, steps=3)
    (a(torch.ones(1, 2)).sum() * float("nan")).backward()
    with pytest.raises(FloatingPointError, match="towers"):
        opt.step()


def test_a_part_with_learning_rate_zero_is_frozen(models):
    retriever, encoder = models
    before = retriever.doc.projection.weight.detach().clone()
    opt = GroupedAdamW({"doc": Part.of(retriever.doc, 0.0), "encoder": Part.of(encoder, 1e-3)}, steps=3)
    assert not any(p.requires_grad for p in retriever.doc.parameters())
    assert "doc" not in opt.trained
    opt.step()
    assert torch.equal(before, retriever.doc.projection.weight)


# ------------------------------------------------------------------ pre-training switches


def test_dropout_off_scores_candidates_deterministically_and_on_does_not(facts, models):
    _, store = facts
    retriever, encoder = models
    queries = salient_span_queries(store, 32, 10)[:4]
    for dropout, same in ((False, True), (True, False)):
        trainer = Pretrainer(retriever, encoder, store, top_k=3, device=CPU, dropout=dropout)
        trainer.refresh_index(0)
        trainer.train()
        assert encoder.training is dropout and retriever.query.training is dropout
        torch.manual_seed(0)
        first = trainer.forward(queries)["loss"]
        second = trainer.forward(queries)["loss"]
        assert torch.equal(first, second) is same
        assert first.requires_grad  # eval mode still trains


def test_null_bias_is_calibrated_to_an_average_block_and_learned(facts, models):
    _, store = facts
    retriever, encoder = models
    trainer = Pretrainer(retriever, encoder, store, top_k=4, device=CPU)
    trainer.refresh_index(0)
    queries = salient_span_queries(store, 32, 10)
    bias = trainer.calibrate_null_bias(queries)
    trainer.train()  # dropout off, as the calibration
    with torch.no_grad():
        logits, _ = trainer.retrieval_logits(queries)
    gap = logits[:, 1:].mean(1) - logits[:, NULL_BLOCK]
    assert abs(float(gap.median())) < 1e-4 and bias != 0.0
    assert torch.all(logits[:, NULL_BLOCK] == bias)  # one scalar for every query: the towers cannot move it
    out = trainer.forward(queries[:3])
    out["loss"].backward()
    assert trainer.null.bias.grad is not None and float(trainer.null.bias.grad) != 0.0


def test_null_gate_makes_p_null_a_sigmoid_and_the_retrieved_scores_compete_only_with_each_other():
    from realm_core.modeling import marginal_log_likelihood
    from realm_core.pretrain import NullScore

    torch.manual_seed(0)
    gate = NullScore(gate=True)
    with torch.no_grad():
        gate.bias.fill_(0.7)
    retrieved = (torch.randn(3, 5) * 4).requires_grad_()  # [B, k-1]
    logits = gate(retrieved)  # [B, k]
    log_pz = logits.log_softmax(-1)
    p_null = torch.sigmoid(torch.tensor(0.7))
    assert torch.allclose(log_pz[:, NULL_BLOCK], p_null.log().expand(3), atol=1e-6)
    assert torch.allclose(log_pz[:, 1:], (1 - p_null).log() + retrieved.log_softmax(-1), atol=1e-5)
    # the loss moves no retrieved score collectively: per query the gradients sum to zero
    logp = torch.randn(3, 6, 2).log_softmax(-1)  # [B, k, M]
    loss = marginal_log_likelihood(logits, logp, torch.ones(3, 2))
    grad, bias_grad = torch.autograd.grad(loss, [retrieved, gate.bias])
    assert torch.allclose(grad.sum(-1), torch.zeros(3), atol=1e-6) and grad.abs().max() > 1e-3
    assert float(bias_grad) != 0.0
    # and without the gate (one softmax) they do not: the shared push the gate removes
    plain = NullScore()
    grad, _ = torch.autograd.grad(
        marginal_log_likelihood(plain(retrieved), logp, torch.ones(3, 2)), [retrieved, plain.bias]
    )
    assert grad.sum(-1).abs().max() > 1e-3


def test_null_gate_is_calibrated_to_one_kth_and_trains_in_the_pretrainer(facts, models):
    _, store = facts
    retriever, encoder = models
    trainer = Pretrainer(retriever, encoder, store, top_k=4, device=CPU, null_gate=True)
    assert trainer.null.gate
    trainer.refresh_index(0)
    queries = salient_span_queries(store, 32, 10)
    trainer.calibrate_null_bias(queries)
    trainer.train()
    with torch.no_grad():
        logits, _ = trainer.retrieval_logits(queries)
    assert torch.allclose(logits.softmax(-1)[:, NULL_BLOCK], torch.full((len(queries),), 0.25), atol=1e-5)
    out = trainer.forward(queries[:3])
    out["loss"].backward()
    assert float(trainer.null.bias.grad) != 0.0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in retriever.query.parameters())
    # the switch only exists beside the learned null score
    assert not Pretrainer(retriever, encoder, store, top_k=4, device=CPU, null_bias=False, null_gate=True).null.gate


def test_without_null_bias_the_null_score_is_the_papers_dot_product(facts, models):
    from realm_core.blocks import doc_batch, query_batch

    _, store = facts
    retriever, encoder = models
    trainer = Pretrainer(retriever, encoder, store, top_k=3, device=CPU, null_bias=False)
    trainer.refresh_index(0)
    trainer.train()
    queries = salient_span_queries(store, 32, 10)[:2]
    with torch.no_grad():
        logits, _ = trainer.retrieval_logits(queries)
        f_null = (
            retriever.query(**query_batch(store, [q.input_ids for q in queries], CPU))
            @ retriever.doc(**doc_batch(store, [None], CPU)).T
        )
    assert torch.allclose(logits[:, NULL_BLOCK], f_null.squeeze(-1), atol=1e-5)
    pretrain(
        trainer,
        salient_span_queries(store, 32, 10),
        PretrainParams(steps=2, batch_size=2),
        refresher=SyncRefresher(store, CPU, 8, 0),
        seed=0,
    )
    assert float(trainer.null.bias) == 0.0 and not trainer.null.bias.requires_grad


def test_shared_embedders_are_one_module_and_survive_a_round_trip(tiny, tmp_path):
    bert, store = tiny
    shared = Retriever.from_backbone(bert, None, 16, shared=True)
    assert shared.shared and shared.query is shared.doc
    separate = Retriever.from_backbone(bert, None, 16)
    assert not separate.shared
    save_retriever(shared, tmp_path / "r")
    loaded = load_retriever(tmp_path / "r")
    assert loaded.shared and torch.equal(loaded.doc.projection.weight, shared.query.projection.weight)
    assert not load_retriever(save_retriever(separate, tmp_path / "s") or tmp_path / "s").shared


def test_query_filter_keeps_only_queries_whose_answer_is_in_another_block(facts):
    _, store = facts
    keep_all = pretraining_queries(store, PretrainParams(query_filter="all", probe_size=0), 32, 0)
    filtered = pretraining_queries(store, PretrainParams(query_filter="answer_elsewhere", probe_size=0), 32, 0)
    evidence = answer_bearing_blocks(store, keep_all.train)
    assert len(keep_all.train) == len(salient_span_queries(store, 32, 10))
    assert filtered.train == [q for q, ev in zip(keep_all.train, evidence) if ev]
    assert 0 < len(filtered.train) < len(keep_all.train)


def test_answer_near_keeps_queries_whose_evidence_is_among_the_closest_blocks(facts):
    from realm_core.masking import answer_near

    _, store = facts
    queries = salient_span_queries(store, 32, 10)
    evidence = answer_bearing_blocks(store, queries)
    from realm_core.bm25 import bm25_retrieve

    wide = answer_near(store, queries, evidence, n=len(store))
    narrow = answer_near(store, queries, evidence, n=1)
    docs = [f"{b.title} {b.text}" for b in store.blocks]
    texts = [
        store.tokenizer.decode([t for t in q.input_ids if t not in store.tokenizer.all_special_ids]) for q in queries
    ]
    lexical = bm25_retrieve(docs, texts, k=len(store))  # blocks sharing a word with the sentence
    assert wide == [
        bool(set(ev) & set(hits)) for ev, hits in zip(evidence, lexical)
    ]  # n = all: evidence that shares a word
    assert 0 < sum(narrow) < sum(wide) and not any(n and not w for n, w in zip(narrow, wide))
    near = pretraining_queries(store, PretrainParams(query_filter="answer_near", probe_size=0), 32, 0)
    assert near.train and set(map(id, near.train)) <= {id(q) for q in near.salient}


# ------------------------------------------------------------------ evidence and the probe


def test_hard_negatives_are_related_blocks_without_the_answer(facts):
    from realm_core.masking import related_blocks_without_answer

    _, store = facts
    queries = salient_span_queries(store, 32, 10)
    evidence = answer_bearing_blocks(store, queries)
    negatives = related_blocks_without_answer(store, queries, evidence, limit=2)
    tok = store.tokenizer
    for q, ev, neg in zip(queries, evidence, negatives):
        assert q.block_id not in neg and not set(neg) & set(ev)
        assert all(tok.decode(q.targets) not in tok.decode(store.body_ids[z]) for z in neg)
    salzburg = next(n for q, n in zip(queries, negatives) if q.block_id == 0 and tok.decode(q.targets) == "salzburg")
    # "Mozart was born in [MASK] in 1756.": the closest blocks without "Salzburg" share "born"
    assert sorted(salzburg) == [3, 4] and all("born" in store.blocks[z].text for z in salzburg)


def test_answer_bearing_blocks_match_whole_words_outside_the_source_most_related_first(facts):
    _, store = facts
    queries = salient_span_queries(store, 32, 10)
    evidence = answer_bearing_blocks(store, queries)
    tok = store.tokenizer
    for q, ev in zip(queries, evidence):
        assert q.block_id not in ev
        answer = tok.decode(q.targets)
        for z in ev:
            assert answer.lower() in store.blocks[z].text.lower()
    vienna_in_mozart = next(
        ev for q, ev in zip(queries, evidence) if q.block_id == 0 and tok.decode(q.targets) == "vienna"
    )
    assert set(vienna_in_mozart) == {2, 3} and vienna_in_mozart[0] == 2  # block 2 shares "lived in Vienna"
    salzburg = next(ev for q, ev in zip(queries, evidence) if q.block_id == 0 and tok.decode(q.targets) == "salzburg")
    assert salzburg == [1]


def test_evidence_gain_is_the_brute_force_log_prob_difference_in_eval_mode(facts, models):
    _, store = facts
    _, encoder = models
    queries = salient_span_queries(store, 32, 10)
    evidence = answer_bearing_blocks(store, queries)
    probe = Probe([q for q, e in zip(queries, evidence) if e], [e for e in evidence if e])
    encoder.train()
    gain = probe.evidence_gain(encoder, store, CPU, batch_size=3)
    assert encoder.training  # restored
    encoder.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for q, ev in zip(probe.queries, probe.evidence):
            for z, sign in ((ev[0], 1), (None, -1)):
                batch = encoder_inputs(store, [q], [[z]], CPU)
                batch.pop("token_mask")
                total += sign * float(encoder.token_log_probs(**batch).sum())
            tokens += len(q.targets)
    assert gain == pytest.approx(total / tokens, abs=1e-5)
    assert probe.evidence_gain(encoder, store, CPU) == pytest.approx(gain, abs=1e-5)  # no dropout: repeatable


def test_probe_holds_out_whole_source_blocks_deterministically(facts):
    _, store = facts
    queries = salient_span_queries(store, 32, 10)
    evidence = answer_bearing_blocks(store, queries)
    keep, probe = split_probe(queries, evidence, size=3, seed=1)
    assert len(probe) == 3 and all(probe.evidence)
    assert {q.block_id for q in probe.queries} <= probe.held_out_blocks
    assert not any(queries[i].block_id in probe.held_out_blocks for i in keep)
    assert len(keep) + sum(q.block_id in probe.held_out_blocks for q in queries) == len(queries)
    assert split_probe(queries, evidence, size=3, seed=1)[0] == keep


def test_warmup_contexts_follow_the_evidence_source_and_null_shares():
    evidence = [[5, 6], [7]]

    def draw(**kw):
        return warmup_contexts([0, 1] * 500, evidence, [1, 2] * 500, 20, EncoderWarmupParams(**kw), random.Random(0))

    only_evidence = draw(evidence_prob=1.0, source_prob=0.0)
    assert all(z in evidence[i % 2] for i, z in enumerate(only_evidence))
    only_source = draw(evidence_prob=1.0, source_prob=1.0)
    assert only_source == [1, 2] * 500
    none = draw(evidence_prob=0.0, source_prob=0.0)
    nulls = sum(z is None for z in none)
    assert 250 < nulls < 420 and all(
        z is None or (z not in evidence[i % 2] and z != [1, 2][i % 2]) for i, z in enumerate(none)
    )
    hard = warmup_contexts(
        [0, 1] * 500,
        evidence,
        [1, 2] * 500,
        20,
        EncoderWarmupParams(evidence_prob=0.0),
        random.Random(0),
        negatives=[[9], [11]],
    )
    hits = sum(z == [9, 11][i % 2] for i, z in enumerate(hard))
    assert 250 < hits < 420  # a third are the hard negatives


def test_encoder_warmup_trains_the_whole_encoder_and_logs_the_gain_before_and_after(facts, models):
    _, store = facts
    _, encoder = models
    queries = salient_span_queries(store, 32, 10)
    evidence = answer_bearing_blocks(store, queries)
    probe = Probe([q for q, e in zip(queries, evidence) if e][:4], [e for e in evidence if e][:4])
    layer = encoder.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    logged = []
    summary = warmup_encoder(
        encoder,
        store,
        queries,
        evidence,
        EncoderWarmupParams(steps=6, batch_size=4, lr=1e-3),
        seed=0,
        device=CPU,
        log=lambda m, s: logged.append((s, m)),
        probe=probe,
        probe_every=3,
    )
    assert not torch.equal(layer, encoder.bert.encoder.layer[0].attention.self.query.weight)  # unfrozen
    gains = [(s, m["evidence_gain"]) for s, m in logged if "evidence_gain" in m]
    assert [s for s, _ in gains] == [0, 3, 6]
    assert summary["evidence_gain_before_warmup"] == gains[0][1] and summary["evidence_gain"] == gains[-1][1]
    assert all("encoder_warmup_loss" in m and "grad_norm_encoder" in m for s, m in logged if "evidence_gain" not in m)


# ------------------------------------------------------------------ the copy head


@pytest.fixture()
def copying(tiny):
    from realm_core.modeling import KnowledgeAugmentedEncoder

    bert, _ = tiny
    torch.manual_seed(0)
    return KnowledgeAugmentedEncoder.from_backbone(bert, None, copy=True).eval()


def test_copy_head_mixes_a_pointer_over_the_body_into_the_vocabulary_softmax(facts, copying):
    _, store = facts
    q = next(q for q in salient_span_queries(store, 32, 10) if q.block_id == 0)
    batch = encoder_inputs(store, [q], [[0, 3]], CPU)  # its own block (holds the span) and another
    batch.pop("token_mask")
    with torch.no_grad():
        got = copying.token_log_probs(**batch)  # [2, M]
        hidden, gathered = copying._read(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["mask_positions"]
        )
        vocab = copying.mlm.cls(gathered).softmax(-1)  # [2, M, V]
        for n in range(2):
            length = int(batch["attention_mask"][n].sum())
            body = [i for i in range(length - 1) if batch["token_type_ids"][n, i] == 1]  # without the closing [SEP]
            for j, target in enumerate(batch["targets"][n].tolist()):
                scores = (
                    torch.stack([copying.copy.query(gathered[n, j]) @ copying.copy.key(hidden[n, i]) for i in body])
                    / hidden.size(-1) ** 0.5
                )
                a = scores.softmax(0)
                g = torch.sigmoid(
                    copying.copy.gate(gathered[n, j])[0] + copying.copy.gate_match * scores.max()
                )  # sees the best match
                pointer = sum(float(a[t]) for t, i in enumerate(body) if int(batch["input_ids"][n, i]) == target)
                brute = float(torch.log((1 - g) * vocab[n, j, target] + g * pointer))
                assert float(got[n, j]) == pytest.approx(brute, abs=1e-5)


def test_copy_head_is_off_for_the_null_block_and_agrees_with_the_full_distribution(facts, copying, tiny):
    from realm_core.modeling import KnowledgeAugmentedEncoder

    _, store = facts
    queries = salient_span_queries(store, 32, 10)[:3]
    batch = encoder_inputs(store, queries, [[None, 1] for _ in queries], CPU)
    batch.pop("token_mask")
    with torch.no_grad():
        got = copying.token_log_probs(**batch).view(3, 2, -1)
        plain = KnowledgeAugmentedEncoder(copying.mlm).eval().token_log_probs(**batch).view(3, 2, -1)
        assert torch.allclose(got[:, 0], plain[:, 0], atol=1e-6)  # null block: p = p_vocab
        full = copying.masked_log_probs(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["mask_positions"]
        )
        assert torch.allclose(
            full.gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1).view(3, 2, -1), got, atol=1e-4
        )
        assert torch.allclose(full.exp().sum(-1), torch.ones(full.shape[:2]), atol=1e-4)  # a distribution


def test_copy_head_gradients_are_finite_for_null_blocks_and_blocks_without_the_answer(facts, copying):
    _, store = facts
    queries = salient_span_queries(store, 32, 10)[:4]
    batch = encoder_inputs(
        store, queries, [[None, 5, q.block_id] for q in queries], CPU
    )  # null, often answer-free, source
    batch.pop("token_mask")
    copying.token_log_probs(**batch).sum().backward()
    grads = [p.grad for p in copying.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_copy_head_survives_a_round_trip(copying, tmp_path):
    from realm_core.modeling import load_encoder, save_encoder

    save_encoder(copying, tmp_path / "enc")
    loaded = load_encoder(tmp_path / "enc")
    assert loaded.copy is not None and torch.equal(loaded.copy.key.weight, copying.copy.key.weight)


# ------------------------------------------------------------------ pre-training diagnostics


def test_per_token_retrieval_utility_divides_by_masked_tokens():
    logits = torch.tensor([[0.0, 1.0], [0.5, 0.0]])
    logp = torch.tensor(
        [[[-5.0, -5.0, 0.0], [-1.0, -2.0, 0.0]], [[-3.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]]
    )  # [B=2, k=2, M=3]
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    pz = logits.softmax(-1)
    brute = []
    for b in range(2):
        for j in range(3):
            if mask[b, j]:
                brute.append(float(torch.log((pz[b] * logp[b, :, j].exp()).sum()) - logp[b, NULL_BLOCK, j]))
    assert float(retrieval_utility(logits, logp, mask, per_token=True)) == pytest.approx(sum(brute) / 3, abs=1e-6)
    assert float(retrieval_utility(logits, logp, mask)) == pytest.approx((brute[0] + brute[1] + brute[2]) / 2, abs=1e-6)


def test_pretrain_logs_the_learning_diagnostics(facts, models):
    _, store = facts
    retriever, encoder = models
    trainer = Pretrainer(retriever, encoder, store, top_k=3, device=CPU)
    queries = salient_span_queries(store, 32, 10)
    evidence = answer_bearing_blocks(store, queries)
    probe = Probe([q for q, e in zip(queries, evidence) if e][:3], [e for e in evidence if e][:3])
    logged = []
    summary = pretrain(
        trainer,
        queries,
        PretrainParams(steps=4, batch_size=2, refresh_every=2),
        refresher=SyncRefresher(store, CPU, 8, 2),
        seed=0,
        log=lambda m, s: logged.append((s, m)),
        probe=probe,
    )
    steps = [m for _, m in logged if "loss" in m]
    for key in (
        "retrieval_utility_per_token",
        "null_prob",
        "grad_norm_query",
        "grad_norm_doc",
        "grad_norm_encoder",
        "lr_encoder",
    ):
        assert all(key in m for m in steps), key
    assert [s for s, m in logged if "evidence_gain" in m] == [0, 2, 4]  # start, the refresh, the end
    for key in (
        "evidence_gain",
        "evidence_gain_start",
        "retrieval_utility_per_token_last_quarter",
        "null_prob_last_quarter",
        "grad_norm_doc_last_quarter",
    ):
        assert key in summary, key
    assert 0.0 < summary["null_prob_last_quarter"] < 1.0
