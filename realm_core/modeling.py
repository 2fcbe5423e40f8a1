"""The whole REALM model, top to bottom (Guu et al., ICML 2020; ORQA, Lee et al., ACL 2019).

    Retriever p(z|x)            = softmax_z  Embed_input(x) . Embed_doc(z)          (section 3.2)
    KnowledgeAugmentedEncoder   p(y_j|z,x) = BERT-MLM([CLS] x [SEP] body(z) [SEP])   (section 3.2)
    SpanReader                  p(span|z,x) for Open-QA, ORQA's span MLP            (section 3.2)
    marginal_log_likelihood     log p(y|x) = log sum_z p(z|x) p(y|z,x)              (section 3.1)

Both embedders are BERT -> pooled [CLS] -> Linear(h -> d) -> LayerNorm with d = 128.
Modules are saved as safetensors + JSON config (never pickle) by `save_module`/`load_*`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertModel, PreTrainedTokenizerBase
from transformers import logging as hf_logging

from realm_core.io import InputError, atomic_write_text, report_disk_full
from realm_core.paths import backbone_dir  # noqa: F401 - where model.backbone points, checked without torch (realm run)

hf_logging.set_verbosity_error()  # loading a BertModel checkpoint into BertForMaskedLM lists the new head

NULL_BLOCK = 0  # candidate index of the null block in pre-training (section 3.4)


# ---------------------------------------------------------------------------- loading


# What a broken local checkpoint raises inside transformers / safetensors (missing or truncated
# weights, config.json that is not JSON, a pytorch_model.bin refused by use_safetensors=True).
_CHECKPOINT_ERRORS = (OSError, ValueError, SafetensorError)


def _bad_backbone(directory: Path, exc: Exception) -> InputError:
    return InputError(
        f"{directory}: cannot load this BERT checkpoint ({type(exc).__name__}: {str(exc).strip()[:300]}); "
        "it needs config.json, model.safetensors (pickled pytorch_model.bin is refused) and vocab.txt: "
        "fix or replace the directory (params.yaml model.backbone), or use 'minilm'"
    )


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """The WordPiece tokenizer of a local checkpoint; without vocab.txt / tokenizer.json transformers
    would silently build a 5-token vocabulary, so that is an error here."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: no such model directory; check params.yaml model.backbone")
    if not any((directory / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
        raise InputError(
            f"{directory}: no tokenizer (neither vocab.txt nor tokenizer.json); copy the checkpoint's vocabulary files into it"
        )
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except _CHECKPOINT_ERRORS as exc:
        raise _bad_backbone(directory, exc) from None


def load_bert(directory: str | Path, num_hidden_layers: int | None = None, pooler: bool = True) -> BertModel:
    """A BertModel from a local checkpoint (safetensors only), optionally truncated to its first N layers."""
    kwargs = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    try:
        return BertModel.from_pretrained(str(directory), add_pooling_layer=pooler, use_safetensors=True, **kwargs)
    except _CHECKPOINT_ERRORS as exc:
        raise _bad_backbone(Path(directory), exc) from None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("params.yaml device: cuda was asked for but no GPU is visible; use cpu or auto")
    return torch.device(device)


# ---------------------------------------------------------------------------- retriever


POOLINGS = ("cls", "mean")


class Embedder(nn.Module):
    """Embed_input / Embed_doc: BERT -> pooled [CLS] -> Linear(h -> d) -> LayerNorm (section 3.2).

    `pooling="mean"` averages the last hidden states instead (how all-MiniLM-L6-v2 was trained).
    It exists because a BERT cut to its first layers has an input-independent [CLS]: for
    MiniLM's first 2 layers the pairwise cosine of [CLS] states across unrelated sentences is
    1.000, so ICT cannot move off chance; mean pooling gives 0.67.
    """

    def __init__(self, bert: BertModel, dim: int = 128, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.bert = bert
        self.pooling = pooling
        self.projection = nn.Linear(bert.config.hidden_size, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)  # [B, L, 1]
            pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        else:
            pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]
        return self.norm(self.projection(pooled))  # [B, d]


class Retriever(nn.Module):
    """Two towers, as in REALM: a query embedder and a document embedder; f(x, z) = dot product.

    `shared=True` uses one embedder for both (REALM's code has `share_embedders`): half the
    parameters, and every gradient of either side reaches the same weights.
    """

    def __init__(self, query: Embedder, doc: Embedder | None = None):
        super().__init__()
        self.query = query
        self.doc = query if doc is None else doc

    @property
    def shared(self) -> bool:
        return self.doc is self.query

    @classmethod
    def from_backbone(
        cls, directory: str | Path, num_hidden_layers: int | None, dim: int, pooling: str = "cls", shared: bool = False
    ) -> "Retriever":
        query = Embedder(load_bert(directory, num_hidden_layers), dim, pooling)
        return cls(query, None if shared else Embedder(load_bert(directory, num_hidden_layers), dim, pooling))

    @staticmethod
    def score(query_emb: torch.Tensor, doc_emb: torch.Tensor) -> torch.Tensor:
        """f(x, z): [B, d] x [B, k, d] -> [B, k]."""
        return torch.einsum("bd,bkd->bk", query_emb, doc_emb)


# ---------------------------------------------------------------------------- knowledge-augmented encoder


class CopyHead(nn.Module):
    """Reading made learnable: a pointer over the block's wordpieces mixed into the MLM softmax.

        p(y_j | z, x) = (1 - g_j) p_vocab(y_j | z, x) + g_j sum_{i in body(z), t_i = y_j} a_ji
        a_j = softmax_i s_ji,  s_ji = (W_q h_j) . (W_k h_i) / sqrt(h)     g_j = sigmoid(w . h_j + u max_i s_ji + b)

    over the body positions i of `[CLS] x [SEP] body(z) [SEP]` (pointer-generator networks, See
    et al. 2017). A departure from the paper (switch `model.copy_head`): REALM's encoder is a
    BERT MLM checkpoint that already reads its context through self-attention (section 3.4).
    Ours has a new MLM head on a 2-layer sentence encoder, which learns to copy from its context
    only slowly (DESIGN.md 1b); with the pointer, copying a span out of the block is one bilinear
    match away. With the null block (no body) the pointer is off and p = p_vocab.

    The gate sees the best match score: a block that holds no good filler must close it, or it
    would make p(y | z, x) fall below p(y | null, x) by log(1 - g). Pre-training's candidates are
    mostly such blocks; with a gate blind to the match, the marginal likelihood moved all mass to
    the null block within 20 steps of the default run (p(null) -> 1.0, retriever gradient -> 0).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(hidden, 1)
        self.gate_match = nn.Parameter(torch.ones(()))  # u: weight of the best match score in the gate

    def pointer(
        self, gathered: torch.Tensor, hidden: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """a [N, M, L] (0 off the body; all 0 without a body), log g and log (1 - g) [N, M] (g = 0 without a body).

        Masks are finite and the copy mass a sum of probabilities, not a logsumexp over -inf:
        both keep the backward pass free of NaN when a row has no body or no matching wordpiece.
        """
        scores = (
            torch.einsum("nmh,nlh->nml", self.query(gathered), self.key(hidden)) / hidden.size(-1) ** 0.5
        )  # [N, M, L]
        masked = scores.masked_fill(~context[:, None, :], -1e4)
        a = masked.softmax(-1) * context[:, None, :]
        has = context.any(-1)[:, None]  # [N, 1]
        best = torch.where(has, masked.amax(-1), torch.zeros_like(masked[..., 0]))  # [N, M]
        gate = self.gate(gathered).squeeze(-1) + self.gate_match * best  # [N, M]
        log_g = torch.where(has, F.logsigmoid(gate), torch.full_like(gate, float("-inf")))
        log_1mg = torch.where(has, F.logsigmoid(-gate), torch.zeros_like(gate))
        return a, log_g, log_1mg

    @staticmethod
    def mix(logp_vocab: torch.Tensor, copy: torch.Tensor, log_g: torch.Tensor, log_1mg: torch.Tensor) -> torch.Tensor:
        """log((1 - g) p_vocab + g p_copy), shapes broadcast; p_copy may be 0."""
        return torch.logaddexp(log_1mg + logp_vocab, log_g + copy.clamp(min=1e-30).log())


class KnowledgeAugmentedEncoder(nn.Module):
    """p(y_j | z, x): BERT masked-LM over `[CLS] masked x [SEP] body(z) [SEP]` (section 3.2).

    The MLM decoder is tied to the word embeddings, as in BERT. `copy=True` adds the CopyHead.
    """

    def __init__(self, mlm: BertForMaskedLM, copy: bool = False):
        super().__init__()
        self.mlm = mlm
        self.copy = CopyHead(mlm.config.hidden_size) if copy else None

    @classmethod
    def from_backbone(
        cls, directory: str | Path, num_hidden_layers: int | None, copy: bool = False
    ) -> "KnowledgeAugmentedEncoder":
        """Backbones without an MLM head (all-MiniLM-L6-v2 ships a bare BertModel) get a new one:
        its transform is freshly initialised and its decoder is tied to the word embeddings;
        `realm_core.ict.warmup_mlm_head` trains it, then `realm_core.reading.warmup_encoder`
        teaches the whole encoder to read its evidence."""
        kwargs = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
        try:
            mlm = BertForMaskedLM.from_pretrained(str(directory), use_safetensors=True, **kwargs)
        except _CHECKPOINT_ERRORS as exc:
            raise _bad_backbone(Path(directory), exc) from None
        mlm.tie_weights()
        return cls(mlm, copy)

    @property
    def bert(self) -> BertModel:
        return self.mlm.bert

    def _read(self, input_ids, attention_mask, token_type_ids, mask_positions) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.mlm.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # [N, L, h]
        gathered = hidden.gather(1, mask_positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))  # [N, M, h]
        return hidden, gathered

    def _pointer(self, hidden, gathered, input_ids, attention_mask, token_type_ids):
        # body(z): segment 1 without its closing [SEP], the last attended position (inputs are right-padded)
        last = attention_mask.sum(-1, keepdim=True) - 1  # [N, 1]
        context = (
            (token_type_ids == 1)
            & (attention_mask == 1)
            & (torch.arange(input_ids.size(1), device=input_ids.device) != last)
        )
        return self.copy.pointer(gathered, hidden, context)

    def token_log_probs(
        self,
        input_ids: torch.Tensor,  # [N, L]
        attention_mask: torch.Tensor,  # [N, L]
        token_type_ids: torch.Tensor,  # [N, L]
        mask_positions: torch.Tensor,  # [N, M] positions of [MASK] tokens (padded with 0)
        targets: torch.Tensor,  # [N, M] original token ids at those positions
    ) -> torch.Tensor:
        """log p(y_j | z, x) for every masked token j: [N, M]. Only masked rows reach the vocab layer."""
        hidden, gathered = self._read(input_ids, attention_mask, token_type_ids, mask_positions)
        logp = self.mlm.cls(gathered).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, M]
        if self.copy is None:
            return logp
        a, log_g, log_1mg = self._pointer(hidden, gathered, input_ids, attention_mask, token_type_ids)
        hit = input_ids[:, None, :] == targets[:, :, None]  # [N, M, L]: body wordpieces equal to the target
        return self.copy.mix(logp, (a * hit).sum(-1), log_g, log_1mg)  # [N, M]

    def masked_log_probs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        mask_positions: torch.Tensor,
    ) -> torch.Tensor:
        """log p(y | z, x) over the whole vocabulary at the masked positions: [N, M, V]."""
        hidden, gathered = self._read(input_ids, attention_mask, token_type_ids, mask_positions)
        logp = self.mlm.cls(gathered).log_softmax(-1)  # [N, M, V]
        if self.copy is None:
            return logp
        a, log_g, log_1mg = self._pointer(hidden, gathered, input_ids, attention_mask, token_type_ids)
        copy = torch.zeros_like(logp).scatter_add_(-1, input_ids[:, None, :].expand_as(a), a)  # [N, M, V]
        return self.copy.mix(logp, copy, log_g[..., None], log_1mg[..., None])


def marginal_log_likelihood(
    retrieval_logits: torch.Tensor,  # [B, k]  f(x, z) for each candidate
    token_log_probs: torch.Tensor,  # [B, k, M]  log p(y_j | z, x)
    token_mask: torch.Tensor,  # [B, M]  1 for real masked tokens
    form: str = "per_token",
) -> torch.Tensor:
    """Negative marginal log-likelihood of the masked tokens (section 3.1).

    per_token (Google's realm/model.py): -mean_j log sum_z p(z|x) p(y_j|z,x), averaged over
    every masked token of the batch. product (the paper's equation): -mean_x log sum_z
    p(z|x) prod_j p(y_j|z,x), per example.
    """
    log_pz = retrieval_logits.log_softmax(-1)  # [B, k]
    mask = token_mask.to(token_log_probs.dtype)
    if form == "per_token":
        per_token = torch.logsumexp(log_pz.unsqueeze(-1) + token_log_probs, dim=1)  # [B, M]
        return -(per_token * mask).sum() / mask.sum().clamp(min=1)
    if form == "product":
        joint = (token_log_probs * mask.unsqueeze(1)).sum(-1)  # [B, k]
        return -torch.logsumexp(log_pz + joint, dim=1).mean()
    raise ValueError(f"unknown loss form {form!r}; use per_token or product")


def retrieval_utility(
    retrieval_logits: torch.Tensor, token_log_probs: torch.Tensor, token_mask: torch.Tensor, per_token: bool = False
) -> torch.Tensor:
    """RU = log p(y|x) - log p(y|null, x), summed over masked tokens, mean over examples (section 4.5).

    Positive when retrieval helps predict the masked span; the null block is candidate 0.
    `per_token=True` divides by the number of masked tokens instead (RU per token: comparable
    across masking schemes whose spans differ in length).
    """
    mask = token_mask.to(token_log_probs.dtype)
    log_pz = retrieval_logits.log_softmax(-1)
    with_retrieval = (torch.logsumexp(log_pz.unsqueeze(-1) + token_log_probs, dim=1) * mask).sum(-1)  # [B]
    null_only = (token_log_probs[:, NULL_BLOCK] * mask).sum(-1)  # [B]
    if per_token:
        return (with_retrieval - null_only).sum() / mask.sum().clamp(min=1)
    return (with_retrieval - null_only).mean()


# ---------------------------------------------------------------------------- span reader (Open-QA)


class SpanReader(nn.Module):
    """ORQA's reader: score(span) = MLP([h_start; h_end]) with hidden 256, ReLU and LayerNorm.

    The first layer of the MLP is applied to start and end separately (W [h_s; h_e] = W_s h_s +
    W_e h_e), which is the same function without building a [spans, 2h] tensor.
    """

    def __init__(self, bert: BertModel, hidden: int = 256):
        super().__init__()
        self.bert = bert
        h = bert.config.hidden_size
        self.start = nn.Linear(h, hidden)
        self.end = nn.Linear(h, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, 1)

    def span_logits(
        self,
        input_ids: torch.Tensor,  # [N, L]
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        starts: torch.Tensor,  # [N, S] span start positions
        ends: torch.Tensor,  # [N, S] span end positions (inclusive)
    ) -> torch.Tensor:
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        start_h = self.start(hidden)  # [N, L, H]
        end_h = self.end(hidden)
        span_h = start_h.gather(1, starts.unsqueeze(-1).expand(-1, -1, start_h.size(-1))) + end_h.gather(
            1, ends.unsqueeze(-1).expand(-1, -1, end_h.size(-1))
        )  # [N, S, H]
        return self.out(self.norm(F.relu(span_h))).squeeze(-1)  # [N, S]


def marginal_over_correct(
    logits: torch.Tensor, correct: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """-log sum_{correct} p over one softmax per row; 0 for rows with nothing correct (ORQA).

    logits/correct/valid: [B, ...]; the softmax runs over all valid entries of a row.
    """
    flat = logits.reshape(logits.size(0), -1)
    ok = correct.reshape(flat.shape).bool()
    if valid is not None:
        keep = valid.reshape(flat.shape).bool()
        flat = flat.masked_fill(~keep, float("-inf"))
        ok = ok & keep
    log_z = torch.logsumexp(flat, dim=-1)
    log_correct = torch.logsumexp(flat.masked_fill(~ok, float("-inf")), dim=-1)
    has_any = ok.any(-1)
    loss = torch.where(has_any, log_z - log_correct, torch.zeros_like(log_z))
    return loss.mean()


# ---------------------------------------------------------------------------- save / load (safetensors + JSON)


def untied_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with one name per tied tensor (the first in sorted order), contiguous.

    safetensors refuses shared storage. Its `save_model` records every dropped name in the file's
    metadata, a hash map whose order varies from run to run, so identical weights (the tied MLM
    decoder) gave files with different bytes and DVC reran every downstream stage. `load_model`
    re-ties the dropped names from the module itself, so they need not be in the file.
    """
    state = module.state_dict()
    kept: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        t = state[name]
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in kept:
            kept[key] = name
            out[name] = t.contiguous()
    return out


def save_module(module: nn.Module, directory: Path, bert_config: BertConfig, extra: dict | None = None) -> None:
    """Weights as safetensors (tied tensors once), the BERT config and our own config as JSON."""
    weights, config = directory / "model.safetensors", directory / "config.json"
    with report_disk_full(weights):  # safetensors reports a full disk without the file's name
        directory.mkdir(parents=True, exist_ok=True)
        save_file(untied_state_dict(module), str(weights), metadata={"format": "pt"})
    with report_disk_full(config):
        bert_config.to_json_file(str(config))
    atomic_write_text(directory / "realm.json", json.dumps({"class": type(module).__name__, **(extra or {})}, indent=2))


RERUN = "rerun the stage that writes it (`realm run`, or `dvc repro -f <stage>`)"


def _read_json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); the file is corrupt, {RERUN}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(obj).__name__}; the file is corrupt, {RERUN}")
    return obj


def _read_realm_config(directory: Path, expected: str, keys: tuple[str, ...] = ()) -> tuple[BertConfig, dict]:
    """Our saved modules: config.json (BERT), realm.json (class + our fields), model.safetensors."""
    if not directory.is_dir():
        raise InputError(f"{directory}: no such model directory; {RERUN}")
    for name in ("config.json", "realm.json", "model.safetensors"):
        if not (directory / name).exists():
            raise InputError(f"{directory}: missing {name}; {RERUN}")
    meta = _read_json_object(directory / "realm.json")
    if meta.get("class") != expected:
        raise InputError(
            f"{directory}: holds a {meta.get('class')}, expected a {expected}; give the {expected}'s directory, or {RERUN}"
        )
    missing = [k for k in keys if k not in meta]
    if missing:
        raise InputError(f"{directory / 'realm.json'}: missing {', '.join(missing)}; the file is corrupt, {RERUN}")
    fields = _read_json_object(directory / "config.json")
    try:
        return BertConfig(**fields), meta
    except (TypeError, ValueError) as exc:
        raise InputError(f"{directory / 'config.json'}: not a BERT config ({exc}); {RERUN}") from None


def _load_weights(module: nn.Module, directory: Path) -> None:
    try:
        load_model(module, str(directory / "model.safetensors"))
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise InputError(
            f"{directory / 'model.safetensors'}: cannot load weights ({exc}); the file is corrupt, {RERUN}"
        ) from None


def load_embedder(directory: Path) -> Embedder:
    config, meta = _read_realm_config(directory, "Embedder", ("dim",))
    module = Embedder(BertModel(config, add_pooling_layer=True), meta["dim"], meta.get("pooling", "cls"))
    _load_weights(module, directory)
    return module


def load_encoder(directory: Path) -> KnowledgeAugmentedEncoder:
    config, meta = _read_realm_config(directory, "KnowledgeAugmentedEncoder")
    module = KnowledgeAugmentedEncoder(BertForMaskedLM(config), copy=meta.get("copy", False))
    _load_weights(module, directory)
    module.mlm.tie_weights()
    return module


def load_reader(directory: Path) -> SpanReader:
    config, meta = _read_realm_config(directory, "SpanReader", ("hidden",))
    module = SpanReader(BertModel(config, add_pooling_layer=False), meta["hidden"])
    _load_weights(module, directory)
    return module


def save_embedder(module: Embedder, directory: Path) -> None:
    save_module(
        module, directory, module.bert.config, {"dim": module.projection.out_features, "pooling": module.pooling}
    )


def save_encoder(module: KnowledgeAugmentedEncoder, directory: Path) -> None:
    save_module(module, directory, module.mlm.config, {"copy": module.copy is not None})


def save_reader(module: SpanReader, directory: Path) -> None:
    save_module(module, directory, module.bert.config, {"hidden": module.norm.normalized_shape[0]})


def save_retriever(retriever: Retriever, directory: Path) -> None:
    """query/ and doc/ (the same weights twice when shared, so either loads alone) + retriever.json."""
    save_embedder(retriever.query, directory / "query")
    save_embedder(retriever.doc, directory / "doc")
    atomic_write_text(directory / "retriever.json", json.dumps({"shared": retriever.shared}))


def load_retriever(directory: Path) -> Retriever:
    meta = _read_json_object(directory / "retriever.json") if (directory / "retriever.json").exists() else {}
    query = load_embedder(directory / "query")
    return Retriever(query, None if meta.get("shared") else load_embedder(directory / "doc"))
