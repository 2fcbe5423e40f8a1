"""The one training loop that every training stage runs (issue 14, item 1).

ICT (ORQA section 3.2), the MLM head warm-up, the encoder warm-up, REALM pre-training (section
3) and Open-QA fine-tuning (section 3.3) differ only in what one step computes. What is the same
for all of them lives here, once:

- the optimiser with its parameter groups, schedule and per-part clipping (realm_core/optim.py),
  so a change to them (issue "REALM that learns (1 of 2)") reaches every stage;
- resuming: the modules, optimiser, schedule and the stage's random generators are restored from
  the newest checkpoint before the first step and saved every `checkpoint_every` steps
  (realm_core/checkpoint.py), so an interrupted run ends where an uninterrupted one does;
- DDP: the step's metrics are averaged over ranks, only rank 0 logs, shows progress and saves;
- step logging: one row per step, the step's own metrics then the optimiser's gradient norms.

A stage gives `forward(step) -> (loss, metrics)`: the loss that is backpropagated and what the
step reports. Everything else about the stage (its data, its model, its summary) stays with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import trange

from realm_core import distributed
from realm_core.checkpoint import Checkpointer, TrainState
from realm_core.logging import StepLogger, null_logger
from realm_core.optim import GroupedAdamW

Row = dict[str, Any]  # a step's metrics: name -> tensor or float (floats once averaged over ranks)


def default_report(metrics: Row, norms: Mapping[str, float]) -> Row:
    """The step's metrics, then the optimiser's per-part gradient norms (`grad_norm_<part>`)."""
    return {**metrics, **norms}


class TrainLoop:
    """`steps` optimiser steps of `opt` over `modules`, resumable through `checkpoint`.

    Constructing it restores the newest checkpoint (`start` is the first step still to run and
    `resumed` the `extra` that checkpoint was saved with, {} on a fresh start), so a stage can
    rebuild its own state (history, index, ...) before `run`.
    """

    def __init__(
        self,
        desc: str,
        opt: GroupedAdamW,
        modules: Mapping[str, nn.Module],
        rngs: Mapping[str, Any],
        steps: int,
        *,
        log: StepLogger = null_logger,
        checkpoint: Checkpointer | None = None,
    ):
        self.desc, self.opt, self.steps, self.checkpoint = desc, opt, steps, checkpoint
        self.state = TrainState(dict(modules), opt.optimizer, opt.schedule, dict(rngs))
        self.start = checkpoint.restore(self.state) if checkpoint else 0
        self.resumed: dict[str, Any] = checkpoint.extra if checkpoint and self.start else {}
        self.log = distributed.master_only(log)  # rank 0 logs; a stage's own extra rows go through it too

    def run(
        self,
        forward: Callable[[int], tuple[torch.Tensor, Row]],
        *,
        report: Callable[[Row, Mapping[str, float]], Row] = default_report,
        on_row: Callable[[Row, int], Row] | None = None,
        after: Callable[[int], None] | None = None,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """Run the remaining steps. Per step: `loss, metrics = forward(step)`, backward, one
        optimiser step (clipping, schedule), then `report(metrics, norms)` (called after the
        optimiser step, so it can read the new learning rates), averaged over ranks, passed
        through `on_row(row, step)`, logged; `after(step)`, then a checkpoint holding
        `extra()` when one is due."""
        for step in trange(
            self.start, self.steps, desc=self.desc, unit="step", mininterval=2.0, disable=not distributed.is_master()
        ):
            loss, metrics = forward(step)
            self.opt.zero_grad()
            loss.backward()
            norms = self.opt.step()
            row = distributed.average(report(metrics, norms))
            if on_row is not None:
                row = on_row(row, step)
            self.log(row, step)
            if after is not None:
                after(step)
            if self.checkpoint:
                self.checkpoint.maybe_save(
                    step + 1, self.state, final=step + 1 == self.steps, extra=extra() if extra is not None else None
                )
