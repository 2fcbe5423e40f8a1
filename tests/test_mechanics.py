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
        assert block.text[fact.span[0] : fact.span[1]] == world.relation(fact.relation).block_template.format(e=fact.entity, v=fact.value)
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
        assert [b.id for b in mixed.blocks for _ in _stated(mixed.relation(fact.relation), fact.entity).finditer(b.text)] == [fact.block_id]


def test_distractor_blocks_share_the_entity_or_the_relation_of_each_fact(world):
    by_block = {b.id: [f for f in world.facts if f.block_id == b.id] for b in world.blocks}
    for fact in world.facts:
        others = [fs for z, fs in by_block.items() if z != fact.block_id]
        assert any(g.entity == fact.entity for fs in others for g in fs), "no other block names the entity"
        assert any(g.relation == fact.relation for fs in others for g in fs), "no other block states the relation"
        mates = [g for g in by_block[fact.block_id] if g.id != fact.id]
        assert mates and all(g.relation != fact.relation for g in mates), "the fact's own block holds no distractor fact"


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


def test_split_facts_partitions_the_facts(world):
    train, held_out = split_facts(world, 0.25, seed=1)
    assert len(held_out) == round(0.25 * len(world.facts))
    assert sorted(f.id for f in train + held_out) == [f.id for f in world.facts]


def test_blocks_fit_the_block_budget(world, tokenizer):
    with pytest.raises(ValueError, match="max_block_tokens"):
        make_store(world, tokenizer, max_block_tokens=10)
    store = make_store(world, tokenizer, max_block_tokens=64)
    assert len(store) == len(world.blocks)


def test_a_block_states_each_relation_at_most_once(world):
    for block in world.blocks:
        relations = [f.relation for f in world.facts if f.block_id == block.id]
        assert len(set(relations)) == len(relations)
