"""A synthetic knowledge corpus: the quickest proof that REALM's mechanics learn (DESIGN.md 1b).

REALM (Guu et al. 2020, section 3) learns to retrieve from the masked-LM signal alone: a block
is rewarded when reading it makes the masked tokens likely. Real text mixes that signal with
everything else an MLM can guess; here every masked answer is predictable *only* from one block:

    entities   fictional pronounceable names ("kuzove", "dilumi"): 2-3 wordpieces each, unique,
               so neither the backbone nor a closed-book guess knows anything about them
    facts      (entity, relation, value): every entity has every relation; the value is drawn
               uniformly from the relation's ~15-20 single-wordpiece words, so a closed-book
               guess is right about 1 / |values| of the time
    blocks     2-3 fact sentences about *different* entities, titles "record 17": each fact is
               stated in exactly one block, and its distractors are the other blocks that name
               the same entity (its other relations) or state the same relation of others
    queries    one per fact, from a *paraphrase* of the block sentence ("kuzove lives in paris."
               -> "the home of kuzove is [MASK]."), every wordpiece of the value masked. A query
               is not a corpus sentence, so it has no source block (block_id = -1); its gold
               block is `Fact.block_id`.

Recall@1 of the gold block starts near chance (1 / number of blocks) for an untrained retriever
and must rise from the MLM signal alone; `bench/mechanics.py` runs that and its ablations.
Everything here is pure Python over the tokenizer and deterministic given the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from realm_core.blocks import Block, BlockStore
from realm_core.masking import MaskedQuery


@dataclass(frozen=True)
class Relation:
    name: str
    block_template: str  # how the corpus states the fact: "{e} lives in {v}."
    query_template: str  # a paraphrase, for the masked query: "the home of {e} is {v}."
    values: tuple[str, ...]  # single-wordpiece words, disjoint across relations


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "home",
        "{e} lives in {v}.",
        "the home of {e} is {v}.",
        tuple(
            "london paris berlin rome madrid vienna moscow tokyo cairo dublin oslo lisbon athens prague warsaw".split()
        ),
    ),
    Relation(
        "job",
        "{e} works as a {v}.",
        "by trade, {e} is a {v}.",
        tuple(
            "farmer baker doctor teacher sailor painter singer dancer lawyer soldier writer hunter miner judge nurse pilot".split()
        ),
    ),
    Relation(
        "instrument",
        "{e} plays the {v}.",
        "the instrument of {e} is the {v}.",
        tuple("piano guitar violin drum flute harp trumpet organ bass cello horn bell".split()),
    ),
    Relation(
        "pet",
        "{e} keeps a pet {v}.",
        "the pet of {e} is the {v}.",
        tuple("cat dog horse fox wolf bear owl eagle snake lion tiger rabbit goat sheep deer duck frog".split()),
    ),
    Relation(
        "colour",
        "{e} always wears {v}.",
        "the favourite colour of {e} is {v}.",
        tuple("red blue green yellow black white purple orange pink brown grey silver gold".split()),
    ),
    Relation(
        "sport",
        "{e} is a fan of {v}.",
        "the sport that {e} follows is {v}.",
        tuple("tennis golf chess football hockey boxing rugby cricket baseball swimming".split()),
    ),
)

ONSETS = tuple("b d f g k l m n p r s t v z br dr gr kr pr tr st sk sl sp th sh ch".split())
VOWELS = tuple("a e i o u ai ei ou".split())
CODAS = ("", "", "n", "r", "l", "s", "m", "k")


@dataclass(frozen=True)
class Fact:
    id: int
    entity: str
    relation: str
    value: str
    block_id: int  # the one block that states it
    span: tuple[int, int]  # its sentence's character offsets in that block's text


@dataclass
class World:
    """The corpus blocks and the facts they state (fact i is `facts[i]`)."""

    blocks: list[Block]
    facts: list[Fact]
    entities: list[str]
    relations: tuple[Relation, ...]
    seed: int

    @property
    def chance_recall_at_1(self) -> float:
        return 1.0 / len(self.blocks)

    def relation(self, name: str) -> Relation:
        return next(r for r in self.relations if r.name == name)


def entity_names(
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    rng: random.Random,
    forbidden: set[str],
    distinct_pieces: bool = True,
) -> list[str]:
    """`count` unique made-up names of 2-3 syllables that the tokenizer splits into 2-3 wordpieces,
    none of which is a value word (so a name never "contains" an answer).

    With `distinct_pieces` no two names share a wordpiece (about 500 names are possible), so a
    name is recognised by any one of its pieces; otherwise names only differ as strings.
    """
    vocab = tokenizer.get_vocab()
    names: list[str] = []
    used: set[str] = set()
    for _ in range(400 * count):
        if len(names) == count:
            return names
        name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(rng.choice((2, 3))))
        pieces = tokenizer.tokenize(name)
        if (
            name in vocab
            or name in names
            or len(name) > 10
            or not 2 <= len(pieces) <= 3
            or any(p.lstrip("#") in forbidden for p in pieces)
        ):
            continue
        if distinct_pieces and (used & set(pieces) or len(set(pieces)) < len(pieces)):
            continue
        names.append(name)
        used |= set(pieces)
    raise ValueError(
        f"could not draw {count} entity names{' with distinct wordpieces' if distinct_pieces else ''}; ask for fewer"
    )


def _group(
    facts: list[tuple[str, str, str]], rng: random.Random, sizes: tuple[int, ...]
) -> list[list[tuple[str, str, str]]]:
    """Deal the facts into blocks of `sizes` sentences, each block about different entities *and*
    different relations, so the block sentence that answers a query is the one of its relation.

    Each block takes one fact from each of the n relations with the most facts left (ties broken
    at random), which keeps the relations balanced to the end; retried on a dead end.
    """
    for _ in range(1000):
        pools: dict[str, list[tuple[str, str, str]]] = {}
        for fact in facts:
            pools.setdefault(fact[1], []).append(fact)
        for pool in pools.values():
            rng.shuffle(pool)
        groups, left = [], len(facts)
        while left:
            fits = [n for n in sizes if n == left or (n < left and left - n >= min(sizes))]
            n = rng.choice(fits) if fits else 0
            relations = sorted((r for r in pools if pools[r]), key=lambda r: (-len(pools[r]), rng.random()))[:n]
            if not n or len(relations) < n:
                break
            group: list[tuple[str, str, str]] = []
            for r in relations:
                pick = next((f for f in pools[r] if f[0] not in {g[0] for g in group}), None)
                if pick is None:
                    break
                pools[r].remove(pick)
                group.append(pick)
            if len(group) < n:
                break
            rng.shuffle(group)
            groups.append(group)
            left -= n
        if not left:
            rng.shuffle(groups)
            return groups
    raise ValueError(
        f"cannot deal {len(facts)} facts into blocks of {sizes} sentences with distinct entities and relations; use more relations or entities"
    )


def _by_entity(
    facts: list[tuple[str, str, str]], rng: random.Random, sizes: tuple[int, ...]
) -> list[list[tuple[str, str, str]]]:
    """Each entity's facts shuffled and cut into blocks of `sizes` sentences; the blocks shuffled."""
    groups = []
    for entity in dict.fromkeys(e for e, _, _ in facts):
        own = [f for f in facts if f[0] == entity]
        rng.shuffle(own)
        while own:
            left = len(own)
            fits = [n for n in sizes if n == left or (n < left and left - n >= min(sizes))] or [left]
            n = rng.choice(fits)
            groups.append(own[:n])
            own = own[n:]
    rng.shuffle(groups)
    return groups


LAYOUTS = ("entity", "mixed")


def make_world(
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int,
    entities: int = 60,
    relations: int = 4,
    facts_per_block: tuple[int, ...] = (2,),
    layout: str = "entity",
    distinct_pieces: bool = True,
) -> World:
    """The synthetic corpus: `entities` x `relations` facts in blocks of `facts_per_block` sentences.

    layout "entity": a block holds facts of one entity (its other facts are in its other blocks);
    "mixed": facts of different entities and relations. Either way a block states a relation once.
    `distinct_pieces`: no two entity names share a wordpiece (entity_names).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 1 <= relations <= len(RELATIONS):
        raise ValueError(f"relations must be 1..{len(RELATIONS)}, got {relations}")
    rng = random.Random(seed)
    rels = RELATIONS[:relations]
    for r in rels:
        bad = [v for v in r.values if len(tokenizer.tokenize(v)) != 1]
        if bad:
            raise ValueError(f"relation {r.name}: values must be single wordpieces, not {bad}")
    names = entity_names(tokenizer, entities, rng, {v for r in RELATIONS for v in r.values}, distinct_pieces)
    triples = [(e, r.name, rng.choice(r.values)) for e in names for r in rels]
    by_name = {r.name: r for r in rels}
    blocks: list[Block] = []
    facts: list[Fact] = []
    grouped = _by_entity(triples, rng, facts_per_block) if layout == "entity" else _group(triples, rng, facts_per_block)
    for block_id, group in enumerate(grouped):
        text, sentences, spans = "", [], []
        for e, r, v in group:
            if text:
                text += " "
            start = len(text)
            template = by_name[r].block_template
            sentence = template.format(e=e, v=v)
            text += sentence
            sentences.append((start, len(text)))
            e_at = start + template.index("{e}")
            v_at = start + template.format(e=e, v="{v}").index("{v}")
            spans += [(e_at, e_at + len(e), "ENTITY"), (v_at, v_at + len(v), r.upper())]
            facts.append(Fact(len(facts), e, r, v, block_id, (start, len(text))))
        blocks.append(Block(block_id, f"record {block_id}", text, sentences, sorted(spans)))
    facts.sort(key=lambda f: (names.index(f.entity), [r.name for r in rels].index(f.relation)))
    facts = [Fact(i, f.entity, f.relation, f.value, f.block_id, f.span) for i, f in enumerate(facts)]
    return World(blocks, facts, names, rels, seed)


def fact_query(store: BlockStore, relation: Relation, fact: Fact, max_tokens: int = 48) -> MaskedQuery:
    """`[CLS] paraphrase [SEP]` with every wordpiece of the value -> [MASK]; no source block (-1)."""
    text = relation.query_template.format(e=fact.entity, v=fact.value)
    at = relation.query_template.format(e=fact.entity, v="{v}").index("{v}")
    enc = store.tokenizer(text, truncation=True, max_length=max_tokens, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    positions = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < at + len(fact.value) and b > at]
    targets = [ids[p] for p in positions]
    for p in positions:
        ids[p] = store.tokenizer.mask_token_id
    return MaskedQuery(-1, ids, positions, targets)


def fact_queries(world: World, store: BlockStore, facts: list[Fact] | None = None) -> list[MaskedQuery]:
    """One masked query per fact (all facts by default), in the order of `facts`."""
    return [fact_query(store, world.relation(f.relation), f) for f in (world.facts if facts is None else facts)]


def split_facts(world: World, held_out_fraction: float, seed: int) -> tuple[list[Fact], list[Fact]]:
    """(train, held-out) facts: pre-training trains on the first, the metrics are reported on the
    second (their blocks stay in the corpus, their queries are never trained on).

    Entities are drawn at random and one fact of *each* of their blocks is held out, until about
    `held_out_fraction` of the facts are. So a held-out query's entity has as many trained queries
    answered by each of its blocks: a retriever that learnt "entity -> block" by heart favours none
    of them, and only the relation can pick the right one (with a split by fact, the held-out fact's
    block answers fewer trained queries of its entity than the entity's other blocks do).
    """
    rng = random.Random(seed)
    blocks_of: dict[str, dict[int, list[Fact]]] = {}
    for f in world.facts:
        blocks_of.setdefault(f.entity, {}).setdefault(f.block_id, []).append(f)
    entities = list(blocks_of)
    rng.shuffle(entities)
    held: set[int] = set()
    for e in entities:
        if len(held) >= held_out_fraction * len(world.facts):
            break
        held.update(rng.choice(facts).id for facts in blocks_of[e].values())
    return [f for f in world.facts if f.id not in held], [f for f in world.facts if f.id in held]


def make_store(world: World, tokenizer: PreTrainedTokenizerBase, max_block_tokens: int = 64) -> BlockStore:
    store = BlockStore(world.blocks, tokenizer, max_block_tokens)
    longest = max(3 + len(t) + len(b) for t, b in zip(store.title_ids, store.body_ids))
    if longest > max_block_tokens:
        raise ValueError(f"a synthetic block has {longest} wordpieces, more than max_block_tokens={max_block_tokens}")
    return store
