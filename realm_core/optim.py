"""BERT-style AdamW with one parameter group per part of the model, for every training loop.

REALM trains three parts at once (query tower, document tower, knowledge-augmented encoder) whose
gradients differ by an order of magnitude: on the default run the encoder's gradient norm was
24.4 against about 2 per tower. With one group, one learning rate and one clip of the joint
norm, Adam normalises each tower's (mostly noisy) gradient into a full-size step and the clip
is spent on the encoder. So each part is its own group with its own learning rate and its own
gradient-norm clip, and the optimiser is BERT's (Devlin et al. 2019, which REALM section 3.4
starts from): AdamW with no weight decay on biases and LayerNorm weights, the learning rate
warmed up linearly over the first `warmup_fraction` of the steps and then decayed linearly to 0.

A group with learning rate 0 is frozen: its parameters get `requires_grad=False`, so no
gradient is computed for them at all (the "frozen retriever" control of the mechanics bench).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

_FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # devices torch has a fused AdamW kernel for


@dataclass(frozen=True)
class Part:
    """One parameter group: a module (or loose parameters) trained at its own learning rate."""

    params: list[nn.Parameter]
    lr: float
    no_decay: frozenset[int] = frozenset()  # ids of parameters that get no weight decay

    @classmethod
    def of(cls, module: nn.Module, lr: float) -> "Part":
        """All trainable parameters of `module`; biases and LayerNorm weights are exempt from decay (BERT)."""
        no_decay = set()
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if name.endswith("bias") or isinstance(sub, nn.LayerNorm) or "LayerNorm" in type(sub).__name__:
                    no_decay.add(id(p))
        return cls([p for p in module.parameters()], lr, frozenset(no_decay))


def _unique(parts: Mapping[str, Part]) -> dict[str, Part]:
    """Drop parameters already owned by an earlier part (shared embedders, tied decoder weights)."""
    seen: set[int] = set()
    out = {}
    for name, part in parts.items():
        params = [p for p in part.params if id(p) not in seen]
        seen.update(id(p) for p in params)
        out[name] = Part(params, part.lr, part.no_decay)
    return out


class GroupedAdamW:
    """AdamW over named parts plus its schedule, per-part clipping and per-part gradient norms.

    `step()` returns the pre-clip gradient norm of each part (`grad_norm_<name>`), the health
    metric DESIGN.md 1b asks for: a retriever gradient means something only once it is not noise.
    """

    def __init__(
        self,
        parts: Mapping[str, Part],
        steps: int,
        *,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        clip_norm: float = 1.0,
    ):
        self.parts = _unique(parts)
        groups = []
        self.trained: dict[str, list[nn.Parameter]] = {}
        for name, part in self.parts.items():
            if part.lr == 0:
                for p in part.params:
                    p.requires_grad_(False)
                continue
            params = [p for p in part.params if p.requires_grad]
            if not params:
                continue
            self.trained[name] = params
            decay = [p for p in params if id(p) not in part.no_decay]
            exempt = [p for p in params if id(p) in part.no_decay]
            groups += [
                {"params": ps, "lr": part.lr, "weight_decay": wd, "part": name}
                for ps, wd in ((decay, weight_decay), (exempt, 0.0))
                if ps
            ]
        if not groups:  # nothing trains: keep a valid optimizer so loops and checkpoints stay uniform
            groups = [
                {
                    "params": [nn.Parameter(torch.zeros(1), requires_grad=False)],
                    "lr": 0.0,
                    "weight_decay": 0.0,
                    "part": "none",
                }
            ]
        tensors = [p for g in groups for p in g["params"]]
        fused = all(t.device.type in _FUSED_ADAMW_DEVICES and t.is_floating_point() for t in tensors) or None
        # fused: the same arithmetic as torch's per-tensor loop in one pass over each tensor (~9% of a
        # pre-training step on 2 cores went to the loop; the results differ by ~1e-8)
        self.optimizer = torch.optim.AdamW(groups, fused=fused)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_warmup_decay(steps, warmup_fraction))
        self.clip_norm = clip_norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> dict[str, float]:
        """Clip each part's gradient to `clip_norm` on its own, step, advance the schedule; returns the norms."""
        norms = {}
        for name, params in self.trained.items():
            with_grad = [p for p in params if p.grad is not None]
            if with_grad:
                norm = float(
                    torch.nn.utils.clip_grad_norm_(with_grad, self.clip_norm if self.clip_norm > 0 else float("inf"))
                )
                if not math.isfinite(norm):  # one NaN step would poison every weight and every later index
                    raise FloatingPointError(
                        f"non-finite gradient norm ({norm}) in the {name!r} parameters at step {self.schedule.last_epoch}; "
                        f"lower its learning rate or look for a NaN in the loss"
                    )
                norms[f"grad_norm_{name}"] = norm
        self.optimizer.step()
        self.schedule.step()
        return norms

    def lr(self, part: str) -> float:
        return next((g["lr"] for g in self.optimizer.param_groups if g["part"] == part), 0.0)


def linear_warmup_decay(steps: int, warmup_fraction: float):
    """BERT's schedule as a LambdaLR factor: 0 -> 1 over the warm-up, then linearly to 0 at `steps`."""
    warmup = max(1, round(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor
