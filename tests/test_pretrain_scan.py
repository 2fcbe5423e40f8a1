"""bench/pretrain_scan.py: its table and plot from the runs' result files, and its refusal of a bad override."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _result(run: Path, overrides: list[str], r5: list[float]) -> None:
    rows = [
        {"step": 50 * i, "dev_recall_at_1": v / 3, "dev_recall_at_5": v, "dev_recall_at_20": 2 * v, "t": 1.0}
        for i, v in enumerate(r5)
    ] + [{"step": 60, "loss": 5.0, "t": 2.0}]  # a training row: not part of the curve
    summary = {
        "retrieval_utility_per_token_last_quarter": 0.25,
        "null_prob_last_quarter": 0.5,
        "evidence_gain_start": 4.0,
        "evidence_gain": 3.5,
    }
    run.mkdir(parents=True)
    (run / "result.json").write_text(
        json.dumps({"overrides": overrides, "summary": summary, "rows": rows, "seconds": 120})
    )


def test_the_report_lists_each_variants_own_overrides_and_its_recall_per_refresh(tmp_path):
    from bench import pretrain_scan as bench

    common = ["pretrain.steps=151", "pretrain.refresh_mode=sync"]
    _result(tmp_path / "base", common, [17.8, 20.6, 21.5])
    _result(tmp_path / "gate", [*common, "pretrain.null_gate=true"], [17.8, 15.5, 6.2])
    variants = bench.collect(tmp_path, None)
    assert [p["step"] for p in variants["gate"]["curve"]] == [0, 50, 100]
    results = {
        "config": {
            "workspace": "w",
            "steps": 151,
            "refresh_every": 50,
            "refresh_mode": "sync",
            "refresh_lag": 0,
            "dev_questions": 567,
        },
        "variants": variants,
        "load_average": [1.0, 1.0, 1.0],
    }
    md = bench.markdown(results)
    gate = next(line for line in md.splitlines() if line.startswith("| gate"))
    assert "pretrain.null_gate=true" in gate and "pretrain.steps" not in gate
    assert "17.8 → 15.5 → 6.2" in gate and "+0.250" in gate and "4.00 → 3.50" in gate
    assert "| base | (workspace params) | 17.8 → 20.6 → 21.5" in md
    assert "`pretrain.refresh_mode=sync pretrain.steps=151`" in md and "of the 567 held-out" in md
    bench.plot(results, tmp_path / "scan.png")
    assert (tmp_path / "scan.png").stat().st_size > 1000


def test_a_misspelt_override_fails_before_any_variant_trains(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    cmd = [sys.executable, str(ROOT / "bench" / "pretrain_scan.py"), "--workspace", str(tmp_path)]
    out = subprocess.run([*cmd, "--variants", "x=pretrain.null_gat=true"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "pretrain.null_gat" in out.stderr
    assert not (tmp_path / "runs").exists()
