"""Short REALM pre-trainings side by side from one workspace's corpus and ict outputs.

    python bench/pretrain_scan.py --workspace W --variants base= gate=pretrain.null_gate=true
    python bench/pretrain_scan.py --workspace W --report-only      # re-tabulate the runs already there

Each variant reruns only the pretrain stage (its task, with the workspace's params.yaml plus the
variant's overrides and any --steps / --refresh-every / --sync, no checkpoints) in
W/runs/scan/<variant>, over symlinks to W/data/{corpus,ict}. Variants run one after another, or
two at a time with --parallel 2 (one thread each; their timings are then comparable to each other
only). What it reports, per variant: the zero-shot recall@{1,5,20} of the held-out cloze
questions (data/corpus/qa_dev.jsonl) over every new index, the probe's evidence gain, and the
last quarter's retrieval utility per token and p(null).

Caution: qa_dev.jsonl holds the cloze questions that `bench/quality.py` scores as its set (a),
so a choice made on these curves is a choice made on evaluation questions. Confirm it on sets
the scan never reads (vital-linked, SQuAD-open), and say so.
Writes <out>/pretrain_scan.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECALL = ("dev_recall_at_1", "dev_recall_at_5", "dev_recall_at_20")
FINAL = ("retrieval_utility_per_token_last_quarter", "null_prob_last_quarter", "evidence_gain_start", "evidence_gain")


def run_one(workspace: Path, run_dir: Path, overrides: list[str]) -> None:
    """Pre-train one variant in run_dir and write run_dir/result.json (its summary and step rows)."""
    import tasks.training as tt
    from flows.pipeline import check_overrides
    from realm_core.paths import Paths

    params = check_overrides(workspace / "params.yaml", overrides)  # the params a `realm run -S ...` would use
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    for name in ("corpus", "ict"):
        link = run_dir / "data" / name
        if not link.exists():
            link.symlink_to((workspace / "data" / name).resolve())
    if not (run_dir / "dvc.yaml").exists():
        (run_dir / "dvc.yaml").symlink_to((workspace / "dvc.yaml").resolve())
    rows: list[dict] = []
    started = time.perf_counter()

    def log(metrics: dict, step: int) -> None:
        row = {k: float(v) for k, v in metrics.items()} | {"step": step, "t": time.perf_counter() - started}
        rows.append(row)
        if any(k in row for k in RECALL):
            print(run_dir.name, step, {k: round(row[k], 2) for k in RECALL if k in row}, flush=True)

    os.chdir(run_dir)
    out = run_dir / "out"
    out.mkdir(exist_ok=True)
    summary = tt.pretrain_task.fn(params, Paths(run_dir), out, log)
    result = {"overrides": overrides, "summary": summary, "rows": rows, "seconds": time.perf_counter() - started}
    (run_dir / "result.json").write_text(json.dumps(result))


def curve(rows: list[dict]) -> list[dict]:
    """[{step, R@1, R@5, R@20}] at each new index."""
    return [{"step": r["step"], **{k: r[k] for k in RECALL}} for r in rows if "dev_recall_at_5" in r]


def collect(runs: Path, names: list[str] | None) -> dict:
    variants = {}
    for result in sorted(runs.glob("*/result.json")):
        name = result.parent.name
        if names and name not in names:
            continue
        r = json.loads(result.read_text())
        variants[name] = {
            "overrides": r["overrides"],
            "curve": curve(r["rows"]),
            **{k: r["summary"].get(k) for k in FINAL},
            "seconds": round(r["seconds"], 1),
        }
    return variants


def markdown(results: dict) -> str:
    c = results["config"]
    lines = [
        "# Pre-training scan",
        "",
        f"From the corpus and ict outputs of `{c['workspace']}`, {c['steps']} steps, {c['refresh_mode']} index refresh "
        f"every {c['refresh_every']} steps"
        + (f" (each swapped in {c['refresh_lag']} steps after its snapshot)" if c["refresh_mode"] == "async" else "")
        + f". Zero-shot recall@5 (points) of the {c['dev_questions']} held-out cloze "
        "questions over each new index; these are the quality report's set (a), so confirm any choice on sets "
        "(b) and (c).",
        "",
        "| variant | overrides | R@5 per refresh | RU/token (last quarter) | p(null) | evidence gain start → end | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    shared = set.intersection(*(set(v["overrides"]) for v in results["variants"].values()))
    if shared:
        lines[4:4] = [f"Every variant: `{' '.join(sorted(shared))}`.", ""]
    for name, v in results["variants"].items():
        own = [o for o in v["overrides"] if o not in shared]
        r5 = " → ".join(f"{p['dev_recall_at_5']:.1f}" for p in v["curve"])
        gain = f"{v['evidence_gain_start']:.2f} → {v['evidence_gain']:.2f}" if v["evidence_gain"] is not None else "–"
        ru = v["retrieval_utility_per_token_last_quarter"]
        pn = v["null_prob_last_quarter"]
        lines.append(
            f"| {name} | {' '.join(own) or '(workspace params)'} | {r5} | "
            f"{'–' if ru is None else f'{ru:+.3f}'} | {'–' if pn is None else f'{pn:.3f}'} | {gain} | {v['seconds'] / 60:.1f} min |"
        )
    lines += ["", f"Load average when this report was written: {results['load_average']}.", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, v in results["variants"].items():
        ax.plot([p["step"] for p in v["curve"]], [p["dev_recall_at_5"] for p in v["curve"]], marker="o", label=name)
    ax.set_xlabel("pre-training step (index refresh)")
    ax.set_ylabel("zero-shot recall@5, held-out cloze (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=ROOT, help="holds params.yaml, dvc.yaml, data/{corpus,ict}")
    parser.add_argument(
        "--variants", nargs="*", default=["base="], help="NAME=key=value,key=value ... (NAME= for no override)"
    )
    parser.add_argument("--steps", type=int, help="pre-training steps of every variant (default: the workspace's)")
    parser.add_argument("--refresh-every", type=int, help="index refresh period (default: the workspace's)")
    parser.add_argument("--sync", action="store_true", help="refresh in the trainer (default: the workspace's mode)")
    parser.add_argument("--parallel", type=int, default=1, choices=(1, 2), help="variants at a time")
    parser.add_argument("--report-only", action="store_true", help="tabulate the runs already in the scan folder")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # internal: RUN_DIR OVERRIDE...
    args = parser.parse_args()
    workspace = args.workspace.resolve()
    if args.one:
        run_one(workspace, Path(args.one[0]), args.one[1:])
        return
    runs = workspace / "runs" / "scan"
    common = [
        *([f"pretrain.steps={args.steps}"] if args.steps else []),
        *([f"pretrain.refresh_every={args.refresh_every}"] if args.refresh_every else []),
        *(["pretrain.refresh_mode=sync"] if args.sync else []),
        "pretrain.checkpoint_every=0",
    ]
    names = [v.split("=", 1)[0] for v in args.variants]
    specs = {
        name: common + [o for o in rest.split(",") if o] for name, _, rest in (v.partition("=") for v in args.variants)
    }
    if not args.report_only:
        from flows.pipeline import check_overrides

        for overrides in specs.values():  # a typo fails here, before the first variant trains
            check_overrides(workspace / "params.yaml", overrides)
    started = time.perf_counter()
    if not args.report_only:
        env = {**os.environ, "TQDM_DISABLE": "1"}
        if args.parallel == 2:
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        pending = list(args.variants)
        while pending:
            batch, pending = pending[: args.parallel], pending[args.parallel :]
            procs = []
            for spec in batch:
                name = spec.split("=", 1)[0]
                cmd = [sys.executable, __file__, "--workspace", str(workspace), "--one", str(runs / name), *specs[name]]
                procs.append(subprocess.Popen(cmd, env=env))
            for p in procs:
                if p.wait():
                    raise SystemExit(f"a variant failed (exit {p.returncode}): {' '.join(p.args)}")
    variants = collect(runs, names if not args.report_only else None)
    if not variants:
        raise SystemExit(f"no scan results under {runs}")
    dev = sum(1 for line in (workspace / "data" / "corpus" / "qa_dev.jsonl").read_text().splitlines() if line.strip())
    from realm_core.config import load_params

    first = next(iter(variants.values()))
    overrides = dict(o.split("=", 1) for o in first["overrides"])
    c = load_params(workspace / "params.yaml").pretrain
    results = {
        "config": {
            "workspace": str(workspace),
            "steps": int(overrides.get("pretrain.steps", c.steps)),
            "refresh_every": int(overrides.get("pretrain.refresh_every", c.refresh_every)),
            "refresh_mode": overrides.get("pretrain.refresh_mode", c.refresh_mode),
            "refresh_lag": int(overrides.get("pretrain.refresh_lag", c.refresh_lag)),
            "dev_questions": dev,
        },
        "variants": variants,
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    from bench.publish import publish

    args.out.mkdir(parents=True, exist_ok=True)
    files = [args.out / "pretrain_scan.json", args.out / "pretrain_scan.md", args.out / "pretrain_scan.png"]
    publish(results, files, markdown, plot, None)


if __name__ == "__main__":
    main()
