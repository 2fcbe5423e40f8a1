"""The synthetic knowledge corpus (realm_core/synthetic.py) and the mechanics bench (bench/mechanics.py).

The generator tests check the properties the benchmark's claim rests on: every fact is stated in
exactly one block, its query can be answered from that block and from no closed-book shortcut
(the query is a paraphrase with the value masked), and every fact has distractors. The
end-to-end test runs a small REALM pre-training from an untrained retriever and checks it
learns to retrieve from the MLM signal alone, while the frozen-retriever control cannot.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from realm_core.modeling import backbone_dir, load_tokenizer
from realm_core.synthetic import RELATIONS, fact_queries, make_store, make_world, split_facts


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(backbone_dir("minilm"))


@pytest.fixture(scope="module")
def world(tokenizer):
    return make_world(tokenizer, seed=3, entities=40, relations=4)


@pytest.fixture(scope="module")
def store(world, tokenizer):
    return make_store(world, tokenizer)


def _stated(relation, entity: str) -> re.Pattern:
    """The block sentence of (entity, relation) with any value: finds every statement of that fact."""
    before, after = relation.block_template.split("{v}")
    return re.compile(r"(?<![a-z])" + re.escape(before.format(e=entity)) + r"[a-z]+" + re.escape(after))


def test_every_fact_is_stated_in_exactly_one_block_and_that_is_its_block(world):
    assert len(world.facts) == 40 * 4
    for fact in world.facts:
        pattern = _stated(world.relation(fact.relation), fact.entity)
        holders = [b.id for b in world.blocks for _ in pattern.finditer(b.text)]
        assert holders == [fact.block_id], fact
        block = world.blocks[fact.block_id]
        assert block.text[fact.span[0] : fact.span[1]] == world.relation(fact.relation).block_template.format(
            e=fact.entity, v=fact.value
        )
        assert fact.span in block.sentences


def test_entity_layout_blocks_hold_two_facts_of_one_entity_with_uninformative_titles(world):
    per_block = Counter(f.block_id for f in world.facts)
    assert set(per_block) == set(range(len(world.blocks)))
    assert set(per_block.values()) == {2}
    for block in world.blocks:
        assert len({f.entity for f in world.facts if f.block_id == block.id}) == 1
        assert block.title == f"record {block.id}"
        assert len(block.sentences) == per_block[block.id]
    assert world.chance_recall_at_1 == 1 / len(world.blocks)


def test_mixed_layout_blocks_hold_two_or_three_facts_of_different_entities(tokenizer):
    mixed = make_world(tokenizer, seed=3, entities=40, relations=4, facts_per_block=(2, 3), layout="mixed")
    per_block = Counter(f.block_id for f in mixed.facts)
    assert set(per_block.values()) == {2, 3} and sum(per_block.values()) == 160
    for block in mixed.blocks:
        facts = [f for f in mixed.facts if f.block_id == block.id]
        assert len({f.entity for f in facts}) == len(facts) == len({f.relation for f in facts})
    for fact in mixed.facts:
        assert [
            b.id for b in mixed.blocks for _ in _stated(mixed.relation(fact.relation), fact.entity).finditer(b.text)
        ] == [fact.block_id]


def test_distractor_blocks_share_the_entity_or_the_relation_of_each_fact(world):
    by_block = {b.id: [f for f in world.facts if f.block_id == b.id] for b in world.blocks}
    for fact in world.facts:
        others = [fs for z, fs in by_block.items() if z != fact.block_id]
        assert any(g.entity == fact.entity for fs in others for g in fs), "no other block names the entity"
        assert any(g.relation == fact.relation for fs in others for g in fs), "no other block states the relation"
        mates = [g for g in by_block[fact.block_id] if g.id != fact.id]
        assert mates and all(g.relation != fact.relation for g in mates), (
            "the fact's own block holds no distractor fact"
        )


def test_entities_are_unique_made_up_names_of_two_or_three_wordpieces(world, tokenizer):
    assert len(set(world.entities)) == len(world.entities) == 40
    vocab = tokenizer.get_vocab()
    values = {v for r in RELATIONS for v in r.values}
    for name in world.entities:
        pieces = tokenizer.tokenize(name)
        assert 2 <= len(pieces) <= 3 and name not in vocab
        assert not {p.lstrip("#") for p in pieces} & values


def test_values_are_single_wordpieces_disjoint_across_relations(tokenizer):
    seen: set[str] = set()
    for r in RELATIONS:
        assert len(r.values) >= 10
        assert all(len(tokenizer.tokenize(v)) == 1 for v in r.values), r.name
        assert not seen & set(r.values)
        seen |= set(r.values)
        assert r.query_template != r.block_template


def test_queries_mask_exactly_the_value_of_a_paraphrase_and_have_no_source_block(world, store, tokenizer):
    queries = fact_queries(world, store)
    assert len(queries) == len(world.facts)
    for fact, q in zip(world.facts, queries):
        relation = world.relation(fact.relation)
        assert q.block_id == -1
        assert q.input_ids[0] == tokenizer.cls_token_id and q.input_ids[-1] == tokenizer.sep_token_id
        assert [i for i, t in enumerate(q.input_ids) if t == tokenizer.mask_token_id] == q.mask_positions
        assert q.targets == tokenizer.convert_tokens_to_ids(tokenizer.tokenize(fact.value))
        restored = list(q.input_ids)
        for p, t in zip(q.mask_positions, q.targets):
            restored[p] = t
        assert restored == tokenizer(relation.query_template.format(e=fact.entity, v=fact.value))["input_ids"]
        # the query is not a copy of the corpus sentence: no block holds it
        assert not any(relation.query_template.format(e=fact.entity, v=fact.value) in b.text for b in world.blocks)


def test_the_answer_of_each_query_occurs_in_its_fact_block(world, store):
    for fact, q in zip(world.facts, fact_queries(world, store)):
        body = store.body_ids[fact.block_id]
        n = len(q.targets)
        assert any(body[i : i + n] == q.targets for i in range(len(body) - n + 1)), fact
        entity = store.tokenizer(fact.entity, add_special_tokens=False)["input_ids"]
        assert any(body[i : i + len(entity)] == entity for i in range(len(body))), fact


def test_the_world_is_deterministic_from_the_seed(tokenizer, world):
    again = make_world(tokenizer, seed=3, entities=40, relations=4)
    assert again.blocks == world.blocks and again.facts == world.facts
    other = make_world(tokenizer, seed=4, entities=40, relations=4)
    assert other.blocks != world.blocks
    assert split_facts(world, 0.25, seed=1) == split_facts(world, 0.25, seed=1)


def test_split_holds_out_one_fact_of_every_block_of_a_held_out_entity(world):
    train, held_out = split_facts(world, 0.25, seed=1)
    assert abs(len(held_out) - 0.25 * len(world.facts)) <= 2
    assert sorted(f.id for f in train + held_out) == [f.id for f in world.facts]
    for entity in {f.entity for f in held_out}:
        for block in {f.block_id for f in world.facts if f.entity == entity}:
            assert (
                sum(f.block_id == block for f in held_out) == 1
            )  # so every block of the entity keeps one trained query
            assert sum(f.block_id == block for f in train) == 1


def test_blocks_fit_the_block_budget(world, tokenizer):
    with pytest.raises(ValueError, match="max_block_tokens"):
        make_store(world, tokenizer, max_block_tokens=10)
    store = make_store(world, tokenizer, max_block_tokens=64)
    assert len(store) == len(world.blocks)


def test_a_block_states_each_relation_at_most_once(world):
    for block in world.blocks:
        relations = [f.relation for f in world.facts if f.block_id == block.id]
        assert len(set(relations)) == len(relations)


# ---------------------------------------------------------------------------- the bench, end to end


@pytest.fixture(scope="module")
def quick_results():
    """bench/mechanics.py --quick in this process: warm-up, then realm and the frozen-retriever control."""
    from bench.mechanics import QUICK, run

    return run(QUICK, seed=13, variants=["realm", "frozen_retriever"], threads=2)


def test_realm_learns_to_retrieve_from_the_mlm_signal_alone(quick_results):
    realm = quick_results["variants"]["realm"]
    chance = quick_results["chance_recall_at_1"]
    assert realm["initial_recall_at_1"] < 3 * chance  # the untrained retriever
    assert realm["final_recall_at_1"] >= 5 * chance, realm["curves"]["eval"]


def test_without_learnt_retrieval_the_held_out_facts_cannot_be_predicted(quick_results):
    realm, frozen = quick_results["variants"]["realm"], quick_results["variants"]["frozen_retriever"]
    assert frozen["final_recall_at_1"] < 3 * quick_results["chance_recall_at_1"]
    assert realm["final_mlm_accuracy"] - frozen["final_mlm_accuracy"] >= 0.3, (
        realm["final_mlm_accuracy"],
        frozen["final_mlm_accuracy"],
    )


def test_the_results_hold_what_reports_mechanics_json_promises(quick_results, tmp_path):
    import json

    from bench.mechanics import markdown, plot

    assert 0 < quick_results["chance_recall_at_1"] < 0.1
    for v in quick_results["variants"].values():
        for key in ("final_recall_at_1", "final_mlm_accuracy", "wall_seconds"):
            assert 0 <= v[key] and (key == "wall_seconds" or v[key] <= 1)
        ev = v["curves"]["eval"]
        assert ev["step"][0] == 0 and len(ev["recall_at_1"]) == len(ev["mlm_accuracy"]) == len(ev["step"])
        assert len(v["curves"]["step"]["loss"]) == v["params"]["steps"]
    from bench.publish import publish

    files = [tmp_path / "mechanics.json", tmp_path / "mechanics.md", tmp_path / "mechanics.png"]
    publish(quick_results, files, markdown, plot, None, indent=1)  # what main() writes, without MLflow
    assert json.loads(files[0].read_text()) == json.loads(json.dumps(quick_results))  # plain JSON, all of it
    assert files[2].read_bytes()[:4] == b"\x89PNG"
    assert files[1].read_text() == markdown(quick_results) and "| realm |" in files[1].read_text()


def test_the_marginal_the_bench_scores_is_realms_marginal_likelihood(store, world):
    """mlm_accuracy's argmax runs over log sum_z p(z|x) p(y|z,x); at the targets that must be the
    per-token marginal the pre-training loss is made of (modeling.marginal_log_likelihood)."""
    from bench.mechanics import CPU, Pretrainer, marginal_log_probs
    from realm_core.modeling import KnowledgeAugmentedEncoder, Retriever

    torch.manual_seed(0)
    retriever = Retriever.from_backbone(backbone_dir("minilm"), 1, 16, "mean")
    encoder = KnowledgeAugmentedEncoder.from_backbone(backbone_dir("minilm"), 1, copy=True)
    trainer = Pretrainer(retriever, encoder, store, top_k=4, device=CPU)
    trainer.refresh_index(0)
    for m in trainer.modules().values():
        m.eval()
    batch = fact_queries(world, store)[:5]
    with torch.no_grad():
        marginal, targets, mask = marginal_log_probs(trainer, batch)
        out = trainer.forward(batch)
    brute = torch.logsumexp(out["logits"].log_softmax(-1)[:, :, None] + out["token_log_probs"], dim=1)  # [B, M]
    assert torch.allclose(marginal.gather(-1, targets[..., None])[..., 0] * mask, brute * out["token_mask"], atol=1e-4)
    assert torch.allclose(
        marginal.exp().sum(-1)[mask.bool()], torch.ones(int(mask.sum())), atol=1e-3
    )  # a distribution over the vocabulary


def test_the_bench_logs_its_curves_and_reports_to_mlflow(quick_results, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from bench.mechanics import log_to_mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # never mlflow.set_tracking_uri: it would outlive this test
    report = tmp_path / "mechanics.json"
    report.write_text("{}")
    run_id = log_to_mlflow({**quick_results, "config": {"seed": 13}}, [report], quick=True, root=tmp_path)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["bench"] == "mechanics"
    assert run.data.metrics["realm.final_recall_at_1"] == pytest.approx(
        quick_results["variants"]["realm"]["final_recall_at_1"]
    )
    history = client.get_metric_history(run_id, "realm.recall_at_1")
    assert [m.step for m in history] == quick_results["variants"]["realm"]["curves"]["eval"]["step"]
    assert [a.path for a in client.list_artifacts(run_id)] == ["mechanics.json"]
    assert (tmp_path / "mlartifacts").is_dir()  # a local store keeps the artefacts beside the project
