"""Block-embedding kernels (realm_core/precision.py, params.yaml index.embed_precision): each one
embeds like fp32, "auto" follows the CPU's flags, a bad value is refused by the config, and the
trained document tower is never touched (the kernels work on a copy). No test times anything:
speed is bench/throughput.py's business (reports/throughput.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from realm_core import precision
from realm_core.blocks import embed_blocks
from realm_core.config import ParamsError, load_params
from realm_core.modeling import Retriever
from realm_core.precision import resolve_embed_precision
from realm_core.refresh import SyncRefresher
from tests.conftest import CPU


@pytest.fixture()
def doc(tiny):
    bert, _ = tiny
    torch.manual_seed(0)
    return Retriever.from_backbone(bert, None, 16, "mean").doc


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("kernel", ["bf16", "int8", "auto"])
def test_each_kernel_embeds_every_block_like_fp32_as_float32(tiny, doc, kernel):
    _, store = tiny
    fp32 = embed_blocks(doc, store, CPU, batch_size=3, progress=None)
    other = embed_blocks(doc, store, CPU, batch_size=3, progress=None, precision=kernel)
    assert other.dtype == np.float32 and other.shape == fp32.shape
    assert _cosines(other, fp32).min() > 0.99


def test_fp32_is_the_default_of_embed_blocks_and_unchanged(tiny, doc):
    _, store = tiny
    np.testing.assert_array_equal(
        embed_blocks(doc, store, CPU, progress=None), embed_blocks(doc, store, CPU, progress=None, precision="fp32")
    )


@pytest.mark.parametrize("kernel", ["int8", "bf16"])
def test_the_trained_tower_keeps_its_fp32_weights_and_mode_after_embedding(tiny, doc, kernel):
    _, store = tiny
    doc.train()
    before = {k: v.clone() for k, v in doc.state_dict().items()}
    embed_blocks(doc, store, CPU, progress=None, precision=kernel)
    after = doc.state_dict()
    assert after.keys() == before.keys() and doc.training
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
    assert all(p.dtype == torch.float32 for p in doc.parameters())
    assert all(
        type(m) is torch.nn.Linear for m in doc.modules() if isinstance(m, torch.nn.Linear)
    )  # not swapped for quantised ones


def test_a_refresh_embeds_the_current_weights_not_a_stale_quantised_copy(tiny, doc):
    _, store = tiny
    refresher = SyncRefresher(store, CPU, 4, refresh_every=1, precision="int8")
    first = refresher.initial(doc).embeddings
    with torch.no_grad():
        for p in doc.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a training step
    second = refresher.step(doc, 1).embeddings
    fresh = embed_blocks(doc, store, CPU, batch_size=4, progress=None)  # fp32 of the new weights
    assert _cosines(second, fresh).min() > 0.99
    assert _cosines(second, fresh).mean() > _cosines(first, fresh).mean()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
        ({"avx2", "amx_bf16", "amx_tile"}, "bf16"),
        ({"avx2", "fma"}, "fp32"),  # int8 is faster there but lost > 0.5 points of recall@5: opt-in only
        ({"sse4_2"}, "fp32"),
        (set(), "fp32"),
    ],
)
def test_auto_resolves_from_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    assert resolve_embed_precision("auto", CPU) == expected
    assert resolve_embed_precision("fp32", CPU) == "fp32"  # an explicit kernel is kept whatever the flags


def test_cuda_never_gets_int8_and_auto_picks_a_half_precision(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_embed_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(ValueError, match="CPU only"):
        resolve_embed_precision("int8", torch.device("cuda"))


def test_an_unknown_kernel_is_refused(tmp_path):
    with pytest.raises(ValueError, match="index.embed_precision must be one of"):
        resolve_embed_precision("int4", CPU)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"index": {"type": "flat", "embed_precision": "int4"}}))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    message = str(err.value)
    assert "embed_precision" in message and "int4" in message and str(path) in message
    for allowed in ("auto", "fp32", "bf16", "int8"):
        assert allowed in message


def test_params_yaml_defaults_to_auto():
    assert load_params(Path(__file__).resolve().parents[1] / "params.yaml").index.embed_precision == "auto"


def test_the_config_and_the_resolver_accept_the_same_values():
    from typing import get_args

    from realm_core.config import IndexParams

    assert get_args(IndexParams.model_fields["embed_precision"].annotation) == precision.EMBED_PRECISIONS
