"""Prefect flows: one per stage, the pipeline flow, the `realm` CLI and MLflow tracking.

Importing this package sets the environment defaults of `flows.env` (Prefect home and
start-up timeout, MLflow store) before any flow module imports Prefect.
"""

from flows.env import configure

configure()
