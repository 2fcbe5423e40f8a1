"""The arithmetic that embeds the blocks for the index (REALM section 3.3: every refresh re-embeds
the whole corpus with the current Embed_doc, so its cost bounds how fresh the index can be).

    resolve_embed_precision("auto", torch.device("cpu"))   # -> "bf16" on this machine (AMX / AVX-512 bf16)
    tower = embedding_tower(doc, "int8")                     # a quantised copy; `doc` keeps training in fp32

params.yaml `index.embed_precision` picks it; "auto" chooses from the hardware:

    CPU with avx512_bf16 or amx_bf16   bf16  a bfloat16 copy of the tower (oneDNN's bf16 / AMX matmuls)
    other CPU                          fp32  the tower itself
    CUDA                               bf16 if the GPU supports it, else fp16

"int8" (dynamic int8 quantisation of every nn.Linear, weights per channel, fbgemm) is never
chosen by "auto": it lost 0.57-0.66 points of SQuAD-open recall@5 against fp32, over the 0.5
points an index kernel may cost (reports/throughput.md). Ask for it by name where speed matters
more, e.g. on AVX2-only CPUs, where it is about 2x fp32.

Only the block embeddings of an index are computed this way; training, queries and the
trained tower's weights stay fp32, and the embeddings come back as float32. bench/throughput.py
section `embed` measures each kernel's speed against sentence-transformers and its recall@k
against fp32 (reports/throughput.md).
"""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import torch
from torch import nn

EMBED_PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
KERNELS = EMBED_PRECISIONS[1:]
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (/proc/cpuinfo `flags`; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def resolve_embed_precision(requested: str, device: torch.device) -> str:
    """The kernel that embeds blocks on `device`: `requested` itself, or the choice for "auto" (module docstring)."""
    if requested not in EMBED_PRECISIONS:
        raise ValueError(f"index.embed_precision must be one of {', '.join(EMBED_PRECISIONS)}; got {requested!r}")
    if device.type == "cuda":
        if requested == "int8":
            raise ValueError(
                "index.embed_precision int8 (dynamic quantisation) runs on CPU only; on cuda use auto, bf16, fp16 or fp32"
            )
        if requested == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return requested
    if requested != "auto":
        return requested
    if device.type != "cpu":
        return "fp32"
    flags = cpu_flags()
    if flags & BF16_FLAGS:
        return "bf16"
    return "fp32"  # int8 costs more recall than an index kernel may (module docstring)


def embedding_tower(embedder: nn.Module, kernel: str) -> nn.Module:
    """The module that embeds with `kernel`: the embedder itself for fp32, else a copy of its
    current weights (cast to bf16 / fp16, or with every nn.Linear dynamically quantised to int8).
    The embedder is never modified; a copy is made at each call, so it follows training."""
    if kernel == "fp32":
        return embedder
    if kernel in HALF:
        return copy.deepcopy(embedder).to(HALF[kernel])
    if kernel == "int8":
        with (
            warnings.catch_warnings()
        ):  # torch 2.13 points eager quantisation users to torchao, whose CPU int8 needs torch.compile
            warnings.simplefilter("ignore")
            qconfig = (
                torch.ao.quantization.per_channel_dynamic_qconfig
            )  # per output row: 6-layer MiniLM cosine to fp32 0.97 (per tensor 0.89)
            return torch.ao.quantization.quantize_dynamic(copy.deepcopy(embedder), {nn.Linear: qconfig})
    raise ValueError(f"unknown embedding kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
