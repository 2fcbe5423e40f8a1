"""`realm index add FILE` / `realm index remove --ids ...` / `realm index list`: the project side of
realm_core/knowledge.py. Reads params.yaml and the pipeline's outputs, writes the overlay
data/knowledge/ and versions it with `dvc add` (data/knowledge.dvc), so the change is committed
like any data and `realm ask` / the API answer from it at their next load.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from realm_core.config import load_params
from realm_core.io import InputError
from realm_core.knowledge import (
    Knowledge,
    add_passages,
    index_signature,
    load_knowledge,
    passage_ids,
    remove_passages,
    save_knowledge,
)
from realm_core.paths import Paths


def _base(paths: Paths) -> tuple[list[str], str, str]:
    """The corpus's passage id per block, and the data/-relative doc tower its frozen index came
    from and the embedding kernel it used (the additions must be embedded the same way)."""
    import json

    for needed in (paths.blocks, paths.finetune / "index" / "index.json"):
        if not needed.exists():
            raise InputError(
                f"{needed}: not found; run `realm run` first (the index to update is the finetune stage's)"
            )
    meta = json.loads((paths.finetune / "index" / "index.json").read_text(encoding="utf-8"))
    built = meta.get("meta") or {}
    if not built.get("source"):
        raise InputError(
            f"{paths.finetune / 'index' / 'index.json'}: records no document tower (`source`); rebuild it with `dvc repro -f finetune`"
        )
    return passage_ids(paths.blocks), str(built["source"]), str(built.get("embed_precision", "fp32"))


def _current(paths: Paths, ids: list[str], source: str) -> Knowledge:
    """The overlay so far, or an empty one over the finetune stage's index."""
    from realm_core.index import DenseIndex

    k = load_knowledge(paths.knowledge)
    if k is not None:
        return k
    base = index_signature(DenseIndex.load(paths.finetune / "index"))
    return Knowledge(base_blocks=len(ids), doc_tower=source, base_index=base)


def _version(root: Path) -> str:
    """`dvc add data/knowledge` in a DVC project: the overlay is versioned like the stages' outputs."""
    if not (root / ".dvc").is_dir():
        return ""
    dvc = Path(sys.executable).with_name("dvc")
    done = subprocess.run([str(dvc), "add", "-q", "data/knowledge"], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        return f"; `dvc add data/knowledge` failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    return "; versioned as data/knowledge.dvc (git add data/knowledge.dvc to commit it)"


def add(root: Path, file: Path) -> str:
    """Pack FILE's passages into blocks, embed them with the frozen doc tower, append them."""
    import torch

    from realm_core.blocks import BlockStore, embed_blocks
    from realm_core.corpus import process_shard, read_passages
    from realm_core.modeling import backbone_dir, load_embedder, load_tokenizer, resolve_device

    params, paths = load_params(root / "params.yaml"), Paths(root)
    ids, source, kernel = _base(paths)
    if file.suffix not in (".tsv", ".jsonl"):
        raise InputError(f'{file}: give a DPR .tsv (id<TAB>text<TAB>title) or a .jsonl ({{"id","title","text"}}) file')
    passages = read_passages(str(file.resolve()), None, params.seed, root)
    tokenizer = load_tokenizer(backbone_dir(params.model.backbone))
    device = resolve_device(params.device)
    doc = load_embedder(paths.root / "data" / source).to(device)
    with torch.no_grad():
        k, n = add_passages(
            _current(paths, ids, source),
            passages,
            set(ids),
            pack=lambda ps: process_shard(ps, tokenizer, params.corpus.max_block_tokens, progress=None),
            embed=lambda store: embed_blocks(doc, store, device, params.pretrain.embed_batch_size, None, kernel),
            store_of=lambda blocks: BlockStore(blocks, tokenizer, params.corpus.max_block_tokens),
        )
    save_knowledge(paths.knowledge, k)
    return f"added {len(passages)} passage(s) as {n} block(s) to {paths.knowledge}" + _version(root)


def remove(root: Path, ids: list[str]) -> str:
    paths = Paths(root)
    base_ids, source, _ = _base(paths)
    k, n = remove_passages(_current(paths, base_ids, source), ids, set(base_ids))
    save_knowledge(paths.knowledge, k)
    return f"removed {n} passage(s) from what the model retrieves ({paths.knowledge})" + _version(root)


def describe(root: Path) -> str:
    paths = Paths(root)
    k = load_knowledge(paths.knowledge)
    if k is None:
        return "no changes: the model retrieves exactly the corpus stage's blocks"
    return (
        f"{len(k.added_passages)} passage(s) added ({len(k.added)} blocks): {', '.join(k.added_passages) or '-'}\n"
        f"{len(k.removed)} passage(s) removed: {', '.join(k.removed) or '-'}"
    )
