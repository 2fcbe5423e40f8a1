"""Data-parallel training under torchrun: the plumbing every training loop shares (nanoGPT style).

    realm train ict                                          one process: every helper is a no-op
    torchrun --nproc_per_node 2 -m flows.cli train ict       2 processes, gloo on CPU / nccl on CUDA

`ddp = int(os.environ.get("RANK", -1)) != -1`: under torchrun `setup` joins the process group
(rank, world size and the rendezvous address come from torchrun's environment); without it the
process is rank 0 of a world of 1 and the same code runs unchanged (the degenerate case).

The loops split one global batch, drawn from the *same* seeded generator on every rank, into
contiguous equal slices (`shard`), so world size W with batch B computes what one process does
with batch B: DDP averages the gradients, and losses whose mean runs over a count that differs
between slices (masked tokens) are rescaled by `shard_weight` so that average is the global
mean. ICT's in-batch negatives are gathered from every rank (`all_gather`, gradients kept for
the local slice), as ORQA did across TPU cores. Dropout draws from torch's generator seeded with
seed + rank; the master (rank 0) alone logs, saves checkpoints and writes outputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from realm_core.io import InputError
from realm_core.logging import StepLogger, null_logger

T = TypeVar("T")


# ---------------------------------------------------------------------------- the process group


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or any launcher setting RANK) started."""
    return int(os.environ.get("RANK", -1)) != -1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_master() -> bool:
    """Rank 0 (or the only process): logs, saves checkpoints, writes stage outputs."""
    return rank() == 0


def setup(device: str = "cpu", timeout_minutes: float = 30.0) -> torch.device:
    """Join torchrun's process group if launched by it; return this process's device.

    `device` is params.yaml `device` (cpu | cuda | auto): with CUDA each process takes the GPU
    LOCAL_RANK and the backend is nccl, on CPU it is gloo. Calling it twice is harmless.
    """
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise InputError("params.yaml device: cuda was asked for but no GPU is visible; use cpu or auto")
    if cuda:
        torch.cuda.set_device(local_rank())  # torch.device("cuda") now means this process's GPU
    if launched_by_torchrun() and not is_distributed():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    return torch.device("cuda", local_rank()) if cuda else torch.device("cpu")


def teardown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def threads_per_process() -> int:
    """CPU threads for one process: the cores shared among the processes of this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collectives want their tensors: the GPU under nccl, else the CPU."""
    return (
        torch.device("cuda", local_rank()) if is_distributed() and dist.get_backend() == "nccl" else torch.device("cpu")
    )


# ---------------------------------------------------------------------------- splitting the global batch


def global_batch_size(requested: int, available: int) -> int:
    """The global batch: `requested` capped by `available`, rounded down to a multiple of the world
    size so every rank gets an equal slice (the gathered ICT negatives need equal shapes)."""
    w = world_size()
    n = min(requested, available)
    if n < w:
        raise ValueError(
            f"a global batch of {n} cannot be split over {w} processes; raise the batch size or use fewer processes"
        )
    return n - n % w


def shard(items: Sequence[T]) -> list[T]:
    """This rank's contiguous slice of the global batch (rank r of W takes items [r*n/W, (r+1)*n/W))."""
    n, w = len(items), world_size()
    if n % w:
        raise ValueError(f"a global batch of {n} does not split evenly over {w} processes (use global_batch_size)")
    per = n // w
    return list(items[rank() * per : (rank() + 1) * per])


def shard_weight(local_count: float, global_count: float) -> float:
    """Factor for a loss averaged over `local_count` items (tokens, examples) of this rank's slice.

    DDP averages gradients over ranks; scaled by W * local / global, that average is the gradient
    of the loss averaged over all `global_count` items of the global batch. 1.0 in one process.
    """
    return world_size() * local_count / global_count if global_count else 0.0


# ---------------------------------------------------------------------------- collectives


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own rows.

    Every rank's loss may depend on every rank's rows (ICT scores local queries against all
    contexts), so the gradient of rank r's rows is the sum over ranks of d loss_r' / d rows_r:
    an all_reduce of the full gradient, then this rank's slice (the pattern of SimCLR / CLIP
    trainers; all_reduce works on gloo and nccl alike, unlike reduce_scatter on gloo).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[dist.get_rank() * ctx.rows : (dist.get_rank() + 1) * ctx.rows]


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `tensor` (same shape on all) along dim 0, in rank order; the
    gradient flows back to each rank's own rows. Identity in one process."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


def all_gather_rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (no gradient), row counts may differ; returned on the CPU, by rank."""
    if not is_distributed():
        return [tensor]
    dev = _comm_device()
    counts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([tensor.shape[0]], device=dev))
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *tensor.shape[1:]), dtype=tensor.dtype, device=dev)
    padded[: tensor.shape[0]] = tensor.detach().to(dev)
    out = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(out, padded)
    return [o[: int(c.item())].cpu() for o, c in zip(out, counts)]


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """`src`'s tensor on every rank (same shape and dtype everywhere); identity in one process."""
    if not is_distributed():
        return tensor
    buffer = tensor.to(_comm_device()).contiguous()
    dist.broadcast(buffer, src)
    return buffer.to(tensor.device)


def average(metrics: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """The mean over ranks of each logged scalar (one all_reduce): with equal slices, the global
    batch's mean. Every rank must call it with the same keys in the same order; returns floats."""
    keys = list(metrics)
    values = torch.tensor(
        [float(v.detach()) if torch.is_tensor(v) else float(v) for v in (metrics[k] for k in keys)], dtype=torch.float64
    )
    if is_distributed() and keys:
        values = values.to(_comm_device())
        dist.all_reduce(values)
        values = values.cpu() / world_size()
    return dict(zip(keys, values.tolist()))


def master_only(log: StepLogger) -> StepLogger:
    """The loop's step logger on the master, a no-op on the other ranks."""
    return log if is_master() else null_logger


# ---------------------------------------------------------------------------- DDP


class _LossStep(nn.Module):
    """The modules a loss touches, with the loss as forward: DDP sees one forward per step.

    DDP hooks gradient averaging into its own forward; our losses call several towers
    (retriever.query, retriever.doc, the encoder) directly, so they run inside this one.
    """

    def __init__(self, fn: Callable[..., Any], modules: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def data_parallel(fn: Callable[..., T], *modules: nn.Module) -> Callable[..., T]:
    """`fn` (a loss over `modules`) wrapped in DistributedDataParallel under torchrun; `fn` itself
    in one process. Construction broadcasts rank 0's weights, so every rank starts identical.

    static_graph: every step uses the same parameters, but not all of them (a BERT pooler is
    unused with mean pooling); DDP finds those in the first step instead of searching the
    autograd graph every step (find_unused_parameters). Buffers are synced once, at start.
    """
    if not is_distributed():
        return fn
    from torch.nn.parallel import DistributedDataParallel

    module = _LossStep(fn, modules)
    cuda = next(module.parameters()).is_cuda
    return DistributedDataParallel(
        module, device_ids=[local_rank()] if cuda else None, forward_sync_buffers=False, static_graph=True
    )
