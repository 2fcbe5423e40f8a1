"""Process environment for the orchestration layer, set before Prefect or MLflow is imported.

Why each default (DESIGN.md 2 "known pitfalls", 3b):
- `PREFECT_HOME` inside the project: Prefect's local mode keeps its SQLite database there, so
  runs of this project are visible with `prefect server start` from the project, and nothing
  leaks into the user's home directory.
- `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120`: the temporary local server needs over
  a minute on a fresh database on 2 cores; Prefect's default (20 s) kills every first run.
- `PREFECT_SERVER_ANALYTICS_ENABLED=false`: avoids a harmless "database is locked" traceback.
- `MLFLOW_TRACKING_URI=sqlite:///<absolute root>/mlruns.db`: MLflow 3 refuses the old file
  store, and an absolute path keeps `dvc exp run --temp` copies writing to the same store.

Every value is a default: anything already in the environment wins.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root(start: Path | None = None) -> Path:
    """The nearest directory at or above `start` (default: cwd) holding dvc.yaml or params.yaml."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").exists() or (candidate / "params.yaml").exists():
            return candidate
    return here


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlruns.db').resolve()}"


def configure(root: Path | None = None) -> Path:
    """Set the environment defaults above for `root`; return the root."""
    root = project_root(root)
    defaults = {
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "MLFLOW_TRACKING_URI": default_tracking_uri(root),
        # The stage processes use the CPU threads themselves; tokenizers' own pool fights them.
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    return root
