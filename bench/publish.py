"""Writing a bench's results: the JSON, its markdown table and its plot, printed and logged.

Every bench that reports (bench/quality.py, bench/mechanics.py) ends the same way; this is that end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def publish(
    results: dict,
    files: list[Path],
    markdown: Callable[[dict], str],
    plot: Callable[[dict, Path], object],
    log_to_mlflow: Callable[[dict, list[Path]], str] | None,
    indent: int = 2,
) -> None:
    """Write `results` to files[0] (JSON), its markdown to files[1] and its plot to files[2];
    print the markdown; log the three to MLflow unless `log_to_mlflow` is None."""
    files[0].parent.mkdir(parents=True, exist_ok=True)
    files[0].write_text(json.dumps(results, indent=indent) + "\n")
    files[1].write_text(markdown(results))
    plot(results, files[2])
    print(files[1].read_text())
    if log_to_mlflow is not None:
        print(f"MLflow run {log_to_mlflow(results, files)} (experiment realm-bench)")
    print(f"wrote {', '.join(str(f) for f in files)} in {results['seconds']:.0f} s")
