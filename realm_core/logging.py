"""The one callback type training loops use to report per-step metrics.

realm_core stays free of MLflow: the orchestration layer passes a function that forwards
to whatever tracker it uses.
"""

from __future__ import annotations

from typing import Protocol


class StepLogger(Protocol):
    def __call__(self, metrics: dict[str, float], step: int) -> None: ...


def null_logger(metrics: dict[str, float], step: int) -> None:
    """A StepLogger that drops everything (tests, library use)."""
